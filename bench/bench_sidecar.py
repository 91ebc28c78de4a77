"""Sidecar benchmark: decide latency (sequential and open-loop at 1k req/s) and the engine's
per-step cost with the sidecar client, side by side with the embedded mode.

    python bench/bench_sidecar.py [--rate 1000] [--seconds 10] [--quick]

Targets (issue 5): sidecar p99 < 2 ms at 1k req/s on loopback; engine-side per-step cost
< 100 us p99 (1% of a 10 ms step).  The sidecar runs as its own process (``spec-sidecar``,
one uvicorn worker, uvloop + httptools), as deployed.  The open-loop generator runs in
another process and sends each request at its scheduled time over 8 keep-alive connections;
latency counts from the scheduled time, so a stalled server cannot hide queueing
(no coordinated omission).  The policy is an MLP with two hidden layers of 64 (SB3's
default net_arch) over 257 batch sizes.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy: one BLAS thread,
    os.environ.setdefault(_var, "1")                                       # as the sidecar and the engine run

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine_line

from controller.artifact import PolicyArtifact
from controller.client import ClientConfig, SidecarClient
from controller.features import FeatureSpec, FeatureState
from controller.sidecar.harness import SidecarProcess
from controller.sidecar.schemas import StepRecord
from controller.sidecar.store import EngineEntry, PolicySnapshot, decide, decide_runs, fold_steps, load_snapshot

ACTIONS = [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]


def make_step(i: int, rng: np.random.Generator) -> dict:
    b = int(rng.integers(1, 200))
    k = int(rng.integers(0, 5))
    drafts = b if k else 0
    app = sorted((int(rng.integers(0, drafts + 1)) for _ in range(k)), reverse=True) if k else []
    return {"t_s": i * 0.01, "batch_size": b, "prefill_tokens": 0, "waiting": int(rng.integers(0, 20)),
            "kv_usage": 0.3, "k": k, "width": 1, "drafts": drafts, "draft_tokens": drafts * k,
            "accepted_tokens": sum(app), "accepted_per_pos": app, "step_ms": float(rng.uniform(5, 30))}


def pct(a, q) -> float:
    return float(np.percentile(np.asarray(a), q))


# ---------------------------------------------------------------------------- embedded


def bench_embedded(snap: PolicySnapshot, steps: list[dict], n: int, fast: bool) -> np.ndarray:
    """Per-step cost in the engine process: fold the step, recompute the table, look up.
    ``fast``: the sidecar's own path (:func:`decide_runs`), else ``PolicyArtifact.decision``."""
    entry = EngineEntry(FeatureState(snap.spec))
    recs = [StepRecord.model_validate(s) for s in steps]
    out = np.empty(n)
    for i in range(n):
        s = recs[i % len(recs)]
        t0 = time.perf_counter_ns()
        fold_steps(entry, [s])
        if fast:
            decide_runs(snap, entry)
        else:
            decide(snap, entry).lookup(s.batch_size)
        out[i] = time.perf_counter_ns() - t0
    return out / 1e3  # us


# ---------------------------------------------------------------------------- sequential


def bench_sequential(port: int | None, uds: str | None, steps: list[dict], n: int) -> np.ndarray:
    if uds:
        from controller.client import _UnixHTTPConnection

        conn = _UnixHTTPConnection(uds, 5.0)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    conn.connect()
    out = np.empty(n)
    hdr = {"Content-Type": "application/json"}
    for i in range(n):
        body = json.dumps({"engine_id": "seq", "steps": [steps[i % len(steps)]]}).encode()
        t0 = time.perf_counter_ns()
        conn.request("POST", "/v1/decide", body, hdr)
        r = conn.getresponse()
        r.read()
        out[i] = time.perf_counter_ns() - t0
        assert r.status == 200, r.status
    conn.close()
    return out / 1e6  # ms


