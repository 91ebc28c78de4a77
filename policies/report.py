"""The evaluation report: ``report.json``, ``report.md`` and PNG plots.

Every number is measured in one run, side by side, on the same held-out windows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from policies.evaluate import EvalResult

LEARNED = "learned"
ORACLE = "oracle"
EV_ORACLE = "oracle-ev"
REFERENCES = ("nightjar", "ema", "goodput-greedy")


def _fmt(x: float, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def ratios(summary: dict) -> dict:
    """The issue's headline ratios per load scale and overall."""
    scales = sorted(summary[ORACLE])
    statics = [p for p in summary if p == "off" or p.startswith("static-")]
    tables = [p for p in summary if p.startswith("table")]
    per: dict = {}
    for s in scales:
        lrn, orc = summary[LEARNED][s], summary[ORACLE][s]
        best_static = max(statics, key=lambda p: summary[p][s]["goodput_tps"])
        row = {"learned_vs_oracle_goodput": lrn["goodput_tps"] / orc["goodput_tps"],
               "learned_vs_oracle_latency": lrn["mean_latency_s"] / orc["mean_latency_s"],
               "best_static": best_static,
               "learned_vs_best_static_goodput": lrn["goodput_tps"] / summary[best_static][s]["goodput_tps"]}
        if EV_ORACLE in summary:
            ev = summary[EV_ORACLE][s]
            row["learned_vs_oracle_ev_goodput"] = lrn["goodput_tps"] / ev["goodput_tps"]
            row["learned_vs_oracle_ev_latency"] = lrn["mean_latency_s"] / ev["mean_latency_s"]
        if tables:
            best_table = max(tables, key=lambda p: summary[p][s]["goodput_tps"])
            row["best_table"] = best_table
            row["learned_vs_best_table_goodput"] = lrn["goodput_tps"] / summary[best_table][s]["goodput_tps"]
        for ref in REFERENCES:
            if ref in summary:
                row[f"learned_vs_{ref}_goodput"] = lrn["goodput_tps"] / summary[ref][s]["goodput_tps"]
        per[s] = row

    def overall(p):  # geometric mean of goodput over load scales
        return float(np.exp(np.mean([np.log(summary[p][s]["goodput_tps"]) for s in scales])))

    tot = {"learned_vs_oracle_goodput": overall(LEARNED) / overall(ORACLE)}
    for ref in [*REFERENCES, *tables]:
        if ref in summary:
            tot[f"learned_vs_{ref}_goodput"] = overall(LEARNED) / overall(ref)
    tot["min_learned_vs_best_static_goodput"] = min(r["learned_vs_best_static_goodput"] for r in per.values())
    tot["min_learned_vs_oracle_goodput"] = min(r["learned_vs_oracle_goodput"] for r in per.values())
    tot["max_learned_vs_oracle_latency"] = max(r["learned_vs_oracle_latency"] for r in per.values())
    if EV_ORACLE in summary:
        tot["learned_vs_oracle_ev_goodput"] = overall(LEARNED) / overall(EV_ORACLE)
        tot["min_learned_vs_oracle_ev_goodput"] = min(r["learned_vs_oracle_ev_goodput"] for r in per.values())
        tot["max_learned_vs_oracle_ev_latency"] = max(r["learned_vs_oracle_ev_latency"] for r in per.values())
    return {"by_load": per, "overall": tot}


