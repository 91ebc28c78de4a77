"""Lazy drafter: with ``draft_model``, k = 0 skips the drafter's pass; k > 0 catches its KV up first.

vLLM 0.32's ``SpecDecodeBaseProposer.propose`` runs the drafter's first forward pass over every
token the target computed in the step even when the step's k is 0 ("to keep the drafter KV
cache in sync"), so "off through the controller" still pays a drafter pass per step: 2-14%
of tokens/s on this machine (``bench/bench_engine.py``, ``off (pass)`` vs ``off (ctl)``).  This
module removes that tax for the ``draft_model`` method, the one whose drafter keeps its own KV:

* a step with k = 0 does not run the drafter; each request in the batch remembers the first
  position the drafter missed (its *gap*);
* the next step with k > 0 prepends each request's missed tokens (committed tokens, read from
  the runner's token table) to the drafter's first pass, whose attention metadata is widened
  to match, so the drafter's KV is complete again before it drafts.  The drafter then sees
  exactly the context it would have seen in sync, so acceptance is unchanged; requests that
  finish while k = 0 never pay for the skipped tokens at all.
* a catch-up larger than the drafter's token buffer (or ``SPEC_CONTROLLER_CATCHUP_MAX_TOKENS``) keeps the newest tokens of each gap and
  leaves older positions stale (counted in ``dropped``): drafts may get worse, never wrong --
  the target verifies every draft, so outputs are unchanged whatever the drafter's KV holds.

On by default whenever the controller chooses k (``SPEC_CONTROLLER`` set, not ``vllm``);
``SPEC_CONTROLLER_LAZY_DRAFTER=0`` restores vLLM's behaviour.  Any error in the catch-up
falls back to vLLM's own pass for that step and is counted (``errors``).  Counters are per
process (:data:`STATS`); in-process engines (tests, benchmarks) read them directly.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from typing import Any

import numpy as np
import torch

__all__ = ["STATS", "install", "reset_stats", "set_lazy"]

log = logging.getLogger(__name__)

STATS: dict[str, int] = {}
_KEYS = ("skipped_passes", "catchup_passes", "catchup_tokens", "dropped", "errors")
_LOCK = threading.Lock()
_LIVE: weakref.WeakSet = weakref.WeakSet()  # proposers the patch manages, in this process


def reset_stats() -> None:
    for k in _KEYS:
        STATS[k] = 0


reset_stats()


def set_lazy(on: bool) -> int:
    """Switch the lazy drafter on or off in this process's managed proposers (benchmarks compare both
    on one engine); returns how many were switched.  Gaps already open are still caught up."""
    n = 0
    for prop in list(_LIVE):
        prop._spec_lazy = bool(on)
        n += 1
    return n


def _settings_from_env() -> tuple[bool, int]:
    from serving_patch.config import PluginConfig

    cfg = PluginConfig.from_env()
    return cfg.controls_k and cfg.lazy_drafter, cfg.catchup_max_tokens


def _query_starts(cad, target_positions) -> list[int]:
    """The first position of each request's query in this step."""
    return target_positions[cad.query_start_loc[:cad.num_reqs].long()].tolist()