# ---------------------------------------------------------------------------- open loop


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the load generator: requests are written at their
    scheduled time, responses matched in order (no pipelining beyond what queues up)."""

    def __init__(self, lat: np.ndarray, lat_sent: np.ndarray):
        self.lat, self.lat_sent = lat, lat_sent
        self.inflight: list[tuple[int, float, float]] = []
        self.buf = b""
        self.errors = 0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def send(self, i: int, t_sched: float, request: bytes) -> None:
        self.inflight.append((i, t_sched, time.perf_counter()))
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            pos = head.lower().find(b"content-length:")
            length = int(head[pos + 15:].split(b"\r\n", 1)[0]) if pos >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            i, t_sched, t_sent = self.inflight.pop(0)
            now = time.perf_counter()
            self.lat[i] = now - t_sched
            self.lat_sent[i] = now - t_sent
            if not head.startswith(b"HTTP/1.1 200"):
                self.errors += 1


async def _open_loop(port: int, rate: float, seconds: float, conns: int, steps: list[dict]) -> dict:
    n = int(rate * seconds)
    requests = []
    for i in range(min(n, 4096)):
        body = json.dumps({"engine_id": f"ol-{i % conns}", "steps": [steps[i % len(steps)]]}).encode()
        requests.append(b"POST /v1/decide HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    lat = np.full(n, np.nan)
    lat_sent = np.full(n, np.nan)
    loop = asyncio.get_running_loop()
    protos = []
    for _ in range(conns):
        _, proto = await loop.create_connection(lambda: _Conn(lat, lat_sent), "127.0.0.1", port)
        protos.append(proto)
    await asyncio.sleep(0.2)
    start = time.perf_counter() + 0.05
    for i in range(n):
        t_sched = start + i / rate
        delay = t_sched - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # the connection with the fewest requests in flight (an idle one when there is one)
        min(protos, key=lambda c: len(c.inflight)).send(i, t_sched, requests[i % len(requests)])
    deadline = time.perf_counter() + 30
    while any(c.inflight for c in protos) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    for c in protos:
        c.transport.close()
    ok = lat[~np.isnan(lat)] * 1e3
    ok_sent = lat_sent[~np.isnan(lat_sent)] * 1e3
    return {"sent": n, "done": int(ok.size), "errors": sum(c.errors for c in protos) + (n - int(ok.size)),
            "rate": n / elapsed, "p50": pct(ok, 50), "p99": pct(ok, 99), "max": float(ok.max()),
            "p99_sent": pct(ok_sent, 99)}


def _open_loop_proc(port, rate, seconds, conns, steps, out_q):
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out_q.put(asyncio.run(_open_loop(port, rate, seconds, conns, steps)))


def _get(q, proc, timeout: float):
    """The child's result; fails fast if it died instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return q.get(timeout=0.5)
        except Exception:
            if not proc.is_alive():
                raise RuntimeError(f"the load generator exited with {proc.exitcode}") from None
    raise TimeoutError("the load generator did not finish")


def bench_open_loop(port: int, rate: float, seconds: float, steps: list[dict], conns: int = 8) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_open_loop_proc, args=(port, rate, seconds, conns, steps, q))
    p.start()
    res = _get(q, p, seconds + 60)
    p.join(30)
    return res


# ---------------------------------------------------------------------------- engine loop