def summary_table(summary: dict) -> str:
    """Markdown table: goodput (ratio to oracle) and mean / p99 latency per policy and load."""
    scales = sorted(summary[ORACLE])
    head = "| policy | " + " | ".join(f"x{s:g} goodput tok/s (vs oracle) | mean / p99 latency s" for s in scales) + " |"
    sep = "|---|" + "---|---|" * len(scales)
    lines = [head, sep]
    for pol, by in summary.items():
        cells = []
        for s in scales:
            v, o = by[s], summary[ORACLE][s]
            cells.append(f"{v['goodput_tps']:.0f} ({v['goodput_tps'] / o['goodput_tps']:.3f})")
            cells.append(f"{v['mean_latency_s']:.2f} / {v['p99_latency_s']:.2f}")
        name = f"**{pol}**" if pol == LEARNED else pol
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def k_by_batch(results: Sequence[EvalResult], actions: list[tuple[int, int]]) -> dict:
    """Per policy: for each log2 batch bucket, the mean k and mean width chosen (over all windows)."""
    out: dict = {}
    ks = np.array([a[0] for a in actions], dtype=float)
    ws = np.array([a[1] if a[0] else 0 for a in actions], dtype=float)
    for r in results:
        acc = out.setdefault(r.policy, np.zeros_like(r.action_counts))
        acc += r.action_counts
    res = {}
    for pol, counts in out.items():
        n = counts.sum(axis=1)
        rows = {}
        for b in range(1, counts.shape[0]):
            if n[b]:
                lo, hi = 1 << (b - 1), (1 << b) - 1
                spec = counts[b][ks > 0].sum()
                rows[f"{lo}-{hi}"] = {"mean_k": float(counts[b] @ ks / n[b]),
                                      "mean_width": float(counts[b] @ ws / spec) if spec else 0.0,
                                      "off_share": float(counts[b][0] / n[b]), "steps": int(n[b])}
        res[pol] = rows
    return res


