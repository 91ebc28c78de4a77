"""The engine-side client: step path never blocks; fallbacks when the sidecar is down, slow or
answering garbage; recovery when it returns."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from controller.client import ClientConfig, SidecarClient
from controller.sidecar.harness import SidecarProcess, free_port, http_json, wait_until

from .conftest import make_policy, random_steps, step

FAST = dict(timeout_s=0.2, stale_after_s=0.3, max_age_s=1.0, backoff_s=(0.02, 0.1))


def run_engine(client: SidecarClient, n: int, step_s: float = 0.002, max_num_seqs: int = 64):
    """A stand-in engine loop: lookup at schedule time, record after the step.  Returns the
    actions and the slowest step-path call (seconds)."""
    actions, worst = [], 0.0
    for i, s in enumerate(random_steps(n, seed=7)):
        t0 = time.perf_counter()
        k, w = client.lookup(s["batch_size"])
        t1 = time.perf_counter()
        client.record_step(dict(s, t_s=time.monotonic()))
        worst = max(worst, t1 - t0, time.perf_counter() - t1)
        actions.append((k, w))
        time.sleep(step_s)
    return actions, worst


def test_follows_the_sidecar_and_reports(sidecar):
    cfg = ClientConfig(url=sidecar.url, engine_id="eng", max_k=4, widths=(1, 2), **FAST)
    with SidecarClient(cfg) as c:
        assert c.wait_for_decision(5)
        actions, worst = run_engine(c, 100)
        wait_until(lambda: c.stats()["pending"] == 0 and sidecar.service.engines.peek("eng").steps == 100, 5,
                   what="all steps delivered")
        st = c.stats()
        assert st["version"] == "v1" and sum(st["errors"].values()) == 0
        assert worst < 0.025, f"a step-path call took {worst * 1e3:.2f} ms"
        entry = sidecar.service.engines.peek("eng")
        for b in (1, 10, 40, 64):
            assert c.lookup(b) == c.decision.lookup(b)
        assert entry.steps == 100
        # a new policy reaches the client through the periodic refresh, with no step sent
        assert sidecar.call("PUT", "/v1/policy", make_policy("v2", seed=3).to_dict())[0] == 200
        wait_until(lambda: c.stats()["version"] == "v2", 3, what="client picks up v2")


def test_sidecar_down_from_the_start(tmp_path):
    cfg = ClientConfig(url=f"http://127.0.0.1:{free_port()}", engine_id="e", static=(1, 1), max_pending=50, **FAST)
    with SidecarClient(cfg) as c:
        actions, worst = run_engine(c, 80, step_s=0.001)
    assert set(actions) == {(1, 1)} and worst < 0.025
    st = c.stats()  # after close: no batch in flight
    assert st["fallbacks"]["no_decision"] == 80 and st["errors"]["connect"] >= 1
    assert st["pending"] == 50 and st["dropped_steps"] == 80 - 50


class _Garbage(BaseHTTPRequestHandler):
    answers: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = self.answers[min(self.server.calls, len(self.answers) - 1)]
        self.server.calls += 1
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def garbage_server():
    servers = []

    def start(answers):
        handler = type("H", (_Garbage,), {"answers": answers})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.calls = 0
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


GOOD = json.dumps({"engine_id": "e", "version": "good", "max_num_seqs": 3,
                   "runs": [[0, 0, 0, 1], [1, 3, 2, 1]], "fallback": None}).encode()


@pytest.mark.parametrize("bad,kind", [
    ((200, b"not json at all"), "bad_response"),
    ((200, json.dumps({"version": "x", "runs": [[0, 5, 9, 1]]}).encode()), "bad_response"),  # k=9 > max_k
    ((200, json.dumps({"version": "x", "runs": [[1, 5, 2, 1]]}).encode()), "bad_response"),  # gap at 0
    ((200, json.dumps({"version": 3, "runs": [[0, 5, 2, 1]]}).encode()), "bad_response"),
    ((200, json.dumps({"version": "x", "runs": [[0, 5, 2, 4]]}).encode()), "bad_response"),  # width 4
    ((500, b"Internal Server Error"), "http_status"),
    ((422, b'{"detail": []}'), "http_status"),
])
def test_garbage_answers_keep_the_last_good_decision(garbage_server, bad, kind):
    srv = garbage_server([(200, GOOD), bad])
    cfg = ClientConfig(url=f"http://127.0.0.1:{srv.server_port}", engine_id="e", max_k=4, widths=(1,),
                       static=(0, 1), **{**FAST, "stale_after_s": 5.0, "max_age_s": 10.0})
    with SidecarClient(cfg) as c:
        assert c.wait_for_decision(5)
        actions, _ = run_engine(c, 30)
        wait_until(lambda: c.stats()["errors"][kind] >= 1, 5, what=f"{kind} counted")
        assert c.lookup(2) == (2, 1) and c.decision.version == "good"
        assert set(actions) <= {(2, 1), (0, 1)}


def test_slow_sidecar_times_out_and_never_blocks_a_step():
    """A server that accepts and never answers: calls time out, lookups stay instant."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    stop = threading.Event()
    held = []

    def accept():
        lsock.settimeout(0.05)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        cfg = ClientConfig(url=f"http://127.0.0.1:{lsock.getsockname()[1]}", engine_id="e", static=(3, 1),
                           **{**FAST, "timeout_s": 0.05})
        with SidecarClient(cfg) as c:
            actions, worst = run_engine(c, 100, step_s=0.002)
            assert set(actions) == {(3, 1)} and worst < 0.025
            assert c.stats()["errors"]["timeout"] >= 1
    finally:
        stop.set()
        t.join(2)
        for s in held:
            s.close()
        lsock.close()


