"""The paired A/B comparison the engine benchmark uses to say learned vs best static k."""

import math

import numpy as np
import pytest

from policies.evaluate import paired_ratio


def test_pairing_cancels_drift_that_hits_both_runs():
    drift = np.array([60.0, 150.0, 90.0, 120.0, 75.0])  # the machine's speed moves 2.5x across pairs
    r = paired_ratio(1.03 * drift, drift)
    assert r.ratio == pytest.approx(1.03)
    assert r.low == pytest.approx(1.03) and r.high == pytest.approx(1.03)
    assert r.verdict == "above"
    # the spread of b alone is +-40%, yet the other way round the pairs still say below, at once
    assert paired_ratio(drift, 1.03 * drift).verdict == "below"


def test_noise_larger_than_the_effect_is_a_tie():
    rng = np.random.default_rng(0)
    b = rng.uniform(90, 110, size=4)
    a = b * 1.01 * np.exp(rng.normal(0, 0.08, size=4))
    r = paired_ratio(a, b)
    assert r.verdict == "tie" and r.low < 1.0 < r.high
    assert "tie" in str(r) and "n=4" in str(r)


def test_interval_covers_the_true_ratio_at_its_confidence():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 2000
    for _ in range(trials):
        b = rng.uniform(50, 150, size=6)
        a = b * 0.95 * np.exp(rng.normal(0, 0.05, size=6))
        r = paired_ratio(a, b, confidence=0.9)
        hits += r.low <= 0.95 <= r.high
    assert 0.87 <= hits / trials <= 0.93


def test_one_pair_has_no_interval():
    r = paired_ratio([110.0], [100.0])
    assert r.ratio == pytest.approx(1.1) and r.high == math.inf and r.verdict == "tie"


@pytest.mark.parametrize("a,b,confidence,match", [
    ([1.0, 2.0], [1.0], 0.95, "equally long"),
    ([], [], 0.95, "non-empty"),
    ([1.0, 0.0], [1.0, 1.0], 0.95, "positive finite"),
    ([1.0, float("nan")], [1.0, 1.0], 0.95, "positive finite"),
    ([1.0, 2.0], [1.0, 2.0], 1.5, "confidence"),
])
def test_bad_input_names_the_problem(a, b, confidence, match):
    with pytest.raises(ValueError, match=match):
        paired_ratio(a, b, confidence=confidence)


def test_margin_verdict_says_what_an_a_a_comparison_can_show():
    from policies.evaluate import PairedRatio

    def pr(low, high):
        return PairedRatio((low * high) ** 0.5, low, high, 10, 0.95)

    assert pr(0.99, 1.01).margin_verdict(0.02) == "equivalent within +-2%"
    assert pr(0.99, 1.01).verdict == "tie"  # the plain verdict cannot say more than this
    assert pr(0.985, 1.06).margin_verdict(0.02) == "not worse than -2%"
    assert pr(1.01, 1.08).margin_verdict(0.02) == "not worse than -2%"  # above is not worse, too
    assert pr(0.97, 1.01).margin_verdict(0.02) == "undecided at 2%"
    assert pr(0.97, 1.01).margin_verdict(0.05) == "equivalent within +-5%"
    assert pr(0.90, 0.97).margin_verdict(0.02) == "more than 2% below"
    assert pr(0.979, 0.995).margin_verdict(0.02) == "undecided at 2%"
    assert pr(0.981, 0.995).margin_verdict(0.02) == "equivalent within +-2%"  # below 1, within the margin
    assert pr(0.98, 1.0).not_worse(0.02) and not pr(0.979, 1.0).not_worse(0.02)
    with pytest.raises(ValueError, match="margin"):
        pr(0.9, 1.1).margin_verdict(0.0)


def test_more_pairs_decide_an_a_a_comparison_at_a_margin():
    # the same configuration twice, 4% noise per run: 4 pairs cannot bound the ratio at 2%, 40 can
    rng = np.random.default_rng(3)
    b = rng.uniform(90, 110, size=40)
    a = b * np.exp(rng.normal(0, 0.04, size=40))
    assert paired_ratio(a[:4], b[:4]).margin_verdict(0.02) == "undecided at 2%"
    assert paired_ratio(a, b).margin_verdict(0.02) in ("equivalent within +-2%", "not worse than -2%")
