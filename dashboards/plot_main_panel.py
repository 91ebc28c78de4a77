"""Plot the dashboard's main panel (accept rate by batch-size bucket) from real Prometheus data.

    # from a running Prometheus that scrapes a sidecar
    python dashboards/plot_main_panel.py --prometheus http://127.0.0.1:9090 --window 30m
    # self-contained: a real sidecar and a real Prometheus on loopback, a shipped trace
    # replayed through the engine-side client, then the plot (writes the PNG beside this file)
    python dashboards/plot_main_panel.py --demo traces/h100-llama3-8b-eagle.azure-x2.jsonl.gz

The bars are the main panel's PromQL (``generate.PANELS[1]``) evaluated by Prometheus, with
``$__rate_interval`` replaced by the window; the dots are the mean chosen k per bucket (the
"Chosen k by batch-size bucket" panel) on the right axis.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import generate

PNG = HERE / "accept-rate-by-batch-bucket.png"


def panel_expr(title: str, window: str) -> str:
    for t, _kind, _unit, _grid, queries, _desc in generate.PANELS:
        if t == title:
            return queries[0][0].replace("$__rate_interval", window)
    raise KeyError(title)


def http_query(base_url: str):
    def query(expr: str) -> list[dict]:
        url = f"{base_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus: {body}")
        return body["data"]["result"]

    return query


def bucket_text(label: str) -> str:
    """``"002-003"`` -> ``"2-3"``, ``"256+"`` stays."""
    plus = "+" if label.endswith("+") else ""
    return "-".join(str(int(p)) for p in label.rstrip("+").split("-")) + plus


def plot(query, out: Path, window: str, note: str = "") -> Path:
    """``query(expr) -> Prometheus result list``; writes the PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accept = {r["metric"]["bucket"]: float(r["value"][1])
              for r in query(panel_expr("Accept rate by batch-size bucket", window))}
    mean_k = {r["metric"]["bucket"]: float(r["value"][1])
              for r in query(panel_expr("Chosen k by batch-size bucket", window))}
    drafted = {r["metric"]["bucket"]: float(r["value"][1]) for r in query(
        f"sum by (bucket) (increase(spec_controller_draft_tokens_total[{window}]))")}
    buckets = sorted(b for b in accept if not math.isnan(accept[b]))
    if not buckets:
        raise RuntimeError("no accept-rate data in Prometheus for that window")
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    xs = range(len(buckets))
    bars = ax.bar(xs, [accept[b] for b in buckets], color="#3274D9", label="accept rate (accepted / drafted)")
    for x, b, bar in zip(xs, buckets, bars):
        ax.text(x, bar.get_height() + 0.01, f"{accept[b]:.2f}\n{drafted.get(b, 0):.0f} drafted", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [bucket_text(b) for b in buckets])
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("decoding batch size (bucket)")
    ax.set_ylabel("accept rate")
    ax2 = ax.twinx()
    ax2.plot(list(xs), [mean_k.get(b, float("nan")) for b in buckets], "o-", color="#E0752D",
             label="mean k run (right)")
    ax2.set_ylabel("mean k")
    ax2.set_ylim(0, max([v for v in mean_k.values() if not math.isnan(v)] + [1]) * 1.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title("Accept rate by batch-size bucket (Prometheus, window " + window + ")" + (f"\n{note}" if note
                                                                                           else ""), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def demo(trace: str, out: Path, seconds: float = 20.0) -> Path:
    """Replay a trace's steps through the real client into a real sidecar, scraped by a real
    Prometheus, then plot."""
    from controller.artifact import PolicyArtifact
    from controller.client import ClientConfig, SidecarClient
    from controller.features import FeatureSpec
    from controller.sidecar.app import create_app
    from controller.sidecar.harness import PrometheusServer, ServerThread, rewrite_scrape_config, wait_until
    from controller.sidecar.settings import SidecarSettings
    from envs.trace import iter_trace

    steps = [r for _, r in iter_trace(trace) if r["type"] == "step"]
    header = next(iter_trace(trace))[1]
    tmp = Path(tempfile.mkdtemp(prefix="spec-demo-"))
    art = PolicyArtifact.random(FeatureSpec(max_num_seqs=256, max_k=header["max_k"]),
                                [(0, 1)] + [(k, 1) for k in range(1, header["max_k"] + 1)], seed=0)
    policy = art.save(tmp / "policy.json")
    with ServerThread(create_app(SidecarSettings(policy=policy, watch=False))) as srv:
        config = rewrite_scrape_config((HERE / "prometheus.yml").read_text(), sidecar=f"127.0.0.1:{srv.port}",
                                       scrape_interval="1s")
        with PrometheusServer(config, tmp / "prom") as prom:
            cfg = ClientConfig(url=srv.url, engine_id="demo", max_k=header["max_k"], widths=tuple(header["widths"]),
                               max_pending=len(steps))
            with SidecarClient(cfg) as client:
                client.wait_for_decision(10)
                # the counters must have a sample from before the replay, or rate() misses its start
                wait_until(lambda: prom.query('count_over_time(up{job="spec-sidecar"}[1m]) >= 2'), 30,
                           interval=0.2, what="two scrapes of the sidecar")
                t0 = time.monotonic()
                for i, s in enumerate(steps):
                    client.lookup(s["batch_size"])
                    client.record_step({k: v for k, v in s.items() if k != "type"})
                    lag = t0 + seconds * (i + 1) / len(steps) - time.monotonic()
                    if lag > 0:
                        time.sleep(lag)
                wait_until(lambda: client.stats()["pending"] == 0, 30, what="steps delivered")
                stats = client.stats()
            if stats["dropped_steps"] or sum(stats["errors"].values()):
                raise RuntimeError(f"the replay lost steps: {stats}")
            got = srv.config.app.state.service.engines.peek("demo").steps
            if got != len(steps):
                raise RuntimeError(f"the sidecar saw {got} of {len(steps)} steps")
            time.sleep(3)  # a few more scrapes
            window = f"{int(time.monotonic() - t0) + 5}s"
            return plot(prom.query, out, window, note=f"{len(steps):,} steps of {Path(trace).name} replayed "
                                                      f"through the client into a live sidecar")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prometheus", help="base URL of a Prometheus scraping the sidecar")
    g.add_argument("--demo", metavar="TRACE", help="replay this spec-trace/1 file into a live sidecar + Prometheus")
    ap.add_argument("--window", default="30m", help="range for rate() with --prometheus")
    ap.add_argument("--seconds", type=float, default=20.0, help="replay duration with --demo")
    ap.add_argument("--out", type=Path, default=PNG)
    args = ap.parse_args(argv)
    if args.demo:
        path = demo(args.demo, args.out, args.seconds)
    else:
        path = plot(http_query(args.prometheus), args.out, args.window)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