def test_stale_then_expired(garbage_server):
    srv = garbage_server([(200, GOOD), (500, b"down")])
    cfg = ClientConfig(url=f"http://127.0.0.1:{srv.server_port}", engine_id="e", max_k=4, static=(0, 1),
                       timeout_s=0.2, stale_after_s=0.1, max_age_s=0.4, backoff_s=(0.05, 0.05))
    with SidecarClient(cfg) as c:
        assert c.wait_for_decision(5)
        time.sleep(0.2)
        assert c.lookup(2) == (2, 1) and c.stats()["fallbacks"]["stale"] == 1
        time.sleep(0.4)
        assert c.lookup(2) == (0, 1) and c.stats()["fallbacks"]["expired"] == 1


def test_client_fallbacks_reach_the_sidecar_metrics(sidecar):
    cfg = ClientConfig(url=sidecar.url, engine_id="e", **FAST)
    c = SidecarClient(cfg, start=False)
    for _ in range(3):
        c.lookup(4)  # before any decision: no_decision
    c.start()
    try:
        c.record_step(step())
        wait_until(lambda: sidecar.value("spec_controller_fallbacks_total", reason="no_decision") == 3, 5,
                   what="fallbacks reported")
    finally:
        c.close()


def test_unix_socket_transport(start_sidecar, tmp_path):
    from controller.sidecar.app import create_app
    from controller.sidecar.harness import ServerThread
    from controller.sidecar.settings import SidecarSettings

    sock = str(tmp_path / "s.sock")
    policy = make_policy().save(tmp_path / "p.json")
    with ServerThread(create_app(SidecarSettings(policy=policy, uds=sock)), uds=sock):
        with SidecarClient(ClientConfig(url=f"unix://{sock}", engine_id="u", **FAST)) as c:
            assert c.wait_for_decision(5) and c.stats()["version"] == "v1"
            assert http_json("GET", None, "/readyz", uds=sock)[0] == 200


