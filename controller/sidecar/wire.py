"""The decision's wire form, shared by the sidecar and the engine-side client (stdlib only).

A decision table (ARCHITECTURE.md contract 4) travels as runs
``[first_batch, last_batch, k, width]`` covering ``0..max_num_seqs`` in order; batch sizes
past the end use the last run.  Runs keep the response small (a 257-entry table is a
handful of runs) and cheap to parse in the engine's background thread.

    >>> runs_from_table(((0, 1), (3, 1), (3, 1), (1, 1)))
    [[0, 0, 0, 1], [1, 2, 3, 1], [3, 3, 1, 1]]
    >>> table_from_runs([[0, 0, 0, 1], [1, 2, 3, 1], [3, 3, 1, 1]])
    ((0, 1), (3, 1), (3, 1), (1, 1))
"""

from __future__ import annotations

__all__ = ["runs_from_table", "table_from_runs"]

MAX_TABLE = 1 << 16


def runs_from_table(table) -> list[list[int]]:
    out: list[list[int]] = []
    prev = None
    for b, a in enumerate(table):
        if a is not prev and a != prev:  # identity first: a table repeats the same action tuples
            if out:
                out[-1][1] = b - 1
            out.append([b, b, int(a[0]), int(a[1])])
            prev = a
    if out:
        out[-1][1] = len(table) - 1
    return out


def table_from_runs(runs) -> tuple[tuple[int, int], ...]:
    """Expand runs; raises ValueError unless they are int quadruples covering ``0..n`` in order."""
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"runs must be a non-empty list, found {type(runs).__name__}")
    table: list[tuple[int, int]] = []
    for run in runs:
        if not (isinstance(run, list) and len(run) == 4 and all(type(x) is int for x in run)):
            raise ValueError(f"a run is [first_batch, last_batch, k, width] (ints), found {run!r}")
        lo, hi, k, w = run
        if lo != len(table) or hi < lo or hi >= MAX_TABLE:
            raise ValueError(f"runs must cover 0..max_num_seqs in order; run {run} after batch {len(table) - 1}")
        table.extend([(k, w)] * (hi - lo + 1))
    return tuple(table)