def _catch_up(prop: Any, gaps: dict[str, int], req_ids: list[str], target_token_ids, target_positions,
              target_hidden_states, cad):
    """The first-pass inputs with each request's missed tokens in front; None when nothing is missing."""
    n = cad.num_reqs
    qsl = cad.query_start_loc_cpu.tolist()
    starts = _query_starts(cad, target_positions)
    want = [0] * n
    for i in range(n):
        g = gaps.pop(req_ids[i], None) if i < len(req_ids) else None
        if g is not None and g < starts[i]:
            want[i] = starts[i] - g
    total = sum(want)
    if total == 0:
        return None
    room = prop.max_num_tokens - int(cad.num_actual_tokens) - prop.extra_slots_per_request * n - 16
    if prop._spec_catchup_cap:
        room = min(room, prop._spec_catchup_cap)
    if total > room:  # keep the newest part of each gap; older positions stay stale (drafts worse, never wrong)
        room = max(room, 0)
        kept = [w * room // total for w in want]
        for i in sorted(range(n), key=lambda i: (want[i] * room) % total, reverse=True)[:room - sum(kept)]:
            kept[i] += 1  # largest remainders: the kept total is exactly the room
        STATS["dropped"] += total - sum(kept)
        want, total = kept, sum(kept)
        if total == 0:
            return None
    token_table = prop._spec_runner.input_batch.token_ids_cpu
    bs = prop.block_size
    ids, pos, new_q = [], [], []
    dev = target_token_ids.device
    for i in range(n):
        w = want[i]
        if w:
            p = np.arange(starts[i] - w, starts[i], dtype=np.int64)
            ids.append(torch.from_numpy(token_table[i, starts[i] - w:starts[i]].astype(np.int64)).to(
                device=dev, dtype=target_token_ids.dtype))
            pos.append(torch.from_numpy(p).to(device=dev, dtype=target_positions.dtype))
        ids.append(target_token_ids[qsl[i]:qsl[i + 1]])
        pos.append(target_positions[qsl[i]:qsl[i + 1]])
        new_q.append(qsl[i + 1] - qsl[i] + w)
    new_ids = torch.cat(ids)
    new_pos = torch.cat(pos)
    qsl_cpu = torch.zeros(n + 1, dtype=cad.query_start_loc_cpu.dtype)
    qsl_cpu[1:] = torch.tensor(new_q, dtype=qsl_cpu.dtype).cumsum(0)
    bt = cad.block_table_tensor
    req_idx = torch.repeat_interleave(torch.arange(n, device=bt.device),
                                      torch.tensor(new_q, device=bt.device))
    lpos = new_pos.long()
    slots = bt[req_idx, lpos // bs].long() * bs + lpos % bs
    new_cad = cad.replace(
        query_start_loc=qsl_cpu.to(cad.query_start_loc.device),
        query_start_loc_cpu=qsl_cpu,
        num_actual_tokens=int(cad.num_actual_tokens) + total,
        max_query_len=max(new_q),
        slot_mapping=slots.to(cad.slot_mapping.dtype),
        positions=None if cad.positions is None else new_pos,
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )
    hidden = target_hidden_states.new_zeros((new_ids.shape[0], target_hidden_states.shape[-1]))
    STATS["catchup_passes"] += 1
    STATS["catchup_tokens"] += total
    return new_ids, new_pos, hidden, new_cad


def install() -> bool:
    """Patch ``DraftModelProposer`` once per process; returns whether the patch is in place."""
    try:
        from vllm.v1.spec_decode.draft_model import DraftModelProposer
    except Exception as exc:  # noqa: BLE001 -- another vLLM layout: the plugin runs without it
        log.warning("spec-controller: lazy drafter not available (%s); k = 0 keeps vLLM's drafter pass", exc)
        return False
    with _LOCK:
        if getattr(DraftModelProposer, "_spec_lazy_hooked", False):
            return True
        orig_init = DraftModelProposer.__init__
        orig_propose = DraftModelProposer.propose

        @functools.wraps(orig_init)
        def __init__(self, *args, **kwargs):
            orig_init(self, *args, **kwargs)
            self._spec_gaps = None
            self._spec_runner = kwargs.get("runner", args[2] if len(args) > 2 else None)  # vLLM does not keep it
            self._spec_catchup_cap = 0
            try:
                on, self._spec_catchup_cap = _settings_from_env()
                if on and self._spec_runner is not None and self.needs_extra_input_slots:
                    self._spec_gaps = {}
                    self._spec_lazy = True
                    _LIVE.add(self)
            except Exception as exc:  # noqa: BLE001
                log.error("spec-controller: lazy drafter off (%s)", exc)

        @functools.wraps(orig_propose)
        def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                    next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                    *args, **kwargs):
            gaps = self._spec_gaps
            if gaps is None:
                return orig_propose(self, num_speculative_tokens, target_token_ids, target_positions,
                                    target_hidden_states, next_token_ids, token_indices_to_sample,
                                    common_attn_metadata, sampling_metadata, *args, **kwargs)
            cad = common_attn_metadata
            try:
                if num_speculative_tokens == 0 and self._spec_lazy:
                    n = cad.num_reqs
                    req_ids = self._spec_runner.input_batch.req_ids
                    for rid, s in zip(req_ids[:n], _query_starts(cad, target_positions)):
                        g = gaps.get(rid)
                        if g is None or s < g:  # (a recomputed request starts over)
                            gaps[rid] = s
                    if len(gaps) > 4 * n + 64:  # finished requests
                        live = set(self._spec_runner.requests)
                        for rid in [r for r in gaps if r not in live]:
                            del gaps[rid]
                    STATS["skipped_passes"] += 1
                    return torch.empty(cad.batch_size(), 0, device=target_token_ids.device, dtype=torch.int64)
                if gaps and num_speculative_tokens > 0:
                    got = _catch_up(self, gaps, self._spec_runner.input_batch.req_ids, target_token_ids,
                                    target_positions, target_hidden_states, cad)
                    if got is not None:
                        target_token_ids, target_positions, target_hidden_states, cad = got
                        token_indices_to_sample = None  # recomputed by the first pass from the new layout
            except Exception as exc:
                STATS["errors"] += 1
                if STATS["errors"] in (1, 10, 100):
                    log.exception("spec-controller: lazy drafter error #%d (%s)", STATS["errors"],
                                  type(exc).__name__)
                cad = common_attn_metadata
            return orig_propose(self, num_speculative_tokens, target_token_ids, target_positions,
                                target_hidden_states, next_token_ids, token_indices_to_sample,
                                cad, sampling_metadata, *args, **kwargs)

        DraftModelProposer.__init__ = __init__
        DraftModelProposer.propose = propose
        DraftModelProposer._spec_lazy_hooked = True
        return True
