"""The sidecar's settings: one typed object, from environment variables or the CLI.

Every field reads ``SPEC_SIDECAR_<NAME>`` (``SPEC_SIDECAR_POLICY=/srv/policy.json``); the
CLI (:mod:`controller.sidecar.cli`) overrides them.  The only required field is the policy
artifact.  The server binds to loopback by default; binding anywhere else without a token
is refused, because ``PUT /v1/policy`` would let anyone on the network swap the policy.

    >>> s = SidecarSettings(policy="policy.json")
    >>> s.host, s.port, s.token_required
    ('127.0.0.1', 8731, False)
    >>> try:
    ...     SidecarSettings(policy="p.json", host="0.0.0.0")
    ... except ValueError as exc:
    ...     print("refused:", "needs a token" in str(exc))
    refused: True
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["SidecarSettings", "is_loopback"]


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` and ``localhost`` are loopback; anything else (``0.0.0.0`` included) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SidecarSettings(BaseSettings):
    """Settings of one sidecar (one per vLLM server).  Checked at construction."""

    model_config = SettingsConfigDict(env_prefix="SPEC_SIDECAR_", extra="forbid", validate_default=True)

    policy: Path = Field(description="policy artifact (spec-policy/1 JSON) served at start; required")
    host: str = Field("127.0.0.1", description="bind address; loopback unless a token is set")
    port: int = Field(8731, ge=0, le=65535, description="TCP port (0 = any free port)")
    uds: Path | None = Field(None, description="serve on this Unix socket instead of TCP")
    token: SecretStr | None = Field(None, description="bearer token for mutating endpoints (PUT /v1/policy)")
    watch: bool = Field(True, description="reload the policy file when it changes")
    watch_interval_s: float = Field(1.0, gt=0, le=3600, description="how often the policy file is checked")
    engine_ttl_s: float = Field(60.0, gt=0, description="an engine seen within this window counts as connected")
    max_engines: int = Field(1024, ge=1, description="per-engine feature states kept (least recently seen evicted)")
    max_steps_per_request: int = Field(1024, ge=1, le=65536, description="step records one decide call may carry")
    record_dir: Path | None = Field(None, description="record received steps as spec-trace/1 files here")
    record_max_steps: int = Field(100_000, ge=1, description="rotate a recording file after this many steps")
    record_max_age_s: float = Field(3600.0, gt=0, description="rotate a recording file after this many seconds")
    record_keep: int = Field(48, ge=1, description="recording files kept per engine (oldest deleted)")
    record_gzip: bool = Field(False, description="compress recordings (.jsonl.gz); a killed sidecar leaves a "
                                                 "truncated last file, so plain .jsonl is the default")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")

    @property
    def token_required(self) -> bool:
        return self.token is not None

    @model_validator(mode="after")
    def _exposed_needs_token(self) -> SidecarSettings:
        if self.uds is None and not is_loopback(self.host) and self.token is None:
            raise ValueError(f"host={self.host!r} is beyond loopback, so PUT /v1/policy needs a token: set "
                             f"SPEC_SIDECAR_TOKEN (or --token-file) or bind to 127.0.0.1")
        if self.token is not None and len(self.token.get_secret_value()) < 16:
            raise ValueError("token must be at least 16 characters (e.g. `python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'`)")
        return self