@pytest.mark.slow
def test_sidecar_killed_mid_run_then_back(tmp_path):
    """SIGKILL the sidecar process while an engine runs: every step still gets an action (the
    last good table, then the static one), and the client recovers when it is back."""
    policy = make_policy("v1").save(tmp_path / "policy.json")
    proc = SidecarProcess(policy).start()
    errors: list = []
    actions: list = []
    stop = threading.Event()
    cfg = ClientConfig(url=f"http://127.0.0.1:{proc.port}", engine_id="killed", max_k=4, widths=(1, 2),
                       static=(1, 1), timeout_s=0.2, stale_after_s=0.2, max_age_s=0.6, backoff_s=(0.02, 0.2))
    client = SidecarClient(cfg)

    def engine():
        steps = random_steps(200, seed=11)
        i = 0
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            s = steps[i % len(steps)]
            try:
                actions.append(client.lookup(s["batch_size"]))
                client.record_step(dict(s, t_s=time.monotonic()))
            except Exception as exc:
                errors.append(exc)
            i += 1
            time.sleep(0.003)

    t = threading.Thread(target=engine)
    try:
        assert client.wait_for_decision(10)
        t.start()
        wait_until(lambda: client.stats()["calls_ok"] > 20, 10, what="warm-up calls")
        proc.kill()
        killed_at = len(actions)
        wait_until(lambda: client.stats()["fallbacks"]["expired"] > 0, 10, what="static fallback after max_age")
        assert client.stats()["fallbacks"]["stale"] > 0
        assert client.stats()["errors"]["connect"] > 0
        ok_before = client.stats()["calls_ok"]
        proc.start()  # same port
        wait_until(lambda: client.stats()["calls_ok"] > ok_before + 5, 15, what="client recovers")
        wait_until(lambda: client.stats()["age_s"] < cfg.stale_after_s, 5, what="fresh decision")
        stop.set()
        t.join(10)
        assert not errors, errors[:3]
        assert len(actions) > killed_at + 10
        assert all(isinstance(k, int) and isinstance(w, int) for k, w in actions)
        status, engines = http_json("GET", proc.port, "/v1/engines")
        assert status == 200 and engines[0]["engine_id"] == "killed" and engines[0]["steps"] > 0
        text = http_json("GET", proc.port, "/metrics")[1]
        assert 'spec_controller_fallbacks_total{reason="expired"}' in text
        expired = float(next(ln.split()[-1] for ln in text.splitlines()
                             if ln.startswith('spec_controller_fallbacks_total{reason="expired"}')))
        assert expired > 0, "the outage's fallbacks are reported to the restarted sidecar"
    finally:
        stop.set()
        client.close()
        proc.stop()


def test_finished_requests_ride_with_the_steps_and_survive_an_outage(start_sidecar, tmp_path):
    """record_request queues request records; they go with the next call, are re-queued when the
    sidecar refuses the connection, and end up in the sidecar's recording in arrival order."""
    port = free_port()
    cfg = ClientConfig(url=f"http://127.0.0.1:{port}", engine_id="rq", max_k=4, widths=(1,), **FAST)
    steps = random_steps(40, seed=5)
    with SidecarClient(cfg) as c:
        for i, s in enumerate(steps[:20]):  # the sidecar is not up yet: refused, kept
            c.record_step(dict(s, t_s=0.05 * i))
            if i % 4 == 3:
                c.record_request({"id": f"r{i}", "arrival_s": 0.01 * i, "prompt_tokens": 9, "output_tokens": 3,
                                  "finish_s": 0.05 * i})
        wait_until(lambda: c.stats()["errors"]["connect"] > 0, 5, what="a refused connection")
        assert c.stats()["pending_requests"] == 5
        sc = start_sidecar(record_dir=tmp_path / "rec", port=port)
        for i, s in enumerate(steps[20:], start=20):
            c.record_step(dict(s, t_s=0.05 * i))
            if i % 4 == 3:
                c.record_request({"id": f"r{i}", "arrival_s": 0.01 * i, "prompt_tokens": 9, "output_tokens": 3})
            time.sleep(0.002)
        wait_until(lambda: sc.value("spec_controller_recorded_requests_total") == 10, 10,
                   what="all requests recorded")
        assert c.stats()["dropped_requests"] == 0
    sc.server.stop()
    from envs.trace import load_trace

    (path,) = sorted((tmp_path / "rec" / "rq").glob("*.jsonl"))
    t = load_trace(path)
    assert t.n_requests == 10 and t.n_steps == 40
    assert list(t.requests["arrival_s"]) == sorted(t.requests["arrival_s"])
