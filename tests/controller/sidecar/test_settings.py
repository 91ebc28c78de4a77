"""Settings: one typed object, env vars, loopback by default, token when exposed; the CLI."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from controller.sidecar.cli import main
from controller.sidecar.settings import SidecarSettings, is_loopback

from .conftest import TOKEN


def test_defaults_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEC_SIDECAR_POLICY", str(tmp_path / "p.json"))
    monkeypatch.setenv("SPEC_SIDECAR_PORT", "9999")
    monkeypatch.setenv("SPEC_SIDECAR_WATCH", "false")
    s = SidecarSettings()
    assert (s.host, s.port, s.watch, s.token) == ("127.0.0.1", 9999, False, None)


def test_policy_is_required(monkeypatch):
    monkeypatch.delenv("SPEC_SIDECAR_POLICY", raising=False)
    with pytest.raises(ValidationError, match="policy"):
        SidecarSettings()


@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True),
                                     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("myhost", False)])
def test_loopback(host, ok):
    assert is_loopback(host) is ok


def test_exposed_needs_a_long_token():
    with pytest.raises(ValidationError, match="needs a token"):
        SidecarSettings(policy="p.json", host="0.0.0.0")
    with pytest.raises(ValidationError, match="at least 16"):
        SidecarSettings(policy="p.json", host="0.0.0.0", token="short")
    s = SidecarSettings(policy="p.json", host="0.0.0.0", token=TOKEN)
    assert s.token_required and TOKEN not in repr(s)


def test_unknown_setting_refused():
    with pytest.raises(ValidationError, match="Extra inputs"):
        SidecarSettings(policy="p.json", prot=1)


def test_cli_refuses_bad_settings_and_missing_policy(tmp_path, capsys):
    assert main(["--policy", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--policy", "p.json", "--host", "0.0.0.0"]) == 2
    assert "needs a token" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["--policy", str(tmp_path / "bad.json")]) == 2
    assert "schema" in capsys.readouterr().err