def plots(out: Path, summary: dict, kb: dict, curve: list[dict], name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    scales = sorted(summary[ORACLE])
    tab20 = plt.get_cmap("tab20").colors  # strong colours first, red kept for the learned policy
    palette = [c for i, c in enumerate(tab20) if i % 2 == 0 and i != 6] + [c for i, c in enumerate(tab20)
                                                                            if i % 2 == 1 and i != 7]
    others = [p for p in summary if p not in (LEARNED, ORACLE)]

    def style_of(pol: str) -> dict:
        if pol == LEARNED:
            return {"lw": 2.8, "color": "#d62728"}
        if pol == ORACLE:
            return {"lw": 2, "ls": "--", "color": "k"}
        return {"lw": 1.2, "color": palette[others.index(pol) % len(palette)]}

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for pol, by in summary.items():
        style = style_of(pol)
        axes[0].plot(scales, [by[s]["goodput_tps"] / summary[ORACLE][s]["goodput_tps"] for s in scales],
                     marker="o", label=pol, **style)
        axes[1].plot(scales, [by[s]["mean_latency_s"] for s in scales], marker="o", label=pol, **style)
        axes[2].plot(scales, [by[s]["p99_latency_s"] for s in scales], marker="o", label=pol, **style)
    axes[0].set_title("goodput / oracle goodput")
    axes[1].set_title("mean request latency (s)")
    axes[2].set_title("p99 request latency (s)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("load scale (x Azure arrival rate)")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(f"{name}: held-out windows")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 13), fontsize=8, frameon=False)
    fig.savefig(out / "goodput_latency_vs_load.png", dpi=110)
    plt.close(fig)
    files.append("goodput_latency_vs_load.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for pol in (LEARNED, ORACLE, "goodput-greedy"):
        if pol not in kb:
            continue
        rows = kb[pol]
        xs = list(rows)
        axes[0].plot(xs, [rows[x]["mean_k"] for x in xs], marker="o", label=pol)
        axes[1].plot(xs, [rows[x]["mean_width"] for x in xs], marker="o", label=pol)
    axes[0].set_title("mean k chosen by batch size")
    axes[1].set_title("mean tree width when speculating")
    for ax in axes:
        ax.set_xlabel("batch size")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "k_by_batch.png", dpi=110)
    plt.close(fig)
    files.append("k_by_batch.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for pol, by in summary.items():
        vals = [by[s]["accept_rate"] for s in scales]
        if all(np.isfinite(vals)):
            ax.plot(scales, vals, marker="o", label=pol, **style_of(pol))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("load scale")
    ax.set_title("accept rate (accepted / drafted tokens) vs load")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accept_rate_vs_load.png", dpi=110)
    plt.close(fig)
    files.append("accept_rate_vs_load.png")

    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([c["seconds"] for c in curve], [c["val_return"] for c in curve], marker="o")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("validation score")
        ax.set_title("training curve (validation windows)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "training_curve.png", dpi=110)
        plt.close(fig)
        files.append("training_curve.png")
    return files


def write_report(out: Path, name: str, summary: dict, results: Sequence[EvalResult], actions, curve: list[dict],
                 meta: dict, make_plots: bool = True) -> dict:
    kb = k_by_batch(results, actions)
    rat = ratios(summary)
    files = plots(out, summary, kb, curve, name) if make_plots else []
    report = {"name": name, "summary": {p: {str(s): v for s, v in by.items()} for p, by in summary.items()},
              "ratios": {"by_load": {str(s): v for s, v in rat["by_load"].items()}, "overall": rat["overall"]},
              "k_by_batch": kb, "training_curve": curve, "plots": files, **meta}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    o = rat["overall"]
    md = [f"# Controller report: {name}", "",
          f"Held-out windows (last {meta.get('test_fraction', 0.2):.0%} of the timeline, never trained on), "
          f"{meta.get('windows_per_load')} window(s) of {meta.get('window_s')} s per load scale; "
          f"machine: {meta.get('machine')}.", "",
          summary_table(summary), "",
          "## Headline ratios", "",
          f"- learned / oracle goodput: overall {_fmt(o['learned_vs_oracle_goodput'])}, worst load "
          f"{_fmt(o['min_learned_vs_oracle_goodput'])}; mean latency vs oracle worst "
          f"{_fmt(o['max_learned_vs_oracle_latency'])} (the hindsight oracle knows each step's realised draws)",
          *([f"- learned / expected-value oracle (true profiles, no draws: a causal policy's ceiling) goodput: "
             f"overall {_fmt(o['learned_vs_oracle_ev_goodput'])}, worst load "
             f"{_fmt(o['min_learned_vs_oracle_ev_goodput'])}; mean latency worst "
             f"{_fmt(o['max_learned_vs_oracle_ev_latency'])}"] if "learned_vs_oracle_ev_goodput" in o else []),
          f"- learned / max(off, best static k) goodput, worst load: {_fmt(o['min_learned_vs_best_static_goodput'])}"]
    for ref in (*REFERENCES, "table-fitted", "table-user"):
        key = f"learned_vs_{ref}_goodput"
        if key in o:
            md.append(f"- learned / {ref} goodput (geometric mean over loads): {_fmt(o[key])}")
    md += ["", "| load | learned/oracle goodput | learned/oracle latency | learned/oracle-ev goodput | "
           "learned/oracle-ev latency | best static | learned/best static |", "|---|---|---|---|---|---|---|"]
    for s, r in rat["by_load"].items():
        md.append(f"| x{s:g} | {_fmt(r['learned_vs_oracle_goodput'])} | {_fmt(r['learned_vs_oracle_latency'])} | "
                  f"{_fmt(r.get('learned_vs_oracle_ev_goodput'))} | {_fmt(r.get('learned_vs_oracle_ev_latency'))} | "
                  f"{r['best_static']} | {_fmt(r['learned_vs_best_static_goodput'])} |")
    md += ["", "## k by batch size (learned vs oracle)", "",
           "| batch | learned mean k | learned width | oracle mean k | oracle width |", "|---|---|---|---|---|"]
    for b, row in kb.get(LEARNED, {}).items():
        orc = kb.get(ORACLE, {}).get(b, {})
        md.append(f"| {b} | {row['mean_k']:.2f} | {row['mean_width']:.2f} | {_fmt(orc.get('mean_k'), 2)} | "
                  f"{_fmt(orc.get('mean_width'), 2)} |")
    md += ["", *[f"![{f}]({f})" for f in files], ""]
    (out / "report.md").write_text("\n".join(md))
    return report