def bench_engine_client(url: str, steps: list[dict], n: int, step_s: float,
                        busy_s: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """A simulated engine: each step holds the GIL for ``busy_s`` (scheduling work), then
    sleeps the rest of ``step_s`` (the GPU); the step path is lookup + record_step.  Returns
    its wall time and its thread CPU time per step (the CPU time leaves out preemption by
    other processes on a shared machine)."""
    client = SidecarClient(ClientConfig(url=url, engine_id="engine-bench", max_k=4, widths=(1,)))
    client.wait_for_decision(10.0)
    wall = np.empty(n)
    cpu = np.empty(n)
    for i in range(n):
        s = steps[i % len(steps)]
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        client.lookup(s["batch_size"])
        t1 = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        end = time.perf_counter() + busy_s
        while time.perf_counter() < end:  # the engine's own Python work
            pass
        c2 = time.thread_time_ns()
        t2 = time.perf_counter_ns()
        client.record_step(s)
        t3 = time.perf_counter_ns()
        c3 = time.thread_time_ns()
        wall[i] = (t1 - t0) + (t3 - t2)
        cpu[i] = (c1 - c0) + (c3 - c2)
        time.sleep(max(0.0, step_s - busy_s))
    stats = client.stats()
    client.close()
    return wall / 1e3, cpu / 1e3, stats  # us


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3, help="open-loop runs (the machine may be shared)")
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    args = ap.parse_args(argv)
    q = args.quick
    seconds = 2.0 if q else args.seconds
    print(machine_line("no torch (numpy forward pass)", f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}",
                       f"load average {os.getloadavg()[0]:.2f} at start"))
    rng = np.random.default_rng(0)
    steps = [make_step(i, rng) for i in range(512)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    art = PolicyArtifact.random(FeatureSpec(max_num_seqs=256, max_k=4), ACTIONS, hidden=(64, 64), seed=0)
    policy = art.save(tmp / "policy.json")
    snap = load_snapshot(policy.read_bytes(), str(policy))

    emb_art = bench_embedded(snap, steps, 500 if q else 5000, fast=False)
    emb = bench_embedded(snap, steps, 500 if q else 5000, fast=True)
    print(f"policy: MLP 12-64-64-{len(ACTIONS)}, table over batch 0..256\n")
    print(f"{'embedded mode per step: fold + artifact.decision + lookup':58s} p50 {pct(emb_art, 50):8.1f} us   "
          f"p99 {pct(emb_art, 99):8.1f} us")
    print(f"{'embedded mode per step: fold + decide_runs (sidecar path)':58s} p50 {pct(emb, 50):8.1f} us   "
          f"p99 {pct(emb, 99):8.1f} us")

    sock = str(tmp / "sidecar.sock")
    tcp = SidecarProcess(policy).start()
    uds = SidecarProcess(policy, uds=sock)
    try:
        n_seq = 300 if q else 3000
        seq_tcp = bench_sequential(tcp.port, None, steps, n_seq)[n_seq // 10:]
        print(f"{'sidecar decide, sequential, HTTP keep-alive TCP loopback':58s} p50 {pct(seq_tcp, 50):8.3f} ms   "
              f"p99 {pct(seq_tcp, 99):8.3f} ms")
        uds.start()
        seq_uds = bench_sequential(None, sock, steps, n_seq)[n_seq // 10:]
        print(f"{'sidecar decide, sequential, HTTP over Unix socket':58s} p50 {pct(seq_uds, 50):8.3f} ms   "
              f"p99 {pct(seq_uds, 99):8.3f} ms")
        uds.stop()
        for low in ([] if q else [args.rate / 4, args.rate / 2]):  # where the knee is on this machine now
            ol = bench_open_loop(tcp.port, low, 5.0, steps)
            print(f"{f'sidecar decide, open loop {low:.0f} req/s x 5 s, 8 conns':58s} "
                  f"p50 {ol['p50']:8.3f} ms   p99 {ol['p99']:8.3f} ms   max {ol['max']:.2f} ms   "
                  f"(achieved {ol['rate']:.0f} req/s, {ol['errors']} errors, load avg {os.getloadavg()[0]:.2f})")
        runs = []
        for r in range(1 if q else args.repeat):
            ol = bench_open_loop(tcp.port, args.rate, seconds, steps)
            runs.append(ol)
            print(f"{f'sidecar decide, open loop {args.rate:.0f} req/s x {seconds:g} s, 8 conns, run {r + 1}':58s} "
                  f"p50 {ol['p50']:8.3f} ms   p99 {ol['p99']:8.3f} ms   max {ol['max']:.2f} ms   "
                  f"(from the actual send: p99 {ol['p99_sent']:.3f} ms; achieved {ol['rate']:.0f} req/s, "
                  f"{ol['errors']} errors, load avg {os.getloadavg()[0]:.2f})")
        ol = sorted(runs, key=lambda x: x["p99"])[len(runs) // 2]  # the median run
        n_eng = 300 if q else 3000
        eng, eng_cpu, st = bench_engine_client(f"http://127.0.0.1:{tcp.port}", steps, n_eng, step_s=0.002,
                                               busy_s=0.0002)
        eng, eng_cpu = eng[n_eng // 10:], eng_cpu[n_eng // 10:]
        print(f"{'engine per-step cost, sidecar client (lookup + record_step)':58s} p50 {pct(eng, 50):8.1f} us   "
              f"p99 {pct(eng, 99):8.1f} us   max {eng.max():.1f} us   (thread CPU time: p50 "
              f"{pct(eng_cpu, 50):.1f} us, p99 {pct(eng_cpu, 99):.1f} us; includes 4 clock reads)")
        print(f"   client over the run: {st['calls_ok']} calls ok, errors {sum(st['errors'].values())}, "
              f"fallbacks {st['fallbacks']}, dropped {st['dropped_steps']}")
    finally:
        tcp.stop()
        uds.stop()

    print("\nratios (side by side, same run):")
    print(f"  engine per-step p99: embedded / sidecar client = {pct(emb, 99) / pct(eng, 99):6.1f}x "
          f"(sidecar client {pct(eng, 99):.1f} us vs embedded {pct(emb, 99):.1f} us, fast path)")
    print(f"  engine per-step p50: embedded / sidecar client = {pct(emb, 50) / pct(eng, 50):6.1f}x")
    print(f"  embedded: artifact.decision / decide_runs p50 = {pct(emb_art, 50) / pct(emb, 50):5.2f}x")
    print(f"  decide p50: TCP / Unix socket = {pct(seq_tcp, 50) / pct(seq_uds, 50):5.2f}x")
    print("\ntargets:")
    print(f"  sidecar p99 at {args.rate:.0f} req/s < 2 ms (median of {len(runs)} runs): {ol['p99']:.3f} ms -> "
          f"{'PASS' if ol['p99'] < 2 and ol['rate'] > 0.95 * args.rate and not ol['errors'] else 'FAIL'}")
    print(f"  engine per-step client cost p99 < 100 us: {pct(eng, 99):.1f} us -> "
          f"{'PASS' if pct(eng, 99) < 100 else 'FAIL'}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (other processes on the machine inflate tails)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
