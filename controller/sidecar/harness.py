"""Real servers on loopback for tests, the benchmark and the dashboard plot.

- :class:`ServerThread` runs an ASGI app under a real uvicorn server in a thread
  (``127.0.0.1``, a free port, or a Unix socket);
- :class:`SidecarProcess` runs ``python -m controller.sidecar.cli`` as a child process
  (so it can be killed and restarted on the same port);
- :class:`PrometheusServer` runs the real ``prometheus`` binary with a scrape config and
  answers PromQL through its HTTP API.

Every wait is bounded; only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

__all__ = ["PrometheusServer", "ServerThread", "SidecarProcess", "free_port", "http_json", "rewrite_scrape_config",
           "wait_until"]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:g} s")
        time.sleep(interval)


def http_json(method: str, port: int | None, path: str, body: Any = None, headers: dict | None = None,
              timeout: float = 5.0, raw: bytes | None = None, uds: str | None = None) -> tuple[int, Any]:
    """One request to ``127.0.0.1:port`` (or a Unix socket); returns (status, decoded JSON or text)."""
    if uds:
        from controller.client import _UnixHTTPConnection

        conn = _UnixHTTPConnection(uds, timeout)
    else:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text.decode(errors="replace")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a running child and wait for it; SIGKILL it if it has not exited within ``timeout``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class ServerThread:
    """A real uvicorn server for ``app`` in a background thread."""

    def __init__(self, app, *, port: int = 0, uds: str | None = None, log_level: str = "warning"):
        import uvicorn

        self.config = uvicorn.Config(app, host=LOOPBACK, port=port, uds=uds, log_level=log_level,
                                     access_log=False, lifespan="on", timeout_keep_alive=75)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.port: int | None = None
        self.uds = uds

    def start(self, timeout: float = 10.0) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout, what="uvicorn start")
        if not self.server.started:
            raise RuntimeError("uvicorn did not start (see its log above)")
        if self.uds is None:
            self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"unix://{self.uds}" if self.uds else f"http://{LOOPBACK}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SidecarProcess:
    """``spec-sidecar`` as a child process on a fixed loopback port (restartable after a kill)."""

    def __init__(self, policy: str | os.PathLike, port: int | None = None, *, uds: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.policy = str(policy)
        self.port = port or free_port()
        self.uds = uds
        self.extra_args = extra_args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()

    def start(self, timeout: float = 30.0) -> SidecarProcess:
        where = ["--uds", self.uds] if self.uds else ["--host", LOOPBACK, "--port", str(self.port)]
        cmd = [sys.executable, "-m", "controller.sidecar.cli", "--policy", self.policy, *where,
               "--log-level", "warning", *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=Path(__file__).resolve().parents[2])
        atexit.register(self.stop)  # never leave a sidecar behind, whatever happens to the caller

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"spec-sidecar exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                return http_json("GET", self.port, "/readyz", timeout=1.0, uds=self.uds)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout, interval=0.1, what="spec-sidecar /readyz")
        return self

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as when the process dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


DEFAULT_TARGETS = {"sidecar": "127.0.0.1:8731", "vllm": "127.0.0.1:8000"}


def rewrite_scrape_config(text: str, *, sidecar: str | None = None, vllm: str | None = None,
                          scrape_interval: str | None = None) -> str:
    """``dashboards/prometheus.yml`` with its default targets (sidecar 127.0.0.1:8731, vLLM
    127.0.0.1:8000) and scrape interval replaced, so a test scrapes with the shipped config."""
    for key, addr in (("sidecar", sidecar), ("vllm", vllm)):
        if addr is not None:
            if DEFAULT_TARGETS[key] not in text:
                raise ValueError(f"the scrape config has no {DEFAULT_TARGETS[key]} target to replace")
            text = text.replace(DEFAULT_TARGETS[key], addr)
    if scrape_interval is not None:
        text = text.replace("scrape_interval: 5s", f"scrape_interval: {scrape_interval}").replace(
            "evaluation_interval: 5s", f"evaluation_interval: {scrape_interval}")
    return text


class PrometheusServer:
    """The real Prometheus binary on a loopback port with a given scrape config."""

    def __init__(self, config_text: str, workdir: str | os.PathLike, *, binary: str | None = None):
        self.binary = binary or shutil.which("prometheus")
        if self.binary is None:
            raise FileNotFoundError("the `prometheus` binary is not installed (Debian: apt-get install prometheus)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(config_text)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "prometheus.log"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address={LOOPBACK}:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                return http_json("GET", self.port, "/-/ready", timeout=1.0)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout, interval=0.1, what="prometheus /-/ready")
        return self

    def api(self, path: str, **params: Any) -> Any:
        status, body = http_json("GET", self.port, f"/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10)
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: HTTP {status}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets_up(self) -> dict[str, str]:
        return {t["labels"]["job"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
