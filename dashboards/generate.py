"""Generate the Grafana dashboard JSON (``grafana/spec-controller.json``) from code.

    python dashboards/generate.py          # write it
    python dashboards/generate.py --check  # exit 1 if the committed JSON differs

The dashboard is plain data built here (no Grafana library is installable in this
environment, and the JSON model is stable): one function per panel kind, every query in
:data:`PANELS`.  ``tests/controller/sidecar/test_dashboards.py`` checks the structure, that
the committed file is what this script writes, and -- against a real Prometheus scraping a
real sidecar -- that every query returns data.

Queries use Grafana's ``$__rate_interval`` and the ``datasource`` variable only; the
metrics are documented in :mod:`controller.sidecar.metrics` (ours) and vLLM's
``vllm:spec_decode_*`` / ``vllm:num_requests_*`` series (the engine's own, shown beside).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "grafana" / "spec-controller.json"
UID = "spec-controller"
DS = {"type": "prometheus", "uid": "${datasource}"}
R = "[$__rate_interval]"


def rate(metric: str, by: str | None = None) -> str:
    inner = f"rate({metric}{R})"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def ratio(num: str, den: str, join: str = "") -> str:
    """``num / (den > 0)``: no value (rather than NaN) where nothing was counted."""
    return f"{num} /{join} ({den} > 0)"


# (title, kind, unit, grid (x, y, w, h), [(expr, legend), ...], description)
PANELS: list[tuple] = [
    ("Speculation vs load", "row", None, (0, 0, 24, 1), [], ""),
    ("Accept rate by batch-size bucket", "bargauge", "percentunit", (0, 1, 12, 9),
     [(ratio(rate("spec_controller_accepted_tokens_total", "bucket"),
             rate("spec_controller_draft_tokens_total", "bucket")), "{{bucket}}")],
     ("Draft tokens accepted / proposed, by the decoding batch size of the step. The main panel: "
      "acceptance as load changes.")),
    ("Accept rate vs load over time", "timeseries", "percentunit", (12, 1, 12, 9),
     [(f"{rate('spec_controller_accepted_tokens_total')} / ({rate('spec_controller_draft_tokens_total')} > 0)",
       "accept rate"),
      (f"{rate('spec_controller_batch_size_sum')} / ({rate('spec_controller_batch_size_count')} > 0)",
       "mean batch size (right)"),
      (rate("vllm:request_success_total"), "vLLM requests/s (right)")],
     "Acceptance beside the load: mean decoding batch size and the vLLM server's finished requests per second."),
    ("Chosen k by batch-size bucket", "timeseries", "short", (0, 10, 12, 8),
     [(f"{rate('spec_controller_spec_len_total', 'bucket')} / ({rate('spec_controller_steps_total', 'bucket')} > 0)",
       "{{bucket}}")],
     "Mean speculative length the engine ran, per batch-size bucket, over time (0 = off)."),
    ("Decisions by (k, width)", "timeseries", "reqps", (12, 10, 12, 8),
     [(rate("spec_controller_decisions_total", "k, width"), "k={{k}} w={{width}}")],
     "Decisions served, by the action they give at the engine's current batch size."),
    ("Throughput", "row", None, (0, 18, 24, 1), [], ""),
    ("Goodput (committed tokens/s)", "timeseries", "short", (0, 19, 12, 8),
     [(rate("spec_controller_committed_tokens_total"), "committed tokens/s (controller)"),
      (rate("vllm:generation_tokens_total"), "generation tokens/s (vLLM)")],
     "Tokens committed per second (batch + accepted drafts), beside vLLM's own generation counter."),
    ("Step time by k", "timeseries", "s", (12, 19, 12, 8),
     [(f"histogram_quantile(0.5, {rate('spec_controller_step_seconds_bucket', 'le, k')})", "p50 k={{k}}"),
      (f"histogram_quantile(0.99, {rate('spec_controller_step_seconds_bucket', 'le, k')})", "p99 k={{k}}")],
     "Engine step wall time by the speculative length it ran."),
    ("Controller health", "row", None, (0, 27, 24, 1), [], ""),
    ("Decision latency (inside the sidecar)", "timeseries", "s", (0, 28, 8, 8),
     [(f"histogram_quantile(0.5, {rate('spec_controller_decision_seconds_bucket', 'le')})", "p50"),
      (f"histogram_quantile(0.99, {rate('spec_controller_decision_seconds_bucket', 'le')})", "p99")],
     "Time to fold the steps and compute the table; the engine never waits for it (pipelined)."),
    ("Fallbacks and client errors", "timeseries", "short", (8, 28, 8, 8),
     [(rate("spec_controller_fallbacks_total", "reason"), "fallback {{reason}}"),
      (rate("spec_controller_client_errors_total", "kind"), "error {{kind}}")],
     "Engine steps that ran without a fresh decision, by reason, and failed calls the clients reported."),
    ("Engines and policy", "stat", "short", (16, 28, 8, 8),
     [("sum(spec_controller_engines_connected)", "engines connected"),
      ("count by (version) (spec_controller_policy_info)", "policy {{version}}"),
      (f"sum(increase(spec_controller_policy_reloads_total{{result=\"refused\"}}{R}))", "reloads refused")],
     "Engines that called recently, the policy version serving, refused reloads."),
    ("vLLM engine", "row", None, (0, 36, 24, 1), [], ""),
    ("vLLM draft acceptance", "timeseries", "percentunit", (0, 37, 8, 8),
     [(ratio(rate("vllm:spec_decode_num_accepted_tokens_total"), rate("vllm:spec_decode_num_draft_tokens_total")),
       "accepted / drafted (vLLM)"),
      (f"{rate('spec_controller_accepted_tokens_total')} / ({rate('spec_controller_draft_tokens_total')} > 0)",
       "accepted / drafted (controller)")],
     "vLLM's own counters beside the controller's: they should agree."),
    ("vLLM acceptance per draft position", "timeseries", "percentunit", (8, 37, 8, 8),
     [(ratio(rate("vllm:spec_decode_num_accepted_tokens_per_pos_total", "position"),
             rate("vllm:spec_decode_num_drafts_total"), join=" on() group_left()"), "position {{position}}")],
     "Fraction of drafts whose position i was accepted."),
    ("vLLM requests running / waiting", "timeseries", "short", (16, 37, 8, 8),
     [("sum(vllm:num_requests_running)", "running"), ("sum(vllm:num_requests_waiting)", "waiting")],
     "The engine's scheduler state."),
]


def _fieldconfig(unit: str | None, kind: str) -> dict:
    defaults: dict = {"unit": unit or "short"}
    if unit == "percentunit":
        defaults.update(min=0, max=1)
    overrides = []
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "spanNulls": True}
        overrides.append({"matcher": {"id": "byRegexp", "options": ".*\\(right\\)"},
                          "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                         {"id": "unit", "value": "short"}, {"id": "min"}, {"id": "max"}]})
    return {"defaults": defaults, "overrides": overrides}


def panel(pid: int, title: str, kind: str, unit: str | None, grid, queries, description: str) -> dict:
    x, y, w, h = grid
    p: dict = {"id": pid, "type": kind, "title": title, "gridPos": {"x": x, "y": y, "w": w, "h": h}}
    if kind == "row":
        p.update(collapsed=False, panels=[])
        return p
    p["datasource"] = DS
    p["description"] = description
    p["fieldConfig"] = _fieldconfig(unit, kind)
    instant = kind in ("bargauge", "stat")
    p["targets"] = [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                     "range": not instant, "instant": instant} for i, (expr, legend) in enumerate(queries)]
    if kind == "bargauge":
        p["options"] = {"orientation": "vertical", "displayMode": "gradient", "showUnfilled": True,
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    elif kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "textMode": "value_and_name", "colorMode": "value"}
    else:
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    return p


def build() -> dict:
    return {
        "uid": UID,
        "title": "Speculative decoding controller",
        "description": "Learned speculation controller (spec-controller sidecar) beside the vLLM engine: "
                       "acceptance vs load, chosen k, goodput, decision latency, fallbacks.",
        "tags": ["vllm", "speculative-decoding", "spec-controller"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
                                 "options": []}]},
        "panels": [panel(i + 1, *spec) for i, spec in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write (or --check) dashboards/grafana/spec-controller.json")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python dashboards/generate.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
