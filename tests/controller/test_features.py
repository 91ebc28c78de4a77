"""The shared feature function and the action contract."""

import numpy as np
import pytest

from controller.actions import ActionSet
from controller.features import FEATURE_NAMES, FeatureSpec, FeatureState, batch_sweep, observe


def test_observation_in_unit_box_and_named():
    spec = FeatureSpec(max_num_seqs=64, max_k=4, max_width=2)
    st = FeatureState(spec)
    for b in (0, 1, 64, 500):
        o = observe(st, b, waiting=10_000, kv_usage=1.3, prefill_pending=10**7)
        assert o.shape == (len(FEATURE_NAMES),) and o.dtype == np.float32
        assert np.all((o >= 0) & (o <= 1))


def test_acceptance_ema_tracks_per_position_rate_and_holds_while_off():
    st = FeatureState(FeatureSpec(max_k=4, ema=0.5, accept_prior=0.5))
    for _ in range(30):  # 10 drafts, 8 accepted at pos 0, 4 at pos 1: 12 / (10 + 8) = 2/3
        st.update(10, 2, 1, 10, [8, 4], 12.0)
    o = observe(st, 10, 0, 0.1, 0)
    assert o[FEATURE_NAMES.index("alpha")] == pytest.approx(2 / 3, abs=1e-3)
    assert o[FEATURE_NAMES.index("accept0")] == pytest.approx(0.8, abs=1e-3)
    for _ in range(64):
        st.update(10, 0, 1, 0, [], 10.0)
    o = observe(st, 10, 0, 0.1, 0)
    assert o[FEATURE_NAMES.index("alpha")] == pytest.approx(2 / 3, abs=1e-3)  # held while off


def test_acceptance_emas_average_over_trials_so_batch_one_is_as_steady_as_batch_sixteen():
    """With accept_trials the acceptance EMAs weigh each step by its drafted tokens: batch 1 (a
    step accepts 0..k, ~2.5 trials) and batch 16 fed the same Bernoulli acceptance swing alike,
    where per step the batch-1 EMA swung four times as far; the long-run mean is the same."""
    import random

    def spread(spec, b, steps=6000, p=0.5, k=3, seed=0):
        rng = random.Random(seed)
        st, seen = FeatureState(spec), []
        for i in range(steps):
            per_pos = [0] * k
            for _ in range(b):
                for j in range(k):
                    if rng.random() >= p:
                        break
                    per_pos[j] += 1
            st.update(b, k, 1, b, per_pos, 30.0)
            if i >= 500:
                seen.append(st.alpha)
        return float(np.mean(seen)), float(np.std(seen))

    per_trial = FeatureSpec(max_k=4, accept_trials=150)
    m1, s1 = spread(per_trial, 1)
    m16, s16 = spread(per_trial, 16)
    assert m1 == pytest.approx(0.5, abs=0.03) and m16 == pytest.approx(0.5, abs=0.03)
    assert s1 < 0.06 and s1 / s16 < 1.6  # ~150 trials behind the estimate at either batch size
    _, s1_step = spread(FeatureSpec(max_k=4), 1)
    assert s1_step > 2 * s1  # per step: ~25 trials at batch 1
    spec = FeatureSpec(max_k=4, accept_trials=150)
    assert FeatureSpec(**spec.to_dict()) == spec and FeatureSpec().accept_trials == 0  # older artifacts: per step


def test_the_observation_ignores_what_only_the_policys_own_choices_move():
    """Step time, tokens per ms and the last k / width follow the chosen k; observed, a policy learned
    habits from them (module docstring).  Two states whose last steps differ in k, width and step time
    (and so in tokens per ms) but not in acceptance observe alike."""
    spec = FeatureSpec(max_k=4, max_width=2)
    a, b = FeatureState(spec), FeatureState(spec)
    a.update(16, 4, 2, 16, [10, 6, 3, 1], 150.0)
    b.update(16, 4, 2, 16, [10, 6, 3, 1], 150.0)
    b.update(16, 0, 1, 0, [], 60.0)  # an off step: last k, step time and tokens per ms move, acceptance holds
    assert a.tok_per_ms != b.tok_per_ms
    np.testing.assert_array_equal(observe(a, 16, 3, 0.2, 100), observe(b, 16, 3, 0.2, 100))
    assert not {"last_k", "last_width", "step_ms", "tok_per_ms", "staleness"} & set(FEATURE_NAMES)


def test_batch_sweep_changes_only_batch_entries():
    spec = FeatureSpec(max_num_seqs=128)
    st = FeatureState(spec)
    base = observe(st, 5, 3, 0.4, 100)
    rows = batch_sweep(base, [5, 64], spec)
    np.testing.assert_array_equal(rows[0], base)
    assert rows[1][0] == pytest.approx(0.5) and np.array_equal(rows[1][2:], base[2:])


def test_action_set_mapping():
    a = ActionSet(max_k=3, widths=[1, 2, 4])
    assert a.n == 10 and a.actions[a.index(2, 4)] == (2, 4)
    assert a.actions[a.map_to_supported(a.index(3, 4), [1, 2])] == (3, 2)
    assert a.actions[a.map_to_supported(a.index(3, 2), [1], max_k=1)] == (1, 1)
    assert a.map_to_supported(a.index(2, 1), [1], max_k=0) == 0
    with pytest.raises(ValueError, match="not in this action set"):
        a.index(4, 1)
    with pytest.raises(ValueError, match="max_k"):
        ActionSet(max_k=0)
