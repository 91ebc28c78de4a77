"""Plugin settings, the version gate and the decision-table helpers (no engine needed)."""

import re

import pytest

from serving_patch.compat import check_vllm_version
from serving_patch.config import PluginConfig, parse_table
from serving_patch.sources import dense_table


def test_inert_without_configuration():
    cfg = PluginConfig.from_env({})
    assert not cfg.enabled and not cfg.controls_k


@pytest.mark.parametrize("raw, source", [
    ("/srv/policy.json", ("embedded", "/srv/policy.json")),
    ("embedded:/srv/policy.json", ("embedded", "/srv/policy.json")),
    ("sidecar:http://127.0.0.1:8731", ("sidecar", "http://127.0.0.1:8731")),
    ("static:0", ("static", "0")),
    ("table:[[1,4,4],[5,32,0]]", ("table", "[[1,4,4],[5,32,0]]")),
    ("cycle:0,4", ("cycle", "0,4")),
    ("vllm", ("vllm", "")),
])
def test_source_forms(raw, source):
    cfg = PluginConfig.from_env({"SPEC_CONTROLLER": raw})
    assert cfg.source == source and cfg.enabled
    assert cfg.controls_k == (source[0] != "vllm")


def test_recorder_alone_enables_the_hook():
    cfg = PluginConfig.from_env({"SPEC_TRACE_OUT": "/tmp/t.jsonl.gz", "SPEC_CONTROLLER_EXPLORE": "0.3"})
    assert cfg.enabled and not cfg.controls_k and cfg.explore == 0.3


@pytest.mark.parametrize("env, fragment", [
    ({"SPEC_CONTROLLER": "static:x"}, "static:K needs an int"),
    ({"SPEC_CONTROLLER": "table:[[2,4,1]]"}, "start at batch size 1"),
    ({"SPEC_CONTROLLER": "cycle:a"}, "cycle:K0,K1"),
    ({"SPEC_CONTROLLER_EXPLORE": "1.5"}, "SPEC_CONTROLLER_EXPLORE must be in [0, 1]"),
    ({"SPEC_CONTROLLER_FALLBACK_K": "-1"}, "SPEC_CONTROLLER_FALLBACK_K must be >= 0"),
    ({"SPEC_CONTROLLER_REFRESH_S": "5", "SPEC_CONTROLLER_MAX_AGE_S": "1"}, "REFRESH_S <= SPEC_CONTROLLER_MAX_AGE_S"),
    ({"SPEC_CONTROLLER_LAZY_DRAFTER": "maybe"}, "SPEC_CONTROLLER_LAZY_DRAFTER must be 1 or 0"),
    ({"SPEC_CONTROLLER_CALIBRATE": "auto"}, "SPEC_CONTROLLER_CALIBRATE must be 1 or 0"),
    ({"SPEC_CONTROLLER_CATCHUP_MAX_TOKENS": "-5"}, "SPEC_CONTROLLER_CATCHUP_MAX_TOKENS must be >= 0"),
    ({"SPEC_CONTROLLER_DECIDE_EVERY": "0"}, "SPEC_CONTROLLER_DECIDE_EVERY must be >= 1"),
    ({"SPEC_CONTROLLER_MIN_GAIN": "0.8"}, "SPEC_CONTROLLER_MIN_GAIN must be in [0, 0.5]"),
    ({"SPEC_CONTROLLER_MIN_GAIN": "3%"}, "SPEC_CONTROLLER_MIN_GAIN must be a number"),
    ({"SPEC_CONTROLLER_SPECULATE_OVER_OFF": "sometimes"}, "SPEC_CONTROLLER_SPECULATE_OVER_OFF must be 1 or 0"),
])
def test_bad_settings_name_the_variable(env, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        PluginConfig.from_env(env)


@pytest.mark.parametrize("raw, on", [("", True), ("1", True), ("on", True), ("0", False), ("False", False)])
def test_lazy_drafter_setting(raw, on):
    cfg = PluginConfig.from_env({"SPEC_CONTROLLER": "static:0", "SPEC_CONTROLLER_LAZY_DRAFTER": raw,
                                 "SPEC_CONTROLLER_CATCHUP_MAX_TOKENS": "256"})
    assert cfg.lazy_drafter is on and cfg.catchup_max_tokens == 256
    assert cfg.decide_every == 4 and PluginConfig.from_env({"SPEC_CONTROLLER_DECIDE_EVERY": "1"}).decide_every == 1
    assert cfg.min_gain == 0.03 and PluginConfig.from_env({"SPEC_CONTROLLER_MIN_GAIN": "0"}).min_gain == 0.0
    assert cfg.speculate_over_off is False
    assert PluginConfig.from_env({"SPEC_CONTROLLER_SPECULATE_OVER_OFF": "1"}).speculate_over_off is True


def test_table_parsing_and_dense_form():
    assert parse_table("[[1, 4, 4], [5, 16, 2]]") == [(1, 4, 4), (5, 16, 2)]
    d = dense_table([(1, 2, 4), (5, 6, 1)], 8)  # gap 3-4 carries k=4 forward, tail carries 1
    assert [k for k, _ in d.table] == [0, 4, 4, 4, 4, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="JSON list"):
        parse_table("nonsense")


def test_version_gate(monkeypatch):
    assert check_vllm_version("0.32.0")[0]
    assert check_vllm_version("0.32.0+cpu")[0]
    ok, msg = check_vllm_version("0.99.1")
    assert not ok and "0.99.1" in msg and "SPEC_CONTROLLER_ALLOW_UNTESTED" in msg
    monkeypatch.setenv("SPEC_CONTROLLER_ALLOW_UNTESTED", "1")
    assert check_vllm_version("0.99.1")[0]
