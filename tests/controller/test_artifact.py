"""Policy artifact: numpy forward pass, decision table, save/load, clear refusals."""

import json

import numpy as np
import pytest

from controller.artifact import ArtifactError, Decision, PolicyArtifact
from controller.features import FeatureSpec, FeatureState, observe

ACTIONS = [(0, 1), (1, 1), (2, 1), (3, 1)]


def test_roundtrip_and_forward_pass(tmp_path):
    art = PolicyArtifact.random(FeatureSpec(max_num_seqs=32, max_k=3), ACTIONS, hidden=(8, 8), seed=1)
    art.provenance = {"seed": 1}
    p = art.save(tmp_path / "policy.json")
    again = PolicyArtifact.load(p)
    obs = observe(FeatureState(art.feature_spec), 5, 1, 0.2, 10)
    np.testing.assert_allclose(again.logits(obs), art.logits(obs))
    # forward pass = explicit tanh MLP
    h = np.tanh(np.tanh(obs @ art.weights[0] + art.biases[0]) @ art.weights[1] + art.biases[1])
    np.testing.assert_allclose(art.logits(obs), h @ art.weights[2] + art.biases[2], rtol=1e-6)
    assert again.provenance == {"seed": 1}


def test_decision_table_matches_per_batch_act():
    spec = FeatureSpec(max_num_seqs=16, max_k=3)
    art = PolicyArtifact.random(spec, ACTIONS, seed=3)
    st = FeatureState(spec)
    d = art.decision(st, waiting=2, kv_usage=0.3, prefill_pending=50)
    assert len(d.table) == 17 and d.table[0] == (0, 1)
    for b in range(1, 17):
        assert d.lookup(b) == ACTIONS[art.act(observe(st, b, 2, 0.3, 50))]
    assert d.lookup(1000) == d.table[-1]


def test_fast_decision_equals_the_full_batch_sweep_at_random_states():
    from controller.features import batch_sweep

    spec = FeatureSpec(max_num_seqs=32, max_k=3)
    rng = np.random.default_rng(7)
    distinct = []
    for seed in range(4):
        art = PolicyArtifact.random(spec, ACTIONS, hidden=(16, 16), seed=seed)
        st = FeatureState(spec)
        tables = set()
        for _ in range(200):
            st.alpha, st.accept0 = float(rng.uniform()), float(rng.uniform())
            w, kv, p = int(rng.integers(0, 40)), float(rng.uniform()), int(rng.integers(0, 20000))
            rows = batch_sweep(observe(st, 0, w, kv, p), np.arange(33), spec)
            want = [ACTIONS[i] for i in np.argmax(art.logits(rows), axis=1)]
            got = art.decision(st, w, kv, p).table
            assert got == tuple([(0, 1)] + want[1:])
            tables.add(got)
        # a recurring table is the same tuple each time (the controller compares it cheaply)
        again = {art.decision(st, 0, 0.5, 0).table for _ in range(3)}
        assert len({id(t) for t in again}) == 1
        distinct.append(len(tables))
    assert max(distinct) > 1, distinct  # the random states do move the table


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_argmax_batch_breaks_float32_ties_as_float64_does(activation):
    """Two actions whose logits differ by less than float32 resolves: the float32 fast path sees a
    tie (it would pick the first), the float64 re-check picks what logits() picks."""
    from controller.features import batch_sweep

    spec = FeatureSpec(max_num_seqs=16, max_k=3)
    art = PolicyArtifact.random(spec, ACTIONS, hidden=(8,), seed=5)
    art.activation = activation
    d = art.to_dict()
    b = [0.5, 0.5 + 1e-9, 0.5, 0.5 - 1e-9]  # action 1 wins by 1e-9: invisible in float32
    d["weights"][-1] = np.zeros_like(art.weights[-1]).tolist()  # every action's logit is its bias
    d["biases"][-1] = b
    art = PolicyArtifact.from_dict(d)
    assert np.float32(b[1]) == np.float32(b[0])
    obs = observe(FeatureState(spec), 0, 3, 0.4, 100)
    want = np.argmax(art.logits(batch_sweep(obs, np.arange(17), spec)), axis=1)
    assert set(want.tolist()) == {1}
    np.testing.assert_array_equal(art.argmax_batch(obs), want)
    assert set(art.decision(FeatureState(spec), 3, 0.4, 100).table[1:]) == {ACTIONS[1]}


def test_ranges_form():
    d = Decision(((0, 1), (4, 1), (4, 1), (2, 1), (0, 1)))
    assert d.ranges() == [[1, 2, 4], [3, 3, 2], [4, 4, 0]]
    assert Decision.static(2, max_num_seqs=3).ranges() == [[1, 3, 2]]


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(schema="other/1"), "schema"),
    (lambda d: d.pop("weights"), "weights: required"),
    (lambda d: d.update(actions=ACTIONS[:2]), "outputs but there are 2 actions"),
    (lambda d: d.update(feature_names=["a"]), "retrain"),
    (lambda d: d.update(activation="gelu"), "activation"),
    (lambda d: d["weights"][0][0].__setitem__(0, float("nan")), "non-finite"),
])
def test_bad_artifacts_refused_with_file_name(tmp_path, mutate, match):
    d = PolicyArtifact.random(FeatureSpec(max_k=3), ACTIONS).to_dict()
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=match) as exc:
        PolicyArtifact.load(p)
    assert "bad.json" in str(exc.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-controller"):
        PolicyArtifact.load(tmp_path / "none.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        PolicyArtifact.load(tmp_path / "c.json")
