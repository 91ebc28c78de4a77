"""Lazy drafter: with ``draft_model``, k = 0 skips the drafter's pass; k > 0 catches its KV up first.

vLLM 0.32's ``SpecDecodeBaseProposer.propose`` runs the drafter's first forward pass over every
token the target computed in the step even when the step's k is 0 ("to keep the drafter KV
cache in sync"), so "off through the controller" still pays a drafter pass per step: 2-14%
of tokens/s on this machine (``bench/bench_engine.py``, ``off (vllm)`` vs ``off (ctl)``).  This
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

The runner side of k = 0 (any method, patched on ``GPUModelRunner``, which vLLM's CPU runner
inherits): vLLM 0.32 takes its speculative path at every step once a ``speculative_config``
exists, drafts or not.  Two pieces of it are skipped when they have nothing to do:

* a step that verifies no drafts (``max_spec_len == 0``) samples with the plain sampler instead
  of the rejection sampler, which would draw the same tokens from the same logits through a
  copy of them (``plain_samples``);
* a step whose next k is 0 skips the runner's proposer bookkeeping (``next_token_ids``, the
  padded drafter inputs, ngram's matcher); ``draft_model`` notes its gaps from the target's own
  metadata, which at that point equal the padded ones (``skipped_proposals``).

Both only with synchronous scheduling (vLLM's CPU platform; async scheduling keeps vLLM's
path, whose bookkeeping feeds the next step) and, for the sampler, when no request asks for
logprobs or carries a thinking budget (both lay out their state per speculative row).

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
_KEYS = ("skipped_passes", "catchup_passes", "catchup_tokens", "dropped", "errors", "plain_samples",
         "skipped_proposals")
_LOCK = threading.Lock()
_LIVE: weakref.WeakSet = weakref.WeakSet()  # proposers the patch manages, in this process
_RUNNERS: weakref.WeakSet = weakref.WeakSet()  # model runners whose k = 0 steps take the plain path


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
    for runner in list(_RUNNERS):
        runner._spec_plain = bool(on)
    return n


def _settings_from_env() -> tuple[bool, int]:
    from serving_patch.config import PluginConfig

    cfg = PluginConfig.from_env()
    return cfg.controls_k and cfg.lazy_drafter, cfg.catchup_max_tokens


def _note_gaps(prop: Any, cad, target_positions) -> None:
    """A step without the drafter's pass: each request remembers the first position the drafter missed."""
    gaps = prop._spec_gaps
    n = cad.num_reqs
    req_ids = prop._spec_runner.input_batch.req_ids
    for rid, s in zip(req_ids[:n], _query_starts(cad, target_positions)):
        g = gaps.get(rid)
        if g is None or s < g:  # (a recomputed request starts over)
            gaps[rid] = s
    if len(gaps) > 4 * n + 64:  # finished requests
        live = set(prop._spec_runner.requests)
        for rid in [r for r in gaps if r not in live]:
            del gaps[rid]
    STATS["skipped_passes"] += 1


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
    """Patch ``DraftModelProposer`` and ``GPUModelRunner`` once per process; returns whether both are in place."""
    proposer = _install_proposer()
    return _install_runner() and proposer


def _install_proposer() -> bool:
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
                    _note_gaps(self, cad, target_positions)
                    return torch.empty(cad.batch_size(), 0, device=target_token_ids.device, dtype=torch.int64)
                if gaps and num_speculative_tokens > 0:
                    got = _catch_up(self, gaps, self._spec_runner.input_batch.req_ids, target_token_ids,
                                    target_positions, target_hidden_states, cad)
                    if got is not None:
                        target_token_ids, target_positions, target_hidden_states, cad = got
                        token_indices_to_sample = None  # recomputed by the first pass from the new layout
            except Exception as exc:  # noqa: BLE001 -- vLLM's own pass for this step
                _count_error(exc, "lazy drafter")
                cad = common_attn_metadata
            return orig_propose(self, num_speculative_tokens, target_token_ids, target_positions,
                                target_hidden_states, next_token_ids, token_indices_to_sample,
                                cad, sampling_metadata, *args, **kwargs)

        DraftModelProposer.__init__ = __init__
        DraftModelProposer.propose = propose
        DraftModelProposer._spec_lazy_hooked = True
    return True


