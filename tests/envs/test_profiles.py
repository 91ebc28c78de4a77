"""Cost and acceptance profiles: fits recover the truth, roofline behaves like a GPU, ranges warn."""

import warnings

import numpy as np
import pytest

from envs.profiles import (PROFILES, AcceptanceProfile, FittedCost, RooflineCost, fit_acceptance, fit_cost,
                           profile_from_dict)
from envs.trace import load_trace


def _rate(cost, acc, batch, k, width=1, kv=0.3):
    return batch * (1 + acc.expected_accepted(k, width)) / cost.predict(batch, k, width, 0, kv)


def test_roofline_speculation_wins_small_batch_loses_large_batch():
    p = PROFILES["h100-llama3-8b-eagle"]
    best = {b: max(range(p.max_k + 1), key=lambda k: _rate(p.cost, p.acceptance, b, k)) for b in (1, 8, 64, 256)}
    assert best[1] >= 3 and best[8] >= 3          # memory-bound: deep speculation is nearly free
    assert best[64] < best[8]                    # shorter near the knee
    assert best[256] == 0                        # compute-bound: verification costs more than it saves
    assert _rate(p.cost, p.acceptance, 1, best[1]) / _rate(p.cost, p.acceptance, 1, 0) > 1.5


def test_roofline_verify_cost_grows_with_width_and_width_raises_acceptance():
    p = PROFILES["h100-llama3-8b-tree-drift"]
    c = p.cost
    assert c.predict(200, 3, 4) > c.predict(200, 3, 2) > c.predict(200, 3, 1)
    a = p.acceptance
    assert a.expected_accepted(3, 4) > a.expected_accepted(3, 2) > a.expected_accepted(3, 1)


@pytest.mark.parametrize("cost", [RooflineCost(), RooflineCost(draft_pass_when_off=True)])
def test_scalar_and_vector_roofline_agree(cost):
    rng = np.random.default_rng(0)
    b, k, w, pf = rng.integers(0, 300, 50), rng.integers(0, 7, 50), rng.choice([1, 2, 4], 50), rng.integers(0, 4096, 50)
    kv = rng.random(50)
    vec = cost.predict_many(b, k, w, pf, kv)
    one = [cost.predict_one(int(*x[:1]), int(x[1]), int(x[2]), int(x[3]), float(x[4])) for x in zip(b, k, w, pf, kv)]
    np.testing.assert_allclose(vec, one, rtol=1e-12)


def test_fitted_cost_heldout_error_and_scalar_form(small_synthetic_trace):
    t = load_trace(small_synthetic_trace)
    cost = fit_cost([t], seed=0)
    rep = cost.report
    assert rep["n_holdout"] > 0
    # the generator's own noise is 3% log-normal, so ~2.4% MAPE is the floor
    assert rep["mape_holdout"] < 0.05, rep
    assert all(v < 0.08 for v in rep["mape_holdout_by_k"].values()), rep
    s = t.steps
    idx = np.arange(0, t.n_steps, 97)
    vec = cost.predict_many(s["batch_size"][idx], s["k"][idx], s["width"][idx], s["prefill_tokens"][idx],
                            s["kv_usage"][idx])
    one = [cost.predict_one(int(s["batch_size"][i]), int(s["k"][i]), int(s["width"][i]),
                            int(s["prefill_tokens"][i]), float(s["kv_usage"][i])) for i in idx]
    np.testing.assert_allclose(vec, one, rtol=1e-9)
    # serialisation roundtrip
    again = profile_from_dict(cost.to_dict())
    assert isinstance(again, FittedCost)
    np.testing.assert_allclose(again.predict_many(s["batch_size"][idx], s["k"][idx], s["width"][idx],
                                                  s["prefill_tokens"][idx], s["kv_usage"][idx]), vec)


def test_fitted_cost_generalises_to_rarely_recorded_pairs(small_synthetic_trace):
    """Drop every k=5 step at batch >= 16 from the fit: the model still predicts them."""
    t = load_trace(small_synthetic_trace)
    s = t.steps
    rare = (s["k"] == 5) & (s["batch_size"] >= 16)
    assert rare.sum() > 20
    keep = ~rare
    t.steps = {n: v[keep] for n, v in s.items()}
    cost = fit_cost([t], holdout=0.0)
    pred = cost.predict_many(s["batch_size"][rare], s["k"][rare], s["width"][rare], s["prefill_tokens"][rare],
                             s["kv_usage"][rare])
    mape = np.mean(np.abs(pred - s["step_ms"][rare]) / s["step_ms"][rare])
    assert mape < 0.10, mape


def test_extrapolation_warns_once_with_range(small_synthetic_trace):
    cost = fit_cost([load_trace(small_synthetic_trace)])
    hi = cost.ranges["batch_max"]
    with pytest.warns(UserWarning, match=rf"batch_size={hi * 3}.*fitted range \[0, {hi}\]"):
        cost.predict(hi * 3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost.predict(hi * 3, 1)        # once only
        cost.predict(hi, 1)            # inside the range: silent


def test_fit_refuses_too_little_data(small_synthetic_trace):
    t = load_trace(small_synthetic_trace)
    t.steps = {n: v[:5] for n, v in t.steps.items()}
    with pytest.raises(ValueError, match="at least 20"):
        fit_cost([t])


def test_acceptance_fit_recovers_rates_and_drift(drift_synthetic_trace):
    truth = PROFILES["h100-llama3-8b-tree-drift"].acceptance
    fitted = fit_acceptance([load_trace(drift_synthetic_trace)], bin_s=60.0)
    np.testing.assert_allclose(fitted.p, truth.p, atol=0.06)
    # the trace alternates -0.9 / +0.9 logits every 60 s
    d = np.asarray(fitted.delta)
    assert len(d) >= 4
    assert np.all(d[0::2] < -0.4) and np.all(d[1::2] > 0.4), d
    assert fitted.rates(30.0)[0] < fitted.rates(90.0)[0]


def test_acceptance_profile_math():
    a = AcceptanceProfile(p=[0.5, 0.5, 0.5])
    assert a.expected_accepted(0) == 0
    assert a.expected_accepted(3) == pytest.approx(0.5 + 0.25 + 0.125)
    cdf = a.length_cdf(0.0, 1)
    np.testing.assert_allclose(np.diff(np.concatenate([[0], cdf])), [0.5, 0.25, 0.125, 0.125])
    with pytest.raises(ValueError, match="probabilities"):
        AcceptanceProfile(p=[1.2])


def test_acceptance_fit_needs_speculation(small_synthetic_trace):
    t = load_trace(small_synthetic_trace)
    t.steps = dict(t.steps, k=np.zeros_like(t.steps["k"]), drafts=np.zeros_like(t.steps["drafts"]))
    t.accepted_per_pos = np.zeros_like(t.accepted_per_pos)
    with pytest.raises(ValueError, match="no step in the traces has k > 0"):
        fit_acceptance([t])
