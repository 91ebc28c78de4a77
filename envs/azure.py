"""Import the Azure LLM inference trace 2023 as ``request`` records.

Source: Azure LLM inference trace 2023, conversation service (``AzureLLMInferenceTrace_conv``),
published by Microsoft under CC-BY 4.0 with Patel et al., "Splitwise: Efficient generative
LLM inference using phase splitting", ISCA 2024.  Columns:
``TIMESTAMP,ContextTokens,GeneratedTokens``.  It has real arrival times and sizes but no
speculation data; a profile completes it (:mod:`envs.synth`).

``time_scale`` sweeps load: arrival times are divided by it, so ``time_scale=2`` doubles the
arrival rate (x0.5 .. x8 in the load sweeps).  ``start_s`` / ``duration_s`` cut a window of
the *original* timeline before scaling.
"""

from __future__ import annotations

import csv
import os
from datetime import datetime
from pathlib import Path

import numpy as np

from envs.simulator import RequestArrays
from envs.trace import TraceWriter

__all__ = ["AZURE_ATTRIBUTION", "DEFAULT_AZURE_CSV", "read_azure_csv", "write_requests_trace"]

AZURE_ATTRIBUTION = (
    "Azure LLM inference trace 2023 (conversation), Microsoft, CC-BY 4.0; Patel et al., "
    "'Splitwise: Efficient generative LLM inference using phase splitting', ISCA 2024")

DEFAULT_AZURE_CSV = Path(__file__).resolve().parent.parent / "traces" / "azure" / "azure-llm-2023-conv.csv"

_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _parse_ts(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": 7 fractional digits, more than datetime takes
    date, _, frac = text.strip().partition(".")
    base = datetime.strptime(date, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def read_azure_csv(path: str | os.PathLike = DEFAULT_AZURE_CSV, *, time_scale: float = 1.0,
                   start_s: float = 0.0, duration_s: float | None = None,
                   max_prompt_tokens: int | None = None) -> RequestArrays:
    """Read the Azure CSV into :class:`RequestArrays` (arrival 0 = first request of the window).

    Rows with zero tokens are kept with 1 token (the format needs >= 1); ``max_prompt_tokens``
    clips long prompts for engines with a short context.
    """
    path = Path(path)
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0 (x2 doubles the arrival rate), got {time_scale}")
    if not path.exists():
        raise FileNotFoundError(f"Azure trace CSV {str(path)!r} does not exist; the project ships it as "
                                f"{DEFAULT_AZURE_CSV}")
    ts, ctx, gen = [], [], []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        head = next(reader, None)
        if head is None or tuple(h.strip() for h in head[:3]) != _COLUMNS:
            raise ValueError(f"{path}:1: header: expected columns {','.join(_COLUMNS)}, found {head!r}")
        for lineno, row in enumerate(reader, start=2):
            try:
                ts.append(_parse_ts(row[0]))
                ctx.append(max(1, int(row[1])))
                gen.append(max(1, int(row[2])))
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}:{lineno}: expected 'YYYY-MM-DD HH:MM:SS.fff,<int>,<int>', found "
                                 f"{','.join(row)!r} ({exc})") from None
    t = np.asarray(ts)
    t = t - t.min()
    order = np.argsort(t, kind="stable")
    t, c, g = t[order], np.asarray(ctx)[order], np.asarray(gen)[order]
    m = t >= start_s
    if duration_s is not None:
        m &= t < start_s + duration_s
    t, c, g = t[m] - start_s, c[m], g[m]
    if max_prompt_tokens is not None:
        c = np.minimum(c, max_prompt_tokens)
    return RequestArrays(t / time_scale, c, g)


def write_requests_trace(requests: RequestArrays, path: str | os.PathLike, *, max_k: int = 1,
                         widths: list[int] | None = None, notes: str = AZURE_ATTRIBUTION, **header) -> Path:
    """Write ``requests`` as an ``imported`` ``spec-trace/1`` file (request records only)."""
    with TraceWriter(path, max_k=max_k, widths=widths or [1], source="imported", notes=notes, **header) as w:
        for i, (a, p, o) in enumerate(zip(requests.arrival_s, requests.prompt_tokens, requests.output_tokens)):
            w.request(id=f"r{i}", arrival_s=float(a), prompt_tokens=int(p), output_tokens=int(o))
    return Path(path)