def _count_error(exc: Exception, what: str) -> None:
    STATS["errors"] += 1
    if STATS["errors"] in (1, 10, 100):
        log.exception("spec-controller: %s error #%d (%s)", what, STATS["errors"], type(exc).__name__)


def _install_runner() -> bool:
    """Patch ``GPUModelRunner`` so steps with nothing to draft or verify take vLLM's plain path."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception as exc:  # noqa: BLE001 -- another vLLM layout: k = 0 keeps vLLM's speculative path
        log.warning("spec-controller: plain k = 0 steps not available (%s)", exc)
        return False
    with _LOCK:
        if getattr(GPUModelRunner, "_spec_plain_hooked", False):
            return True
        orig_init = GPUModelRunner.__init__
        orig_sample = GPUModelRunner._sample
        orig_propose = GPUModelRunner.propose_draft_token_ids

        @functools.wraps(orig_init)
        def __init__(self, *args, **kwargs):
            orig_init(self, *args, **kwargs)
            self._spec_plain = False
            try:
                on, _ = _settings_from_env()
                if on and self.speculative_config is not None and not self.use_async_scheduling:
                    self._spec_plain = True
                    _RUNNERS.add(self)
            except Exception as exc:  # noqa: BLE001
                log.error("spec-controller: plain k = 0 steps off (%s)", exc)

        @functools.wraps(orig_sample)
        def _sample(self, logits, spec_decode_metadata):
            if (spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0
                    and getattr(self, "_spec_plain", False)):
                meta = self.input_batch.sampling_metadata
                budget = getattr(meta, "thinking_budget_state_holder", None)  # (counts spec layouts itself)
                if (meta.max_num_logprobs is None and not meta.logprob_token_ids
                        and (budget is None or not budget.has_tracked_requests())):
                    STATS["plain_samples"] += 1
                    return orig_sample(self, logits, None)
            return orig_sample(self, logits, spec_decode_metadata)

        @functools.wraps(orig_propose)
        def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                    sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                                    common_attn_metadata, *args, **kwargs):
            if scheduler_output.num_spec_tokens_to_schedule == 0 and getattr(self, "_spec_plain", False):
                try:
                    got = _skip_proposal(self, scheduler_output, sampled_token_ids, common_attn_metadata)
                    if got is not None:
                        STATS["skipped_proposals"] += 1
                        return got
                except Exception as exc:  # noqa: BLE001 -- vLLM's own path for this step
                    _count_error(exc, "plain k = 0 step")
            return orig_propose(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                                common_attn_metadata, *args, **kwargs)

        GPUModelRunner.__init__ = __init__
        GPUModelRunner._sample = _sample
        GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
        GPUModelRunner._spec_plain_hooked = True
    return True


def _skip_proposal(runner: Any, scheduler_output: Any, sampled_token_ids: Any, cad: Any):
    """The empty proposal of a k = 0 step, without vLLM's bookkeeping; None where vLLM's path is needed."""
    spec = runner.speculative_config
    if spec.method == "ngram":  # stateless: nothing to keep
        return [[] for _ in range(len(sampled_token_ids))]
    prop = runner.drafter
    if (spec.uses_draft_model() and getattr(prop, "_spec_gaps", None) is not None and prop._spec_lazy
            and not spec.disable_padded_drafter_batch):
        _note_gaps(prop, cad, runner._get_positions(scheduler_output.total_num_scheduled_tokens))
        return torch.empty(cad.batch_size(), 0, device=cad.query_start_loc.device, dtype=torch.int64)
    return None
