"""Dashboards: the Grafana JSON is what the generator writes and is well formed; with a real
Prometheus scraping a real sidecar (and a stand-in for vLLM's /metrics), every panel's
query returns data."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from controller.client import ClientConfig, SidecarClient
from controller.sidecar.harness import PrometheusServer, rewrite_scrape_config, wait_until
from controller.sidecar.metrics import SidecarMetrics
from envs.trace import iter_trace

ROOT = Path(__file__).resolve().parents[3]
DASH = ROOT / "dashboards"
JSON_PATH = DASH / "grafana" / "spec-controller.json"
TRACE = ROOT / "traces" / "h100-llama3-8b-eagle.azure-x2.jsonl.gz"
# vLLM 0.32's own series the dashboard shows beside ours (v1 engine, prometheus_client names)
VLLM_METRICS = {"vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:request_success_total",
                "vllm:generation_tokens_total"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"dashboards_{name}", DASH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dashboard() -> dict:
    return json.loads(JSON_PATH.read_text())


def queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) for every target of every panel."""
    return [(p["title"], t["refId"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_committed_json_is_what_the_generator_writes():
    assert JSON_PATH.read_text() == _load("generate").render(), "run: python dashboards/generate.py"


def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "bargauge", "stat"}
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
    assert d["panels"][1]["title"] == "Accept rate by batch-size bucket"  # the main panel, top left
    for title, ref, expr in queries():
        assert set(re.findall(r"\$\{?\w+", expr)) <= {"$__rate_interval"}, (title, ref, expr)


def test_every_metric_in_the_dashboard_exists():
    ours = set()
    for fam in SidecarMetrics(CollectorRegistry()).registry.collect():
        ours.update(s.name for s in fam.samples)
    for title, ref, expr in queries():
        for name in re.findall(r"\b((?:spec_controller|vllm:)[a-z_:]+)", expr):
            assert name in ours | VLLM_METRICS, f"{title} {ref}: unknown metric {name}"


def test_provisioning_and_scrape_config():
    provider = (DASH / "grafana" / "provisioning" / "dashboards" / "spec-controller.yml").read_text()
    assert "type: file" in provider and "/var/lib/grafana/dashboards/spec-controller" in provider
    ds = (DASH / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "type: prometheus" in ds and "uid: prometheus" in ds
    text = (DASH / "prometheus.yml").read_text()
    assert "job_name: spec-sidecar" in text and "job_name: vllm" in text
    assert (DASH / "accept-rate-by-batch-bucket.png").stat().st_size > 10_000
    assert "dashboards/accept-rate-by-batch-bucket.png" in (ROOT / "README.md").read_text()
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    out = subprocess.run(["promtool", "check", "config", str(DASH / "prometheus.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


class FakeVllmMetrics:
    """Stands in for a vLLM server's /metrics (the real one comes with the vLLM e2e test):
    vLLM 0.32's metric names and labels, fed from the same step records."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        lab = ["model_name", "engine"]
        self.drafts = Counter("vllm:spec_decode_num_drafts", "", lab, registry=r).labels("tiny", "0")
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "", lab, registry=r).labels("tiny", "0")
        self.accepted = Counter("vllm:spec_decode_num_accepted_tokens", "", lab, registry=r).labels("tiny", "0")
        self.per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "", lab + ["position"], registry=r)
        self.running = Gauge("vllm:num_requests_running", "", lab, registry=r).labels("tiny", "0")
        self.waiting = Gauge("vllm:num_requests_waiting", "", lab, registry=r).labels("tiny", "0")
        self.success = Counter("vllm:request_success", "", lab + ["finished_reason"], registry=r).labels(
            "tiny", "0", "length")
        self.generated = Counter("vllm:generation_tokens", "", lab, registry=r).labels("tiny", "0")
        # the classic text format, always: prometheus_client's own server negotiates OpenMetrics
        # with Prometheus and then escapes "vllm:" to "vllm_" (prometheus_client 0.26)
        registry = r

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def step(self, s: dict, finished: int) -> None:
        self.drafts.inc(s["drafts"])
        self.draft_tokens.inc(s["draft_tokens"])
        self.accepted.inc(s["accepted_tokens"])
        for i, a in enumerate(s["accepted_per_pos"]):
            self.per_pos.labels("tiny", "0", str(i)).inc(a)
        self.running.set(s["batch_size"])
        self.waiting.set(s["waiting"])
        self.success.inc(finished)
        self.generated.inc(s["batch_size"] + s["accepted_tokens"])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_prometheus(start_sidecar, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is missing (Debian package `prometheus`; .ci/run installs it)")
    sidecar = start_sidecar(watch=False)
    vllm = FakeVllmMetrics()
    config = rewrite_scrape_config((DASH / "prometheus.yml").read_text(), sidecar=f"127.0.0.1:{sidecar.port}",
                                   vllm=f"127.0.0.1:{vllm.port}", scrape_interval="1s")
    records = list(iter_trace(TRACE))
    header = records[0][1]
    steps = [r for _, r in records if r["type"] == "step"][:3000]
    finish = sorted(r["finish_s"] for _, r in records if r["type"] == "request" and "finish_s" in r)
    try:
        with PrometheusServer(config, tmp_path / "prom") as prom:
            wait_until(lambda: prom.targets_up() == {"spec-sidecar": "up", "vllm": "up"}, 20, interval=0.2,
                       what="both targets up")
            wait_until(lambda: prom.query('min(count_over_time(up[1m])) >= 2'), 20, interval=0.2,
                       what="two scrapes of each target")
            cfg = ClientConfig(url=sidecar.url, engine_id="vllm-0", max_k=header["max_k"],
                               widths=tuple(header["widths"]), max_pending=len(steps))
            client = SidecarClient(cfg, start=False)
            client.lookup(1)  # a step before any decision: a reported no_decision fallback
            client.start()
            t0, seconds, done = time.monotonic(), 4.0, 0
            for i, s in enumerate(steps):
                client.lookup(s["batch_size"])
                rec = {k: v for k, v in s.items() if k != "type"}
                client.record_step(rec)
                n = 0
                while done < len(finish) and finish[done] <= s["t_s"]:
                    done, n = done + 1, n + 1
                vllm.step(rec, n)
                lag = t0 + seconds * (i + 1) / len(steps) - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            wait_until(lambda: client.stats()["pending"] == 0, 20, what="steps delivered")
            client.close()
            assert sidecar.service.engines.peek("vllm-0").steps == len(steps)
            scrapes = prom.query('count_over_time(up{job="spec-sidecar"}[1h])')[0]["value"][1]
            wait_until(lambda: float(prom.query('count_over_time(up{job="spec-sidecar"}[1h])')[0]["value"][1])
                       >= float(scrapes) + 2, 10, interval=0.2, what="two more scrapes")
            window = f"{int(time.monotonic() - t0) + 5}s"
            empty = []
            for title, ref, expr in queries():
                result = prom.query(expr.replace("$__rate_interval", window))
                values = [float(r["value"][1]) for r in result]
                if not any(math.isfinite(v) for v in values):
                    empty.append((title, ref, expr, result))
            assert not empty, "queries without data:\n" + "\n".join(map(str, empty))
            # the ratio Prometheus computes is the one in the records
            drafted = sum(s["draft_tokens"] for s in steps)
            accepted = sum(s["accepted_tokens"] for s in steps)
            ratio = prom.query(f"sum(increase(spec_controller_accepted_tokens_total[{window}])) / "
                               f"sum(increase(spec_controller_draft_tokens_total[{window}]))")
            assert float(ratio[0]["value"][1]) == pytest.approx(accepted / drafted, rel=0.02)
            fb = prom.query('sum(spec_controller_fallbacks_total{reason="no_decision"})')
            assert float(fb[0]["value"][1]) >= 1
            png = _load("plot_main_panel").plot(prom.query, tmp_path / "main.png", window)
            assert png.stat().st_size > 10_000
    finally:
        vllm.stop()
