"""Benchmark: streaming validation vs. column loading of a large ``spec-trace/1`` file.

What is measured
    1. A synthetic trace of about ``--mb`` MB (default 100) is written to a temporary
       directory: a header (``max_k=4``, ``widths=[1]``), a few hundred ``request`` records
       through :class:`envs.trace.TraceWriter`, then ``step`` records with random but valid
       values from a seeded numpy rng, serialised in bulk with ``json.dumps`` and appended
       to the file (TraceWriter validates each record, which would dominate the write time).
       The generation time is printed.
    2. In a separate subprocess per operation (so that the peak RSS belongs to that one
       operation):

       * ``validate``: :func:`envs.trace.validate_files` (streams line by line; must report
         no errors, so the generated file is checked too);
       * ``load``: :func:`envs.trace.load_trace` (builds numpy columns).

       Each subprocess records ``ru_maxrss`` right after its imports as a baseline, runs
       the operation once, and reports wall time and ``ru_maxrss`` minus the baseline.
       Linux carries ``ru_maxrss`` across fork/exec, so the launching process stays small
       (stdlib only; the generation runs in a subprocess too) and its own peak is printed.

    The table gives the file's size on disk, the operation, seconds, lines/s, MB/s of
    uncompressed JSON text, the peak RSS increase and its ratio to the on-disk file size.
    With ``--gz`` a gzip-compressed copy (level 6) is measured as well.

How to run
    python bench/bench_trace_stream.py            # 100 MB plain file
    python bench/bench_trace_stream.py --gz       # plain file and a gzip copy
    python bench/bench_trace_stream.py --mb 20    # smaller file
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_line  # noqa: E402

MAX_K = 4
WIDTHS = [1]
N_REQUESTS = 400
CHUNK_STEPS = 20_000


# --------------------------------------------------------------------------- machine


# --------------------------------------------------------------------------- generation


def _step_lines(rng, n: int, t0: float) -> tuple[list[str], float]:
    """``n`` valid step lines starting at time ``t0``; returns the lines and the next step time."""
    import numpy as np

    batch = rng.integers(1, 257, n)
    k = rng.integers(0, MAX_K + 1, n)
    spec = k > 0
    drafts = np.where(spec, batch, 0)
    draft_tokens = drafts * k                       # width 1: drafts * k * width
    acc = np.zeros((n, MAX_K), dtype=np.int64)
    prev = drafts
    for i in range(MAX_K):                          # non-increasing, acc[0] <= drafts
        prev = rng.binomial(prev, 0.75)
        acc[:, i] = np.where(i < k, prev, 0)
    accepted = acc.sum(axis=1)
    prefill = np.where(rng.random(n) < 0.3, rng.integers(1, 4097, n), 0)
    waiting = rng.integers(0, 40, n)
    kv = np.round(rng.uniform(0.0, 1.0, n), 5)
    step_ms = np.round(rng.uniform(8.0, 60.0, n), 4)
    t = np.round(t0 + np.concatenate(([0.0], np.cumsum(step_ms[:-1]) / 1000.0)), 6)
    t_next = float(t[-1] + step_ms[-1] / 1000.0)

    cols = [c.tolist() for c in (t, batch, prefill, waiting, kv, k, drafts, draft_tokens, accepted, step_ms)]
    acc_rows = acc.tolist()
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    lines = []
    for (ts, b, pf, wt, kvu, kk, d, dt, a, ms), row in zip(zip(*cols), acc_rows):
        lines.append(dumps({"type": "step", "t_s": ts, "batch_size": b, "prefill_tokens": pf, "waiting": wt,
                            "kv_usage": kvu, "k": kk, "width": 1, "drafts": d, "draft_tokens": dt,
                            "accepted_tokens": a, "accepted_per_pos": row[:kk], "step_ms": ms}) + "\n")
    return lines, t_next


def write_trace(path: Path, target_mb: float, seed: int) -> dict:
    """Write a synthetic trace of about ``target_mb`` MB; return size and line counts."""
    import numpy as np

    from envs.trace import TraceWriter

    rng = np.random.default_rng(seed)
    arrivals = np.round(np.cumsum(rng.exponential(0.5, N_REQUESTS)), 6).tolist()
    prompts = rng.integers(16, 4000, N_REQUESTS).tolist()
    outputs = rng.integers(16, 1000, N_REQUESTS).tolist()
    with TraceWriter(path, max_k=MAX_K, widths=WIDTHS, source="synthetic", notes="bench_trace_stream") as w:
        for i in range(N_REQUESTS):
            w.request(id=f"r{i}", arrival_s=arrivals[i], prompt_tokens=prompts[i], output_tokens=outputs[i])
    lines = 1 + N_REQUESTS
    target = int(target_mb * 1e6)
    size = path.stat().st_size
    t = 0.0
    with open(path, "a", encoding="utf-8", newline="\n") as fh:
        while size < target:
            chunk, t = _step_lines(rng, CHUNK_STEPS, t)
            # trim the last chunk so the file lands near the target size
            room = target - size
            text = "".join(chunk)
            if len(text) > room:
                avg = len(text) / len(chunk)
                chunk = chunk[: max(1, int(room / avg) + 1)]
                text = "".join(chunk)
            fh.write(text)
            size += len(text)          # ASCII only: characters == bytes
            lines += len(chunk)
    return {"bytes": path.stat().st_size, "lines": lines, "steps": lines - 1 - N_REQUESTS}


def gzip_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, gzip.open(dst, "wb", compresslevel=6) as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)


# --------------------------------------------------------------------------- subprocesses
# Linux carries ru_maxrss across fork/exec, so a child's baseline can be no lower than its
# parent's RSS.  The parent therefore imports nothing heavy and never holds trace data: the
# generation and every measured operation run in their own subprocess.


def child(op: str, path: str, mb: float, seed: int) -> None:
    """Run one operation and print a JSON result line (called in a fresh interpreter)."""
    import resource

    if op == "generate":
        t0 = time.perf_counter()
        info = write_trace(Path(path), mb, seed)
        print(json.dumps({"seconds": time.perf_counter() - t0, **info}))
        return
    if op == "gzip":
        t0 = time.perf_counter()
        gzip_copy(Path(path), Path(path + ".gz"))
        print(json.dumps({"seconds": time.perf_counter() - t0}))
        return

    from envs.trace import load_trace, validate_files

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if op == "validate":
        errors = sum(len(v) for v in validate_files([path]).values())
        extra = {"errors": errors}
    elif op == "load":
        trace = load_trace(path)
        extra = {"errors": 0, "steps": trace.n_steps, "requests": trace.n_requests}
    else:
        raise SystemExit(f"unknown operation {op!r}")
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # kilobytes on Linux
    print(json.dumps({"op": op, "seconds": seconds, "base_kb": base_kb, "peak_kb": peak_kb, **extra}))


def run_child(op: str, path: Path, mb: float = 0.0, seed: int = 0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", op, str(path), "--mb", str(mb), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{op} on {path} failed (rc={proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100.0, help="target size of the plain trace in MB (default 100)")
    ap.add_argument("--gz", action="store_true", help="also measure a gzip-compressed copy")
    ap.add_argument("--seed", type=int, default=0, help="rng seed for the synthetic values (default 0)")
    ap.add_argument("--dir", default=None, help="directory for the temporary files (default: system temp)")
    ap.add_argument("--child", nargs=2, metavar=("OP", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        child(*args.child, args.mb, args.seed)
        return 0

    import resource

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="bench_trace_", dir=args.dir) as tmp:
        plain = Path(tmp) / "synthetic.jsonl"
        info = run_child("generate", plain, args.mb, args.seed)
        gen_s = info["seconds"]
        text_mb = info["bytes"] / 1e6
        print(f"generated {plain.name}: {text_mb:.1f} MB, {info['lines']:,} lines "
              f"({N_REQUESTS} requests, {info['steps']:,} steps) in {gen_s:.1f} s ({text_mb / gen_s:.1f} MB/s)")
        files = [plain]
        if args.gz:
            r = run_child("gzip", plain)
            gz = Path(str(plain) + ".gz")
            print(f"compressed {gz.name}: {gz.stat().st_size / 1e6:.1f} MB in {r['seconds']:.1f} s")
            files.append(gz)
        print()

        header = (f"{'file':<20} {'size MB':>8} {'operation':<10} {'seconds':>8} {'lines/s':>10} {'MB/s':>7} "
                  f"{'peak RSS +MB':>12} {'RSS/size':>9}")
        print(header)
        print("-" * len(header))
        failed = False
        bases = []
        for path in files:
            size_mb = path.stat().st_size / 1e6
            for op in ("validate", "load"):
                r = run_child(op, path)
                rss_mb = (r["peak_kb"] - r["base_kb"]) * 1024 / 1e6
                bases.append(r["base_kb"] * 1024 / 1e6)
                print(f"{path.name:<20} {size_mb:>8.1f} {op:<10} {r['seconds']:>8.2f} "
                      f"{info['lines'] / r['seconds']:>10,.0f} {text_mb / r['seconds']:>7.1f} "
                      f"{rss_mb:>12.1f} {rss_mb / size_mb:>9.3f}", flush=True)
                if r["errors"]:
                    print(f"  !! {op} reported {r['errors']} errors", flush=True)
                    failed = True
                if op == "load" and r.get("steps") != info["steps"]:
                    print(f"  !! load_trace read {r.get('steps')} steps, expected {info['steps']}", flush=True)
                    failed = True
        parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
        print()
        print("MB/s is uncompressed JSON text per second; RSS/size is the peak RSS increase over the on-disk size;")
        print(f"baseline ru_maxrss after imports: {min(bases):.1f}-{max(bases):.1f} MB per subprocess "
              f"(launcher's own peak {parent_mb:.1f} MB).")
        if parent_mb >= min(bases):
            print("  !! the launcher's peak RSS reaches the subprocess baseline: increases may be understated")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
