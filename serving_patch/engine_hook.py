"""The scheduler hook: the controller chooses k for every engine step; the recorder sees it.

vLLM 0.32 already varies k per step: ``Scheduler.schedule`` sets
``SchedulerOutput.num_spec_tokens_to_schedule = self.dynamic_sd_lookup[batch_size]`` (a
dense list built from ``num_speculative_tokens_per_batch_size``), the proposer drafts that
many tokens per request and the rejection sampler verifies any count up to
``num_speculative_tokens``.  The hook replaces that list with :class:`ControlledLookup`,
whose ``__getitem__`` indexes the controller's newest table (ARCHITECTURE.md contract 4):
the per-step critical path is a list index, a clock read and the exploration draw
(~0.5 us, measured into :attr:`StepController.choose_ns`).  A new table comes from the
decision source (:mod:`serving_patch.sources`): an *inline* source (the embedded policy, a
static table) is polled on the engine's thread right after each step's record, so the next
schedule already sees its decision; the sidecar is polled by a background thread every
``refresh_s`` (20 ms), and nothing on the step path waits for the network.  The background
thread also runs the inline sources' slow upkeep (re-reading a changed policy file) every
``reload_s``.  The polls' CPU time is counted in :attr:`StepController.refresh_ns` on either
thread.  Why inline: a poll on another thread still holds the GIL the engine's Python needs,
runs on cold caches and adds two thread switches; polled from the 20 ms timer, the embedded
policy took 325 us of CPU per step inside the engine (~50 us warm), and the learned controller
measured 0.992 [0.985, 0.999] of the best, pooled over four load levels where it ran the best's
k on 91-100% of its steps (2-core VM, session 30).  After a reload the thread decides once
itself (an idle engine gets the new table); a lock keeps that poll and the step path's apart,
and the step path skips rather than waits.  The embedded policy runs only when
``decide_every`` (4) steps landed or the queue moved since its last decision (evaluated at
every 20 ms tick it had run 7 times per CPU-engine step at c=16).  (Waking the thread from
each step instead cost the step path a futex call: the hook went from ~20 to ~65 us.)

Fallbacks, each counted: before the first good decision the configured static k
(``no_decision``); a poll that raises or returns garbage keeps the last good table
(``poll_errors`` / ``bad_decisions``); a table older than ``max_age_s`` is replaced by the
static k (``expired``) until a fresh one arrives.  Any exception inside a hook is caught,
counted (``hook_errors``) and the engine continues with vLLM's own behaviour for that step.

Step records (``spec-trace/1`` fields) are built in ``update_from_output`` from the same
``SchedulerOutput`` and ``ModelRunnerOutput`` vLLM's own spec-decode metrics use, so their
sums agree with ``vllm:spec_decode_*``.  One convention to know: vLLM drafts at the end of
step n with the k chosen at step n's schedule and verifies those drafts in step n+1, so a
step record's ``k``/``drafts``/``accepted_per_pos`` describe the drafts *verified* in that
step (chosen one step earlier); its ``step_ms`` covers that verification plus the drafting
for the next step.  Under a steady k the two views coincide.

Patched methods of ``vllm.v1.core.sched.scheduler.Scheduler`` (subclasses inherit them):
``__init__`` (attach a controller when enabled), ``schedule``, ``update_from_output``,
``add_request`` and ``_free_request`` (recorder), ``shutdown`` (close).  With the plugin
inert (no ``SPEC_CONTROLLER`` / ``SPEC_TRACE_OUT``) each wrapper costs one attribute read.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import random
import threading
import time
import weakref
from typing import Any

from controller.artifact import Decision
from serving_patch.config import PluginConfig
from serving_patch.recorder import RequestOrder, TraceRecorder
from serving_patch.sources import DecisionSource, EngineSnapshot, make_source

__all__ = ["ControlledLookup", "StepController", "controllers", "install"]

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet = weakref.WeakSet()
_INSTALL_LOCK = threading.Lock()
_perf_ns = time.perf_counter_ns
_thread_ns = time.thread_time_ns
_mono = time.monotonic


def controllers() -> list[StepController]:
    """The live controllers in this process, oldest first (in-process engines: tests, benchmarks)."""
    return sorted(_LIVE, key=lambda c: c.created)


class ControlledLookup(list):
    """Stands in for ``Scheduler.dynamic_sd_lookup``: ``lookup[batch_size]`` asks the controller.

    A ``list`` subclass so vLLM's ``is None`` checks and indexing keep working unchanged.
    """

    def __init__(self, ctl: StepController, size: int):
        super().__init__([0] * size)
        self.ctl = ctl

    def __getitem__(self, batch_size):  # the per-step critical path
        return self.ctl.choose(batch_size)


def _hardware() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except Exception as exc:  # noqa: BLE001 -- no torch / no GPU: a CPU
        log.debug("no CUDA device (%s)", exc)
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU" + (f" ({cpu})" if cpu else "")


def _name(path: str | None) -> str | None:
    """A model's name for the trace header: a hub id as is, a local directory as ``parent/name``."""
    if not path:
        return None
    p = os.path.normpath(str(path))
    if not os.path.isabs(p):
        return p
    parent, name = os.path.split(p)
    return f"{os.path.basename(parent)}/{name}" if os.path.basename(parent) else name


class StepController:
    """One engine's controller state: table, source, counters and the recorder."""

    def __init__(self, scheduler: Any, config: PluginConfig):
        self.config = cfg = config
        self.created = _mono()
        self.created_wall = time.time()  # vLLM's Request.arrival_time is wall-clock
        self._requests = RequestOrder()  # finished requests in arrival order, for the source (sidecar recording)
        vcfg = scheduler.vllm_config
        spec = vcfg.speculative_config
        self.max_k = int(getattr(scheduler, "num_spec_tokens", 0) or 0)
        self.max_num_seqs = int(scheduler.scheduler_config.max_num_seqs)
        self.method = getattr(spec, "method", None) if spec is not None else None
        n = self.max_num_seqs + 1
        self.fallback_k = min(cfg.fallback_k, self.max_k)
        self._fallback = (self.fallback_k,) * n
        self._table: tuple[int, ...] = self._fallback
        self._deadline = math.inf
        self._on_fallback = True
        self._cycle: tuple[int, ...] = ()
        self._i = 0
        self._rng = random.Random(cfg.seed)
        self._hold = cfg.explore_hold
        self._hold_k = self._hold_left = 0
        self.set_explore(cfg.explore)
        self.version = "fallback"
        # counters (each written by one thread)
        self.steps = 0
        self.k_steps = [0] * (self.max_k + 1)  # steps with decodes, by the k they ran
        self.decisions = 0
        self.explored = 0
        self.fb_no_decision = 0
        self.fb_expired = 0
        self.hook_errors = 0
        self.poll_errors = 0
        self.bad_decisions = 0
        self.refreshes = 0
        self.polls = 0
        self.refresh_ns = 0  # the refresher's CPU time (its own thread, but it holds the GIL the engine needs)
        self._last_decided: tuple = (None, ())  # the last decision's table as received, and as checked
        self.choose_ns = 0
        self.hook_ns = 0
        self.step_ms_total = 0.0
        self.last_error: str | None = None
        # engine state for the source (written on the step path, read by the thread)
        self._snapshot = EngineSnapshot()
        self._prefill_pending = 0
        self._prev_k = 0
        self._inflight: dict[int, tuple] = {}
        self.source: DecisionSource | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self._orig_lookup = scheduler.dynamic_sd_lookup
        self.controlling = False
        self.calibrate, self.min_gain, self.speculate_over_off = cfg.calibrate, cfg.min_gain, cfg.speculate_over_off
        self._calibrations: dict[str, Any] = {}  # policy path -> its OnlineCalibration (kept across set_source)

        if cfg.controls_k:
            dp = getattr(vcfg.parallel_config, "data_parallel_size", 1)
            if self.max_k == 0:
                log.warning("spec-controller: SPEC_CONTROLLER is set but the engine has no speculative_config "
                            "(num_speculative_tokens); there is no k to control")
            elif dp > 1:
                log.warning("spec-controller: data_parallel_size=%d: ranks choosing different k would diverge "
                            "(vLLM disables dynamic SD with DP too); the controller stays off", dp)
            else:
                kind, arg = cfg.source
                if kind == "cycle":
                    self._cycle = tuple(min(int(x), self.max_k) for x in arg.split(","))
                    self.version = f"cycle:{arg}"
                    self._on_fallback = False
                else:
                    try:
                        self.source = make_source(kind, arg, max_k=self.max_k, max_num_seqs=self.max_num_seqs,
                                                  fallback_k=self.fallback_k, reload_s=cfg.reload_s,
                                                  max_age_s=cfg.max_age_s, engine_id=cfg.engine_id,
                                                  calibration=self._calibration_for(kind, arg),
                                                  decide_every=cfg.decide_every)
                    except Exception as exc:  # noqa: BLE001 -- serve on the fallback, say why
                        self.poll_errors += 1
                        self.last_error = f"{kind} source: {exc}"
                        log.error("spec-controller: cannot start the %s source (%s); serving static k=%d",
                                  kind, exc, self.fallback_k)
                scheduler.dynamic_sd_lookup = ControlledLookup(self, n)
                self.controlling = True
                if self.source is not None:
                    self.refresh_now()  # first decision before the first step (engine start, not a step)
                    self._thread = threading.Thread(target=self._run, name="spec-controller-refresh", daemon=True)
                    self._thread.start()

        self.recorder: TraceRecorder | None = None
        self._header_base = self._trace_header(scheduler, spec)
        if cfg.trace_out:
            self.start_recording(cfg.trace_out, cfg.trace_notes)
        _LIVE.add(self)
        log.info("spec-controller: attached (method=%s, max_k=%d, controller=%s, explore=%g, trace=%s)",
                 self.method, self.max_k, cfg.source, self._explore, cfg.trace_out)

    # ------------------------------------------------------------------ step path
    def choose(self, batch_size: int) -> int:
        """k for this step's batch: a list index (plus the exploration draw when enabled)."""
        t0 = _perf_ns()
        try:
            if self._cycle:
                k = self._cycle[self._i % len(self._cycle)]
                self._i += 1
            else:
                if self._on_fallback:
                    self.fb_no_decision += 1
                elif _mono() > self._deadline:
                    self._table, self._deadline, self._on_fallback = self._fallback, math.inf, True
                    self.fb_expired += 1
                table = self._table
                k = table[batch_size] if batch_size < len(table) else table[-1]
            if self._explore:
                if self._hold_left:
                    self._hold_left -= 1
                    k = self._hold_k
                    self.explored += 1
                elif self._rng.random() < self._explore_p:
                    k = self._hold_k = self._rng.randint(0, self.max_k)
                    self._hold_left = self._hold - 1
                    self.explored += 1
        except Exception:  # noqa: BLE001 -- never fail a step
            self.hook_errors += 1
            k = self.fallback_k
        self.decisions += 1
        self.choose_ns += _perf_ns() - t0
        return k

    def after_schedule(self, sched: Any, out: Any, t_start: float) -> None:
        if self.recorder is None and self.source is None:
            self._prev_k = out.num_spec_tokens_to_schedule
            return
        t0 = _perf_ns()
        spec = out.scheduled_spec_decode_tokens
        batch = prefill = 0
        for rid, n in out.num_scheduled_tokens.items():
            if n - len(spec.get(rid, ())) <= 1:
                batch += 1
            else:
                prefill += n
        waiting = len(sched.waiting)
        kv = float(sched.kv_cache_manager.usage)
        pending = max(0, self._prefill_pending - prefill)
        if not waiting and not prefill:
            pending = 0
        self._prefill_pending = pending
        snap = self._snapshot
        snap.waiting, snap.kv_usage, snap.prefill_pending = waiting, kv, pending
        self._inflight[id(out)] = (t_start, batch, prefill, waiting, kv, self._prev_k)
        self._prev_k = out.num_spec_tokens_to_schedule
        self.hook_ns += _perf_ns() - t0

    def before_update(self, out: Any, mro: Any) -> None:
        """Count drafts and acceptances before vLLM trims the sampled lists (stop / max_tokens)."""
        info = self._inflight.get(id(out))
        if info is None:
            return
        t0 = _perf_ns()
        spec = out.scheduled_spec_decode_tokens
        drafts = draft_tokens = accepted = 0
        per_pos = [0] * max(info[5], 0)
        if spec:
            sampled = mro.sampled_token_ids
            index = mro.req_id_to_index
            for rid, toks in spec.items():
                i = index.get(rid)
                if i is None or not sampled or not sampled[i]:
                    continue  # as vLLM's own stats: no sampled tokens, no draft counted
                n = len(toks)
                a = max(len(sampled[i]) - 1, 0)
                drafts += 1
                draft_tokens += n
                accepted += a
                if n > len(per_pos):
                    per_pos.extend([0] * (n - len(per_pos)))
                for p in range(a):
                    per_pos[p] += 1
        self._inflight[id(out)] = (*info, drafts, draft_tokens, accepted, per_pos)
        self.hook_ns += _perf_ns() - t0

    def after_update(self, out: Any, mro: Any) -> None:
        info = self._inflight.pop(id(out), None)
        if info is None or len(info) < 10:
            return
        t_end = _mono()
        t0 = _perf_ns()
        t_start, batch, prefill, waiting, kv, _k_prev, drafts, draft_tokens, accepted, per_pos = info
        k = len(per_pos) if (drafts or batch) else 0
        if not k:
            per_pos = []
        step_ms = max((t_end - t_start) * 1000.0, 1e-3)  # >= 1 us: survives the writer's rounding
        rec = {"t_s": 0.0, "batch_size": batch, "prefill_tokens": prefill, "waiting": waiting,
               "kv_usage": min(1.0, max(0.0, kv)), "k": k, "width": 1, "drafts": drafts,
               "draft_tokens": draft_tokens, "accepted_tokens": accepted, "accepted_per_pos": per_pos,
               "step_ms": step_ms}
        self.steps += 1
        if batch and k < len(self.k_steps):
            self.k_steps[k] += 1
        self.step_ms_total += step_ms
        if self.recorder is not None:
            rec["t_s"] = self.recorder.rel_mono(t_start)
            r0 = _perf_ns()
            self.recorder.step(rec)
            self.recorder.ns += _perf_ns() - r0
        else:
            rec["t_s"] = max(0.0, t_start - self.created)
        src = self.source
        if src is not None:
            src.on_step(rec)
        self.hook_ns += _perf_ns() - t0
        if src is not None and src.inline:
            # on this thread: the next schedule sees the decision (counted in refresh_ns); skipped,
            # never waited for, in the rare step where the background thread polls after a reload
            self._poll(src, wait=False)

    def on_arrival(self, request: Any) -> None:
        n = int(getattr(request, "num_prompt_tokens", 0) or 0)
        self._prefill_pending += n
        if self.recorder is not None:
            self.recorder.arrived(str(request.request_id), float(request.arrival_time), n, request)
        if self.source is not None and self.source.wants_requests:
            self._requests.arrived(str(request.request_id), float(request.arrival_time) - self.created_wall, n)

    def on_free(self, request: Any) -> None:
        now = _mono()
        if self.recorder is not None:
            self.recorder.finished(str(request.request_id), int(request.num_output_tokens), now)
        src = self.source
        if src is not None and src.wants_requests:
            for rec in self._requests.finished(str(request.request_id), int(request.num_output_tokens),
                                               now - self.created):
                src.on_request(rec)

    # ------------------------------------------------------------------ background
    def _run(self) -> None:
        # a timer, not a wake-up per step: waking this thread from the step path costs the step a
        # futex call (~50 us measured on the 2-core VM).  Each poll takes the GIL that the engine's
        # own Python needs (module docstring), so inline sources are polled on the step path and
        # this thread only does their slow upkeep (a file reload), every reload_s
        while True:
            src = self.source
            inline = src is not None and src.inline
            if self._stop.wait(self.config.reload_s if inline else self.config.refresh_s):
                return
            src = self.source
            if src is None:
                continue
            if not src.inline:
                self.refresh_now()
                continue
            if self._upkeep(src):  # a new policy: decide now, so an idle engine has its table before the next step
                self._poll(src)

    def refresh_now(self) -> bool:
        """Run the source's upkeep, poll it once and swap in its decision; never raises.  Returns
        whether it swapped.  (Engine start, ``set_source``, the timer for non-inline sources, tests.)"""
        src = self.source
        if src is None:
            return False
        self._upkeep(src)
        return self._poll(src)

    def _upkeep(self, src: DecisionSource) -> bool:
        """The source's slow upkeep (a policy reload); whether it changed anything.  Never raises."""
        try:
            return bool(src.background())
        except Exception as exc:  # noqa: BLE001 -- a failing reload keeps the last good policy
            self.poll_errors += 1
            self._note(f"{src.name} source raised {type(exc).__name__} in its upkeep: {exc}")
            return False

    def _poll(self, src: DecisionSource, wait: bool = True) -> bool:
        # one poll at a time: an inline source is polled by the step path and, after a reload, by
        # the background thread; the step path never waits (its steps stay queued for the next poll)
        if not self._poll_lock.acquire(blocking=wait):
            return False
        t0 = _thread_ns()  # CPU time of this thread: wall time would count its waits for the GIL
        try:
            return self._refresh(src)
        finally:
            self.polls += 1
            self.refresh_ns += _thread_ns() - t0
            self._poll_lock.release()

    def _refresh(self, src: DecisionSource) -> bool:
        try:
            d = src.poll(self._snapshot)
        except Exception as exc:  # noqa: BLE001 -- a failing policy keeps the last good table
            self.poll_errors += 1
            self._note(f"{src.name} source raised {type(exc).__name__}: {exc}")
            return False
        if d is None:
            return False
        try:
            raw = d.table if isinstance(d, Decision) else None
            # the same table as last time (most polls): already checked, only the clock moves
            last_raw, last_table = self._last_decided
            table = last_table if raw is not None and raw == last_raw else self._to_table(d)
        except (TypeError, ValueError, IndexError) as exc:
            self.bad_decisions += 1
            self._note(f"{src.name} source returned an unusable decision ({exc})")
            return False
        self._last_decided = (raw, table)
        self._deadline = _mono() + self.config.max_age_s if src.expires else math.inf
        self._table = table
        self._on_fallback = False
        self.version = d.version
        self.refreshes += 1
        return True

    def _to_table(self, d: Decision) -> tuple[int, ...]:
        if not isinstance(d, Decision) or not d.table:
            raise ValueError(f"expected a non-empty Decision, got {type(d).__name__}")
        ks = []
        for entry in d.table:
            k, w = entry
            if type(k) is not int or type(w) is not int or k < 0 or w < 1:
                raise ValueError(f"table entries must be (k >= 0, width >= 1) ints, found {entry!r}")
            ks.append(min(k, self.max_k))  # widths > 1 run as chains: the engine drafts chains only
        n = self.max_num_seqs + 1
        ks = ks[:n] + [ks[-1]] * (n - len(ks))
        return tuple(ks)

    def _note(self, msg: str) -> None:
        if msg != self.last_error:
            log.warning("spec-controller: %s; keeping the last good decision", msg)
        self.last_error = msg

    # ------------------------------------------------------------------ recording
    def _trace_header(self, scheduler: Any, spec: Any) -> dict[str, Any]:
        import sys

        vcfg = scheduler.vllm_config
        mcfg = vcfg.model_config
        draft = None
        if spec is not None and getattr(spec, "model", None) and self.method not in ("ngram", "suffix"):
            draft = _name(spec.model)
        cache = vcfg.cache_config
        kv_tokens = None
        if getattr(cache, "num_gpu_blocks", None):
            kv_tokens = int(cache.num_gpu_blocks) * int(cache.block_size)
        return {"engine": f"vllm {getattr(sys.modules.get('vllm'), '__version__', 'unknown')}",
                "hardware": _hardware(), "model": _name(mcfg.model), "draft": draft, "method": self.method,
                "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": int(scheduler.scheduler_config.max_num_batched_tokens),
                "kv_capacity_tokens": kv_tokens, "dtype": str(mcfg.dtype).removeprefix("torch.")}

    def start_recording(self, path: str, notes: str | None = None) -> bool:
        """Record every following step to ``path`` (closing a recording in progress); never raises."""
        self.stop_recording()
        src = self.config.source
        parts = [f"spec-controller plugin; controller {src[0] + ':' + src[1] if src else 'vllm'}"]
        if self._explore:
            parts.append(f"explore {self._explore:g} (uniform k in 0..{self.max_k}"
                         + (f", held {self._hold} steps)" if self._hold > 1 else ")"))
        if self.method == "draft_model" and self.config.controls_k:
            parts.append("lazy drafter " + ("on (k = 0 skips the drafter pass)" if self.config.lazy_drafter
                                            else "off (k = 0 runs the drafter pass)"))
        if notes:
            parts.append(notes)
        header = {**self._header_base, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "notes": "; ".join(parts)}
        try:
            self.recorder = TraceRecorder(path, max_k=self.max_k, header=header)
            return True
        except Exception as exc:  # noqa: BLE001
            self.last_error = f"recorder: {exc}"
            log.error("spec-controller: cannot record to %s (%s); recording is off", path, exc)
            return False

    def stop_recording(self) -> None:
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.close()

    def set_source(self, spec: str) -> None:
        """Switch the decision source at run time (``SPEC_CONTROLLER`` syntax; operators, benchmarks).

        Raises ValueError for a bad spec (the old source keeps serving); the new source's first
        decision is fetched here, off the step path.
        """
        if not self.controlling:
            raise ValueError("this engine is not controlled (no speculative_config, or data parallel)")
        kind, arg = PluginConfig.from_env({"SPEC_CONTROLLER": spec}).source
        if kind in ("cycle", "vllm"):
            raise ValueError(f"set_source takes embedded:, sidecar:, static: or table:, got {spec!r}")
        c = self.config
        new = make_source(kind, arg, max_k=self.max_k, max_num_seqs=self.max_num_seqs, fallback_k=self.fallback_k,
                          reload_s=c.reload_s, max_age_s=c.max_age_s, engine_id=c.engine_id,
                          calibration=self._calibration_for(kind, arg), decide_every=c.decide_every)
        old, self.source = self.source, new
        self._cycle = ()
        self._table, self._deadline, self._on_fallback, self.version = self._fallback, math.inf, True, "fallback"
        if old is not None:
            old.close()
        self.refresh_now()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spec-controller-refresh", daemon=True)
            self._thread.start()

    def _calibration_for(self, kind: str, arg: str):
        """The online calibration of the embedded policy at ``arg`` (None: off or another source).

        One per policy path, kept when the source is switched away and back: what the engine
        measured with a policy still holds when that policy returns (benchmarks alternate sources).
        """
        if not self.calibrate or kind != "embedded" or self.max_k < 1:
            return None
        cal = self._calibrations.get(arg)
        if cal is None:
            from controller.online import OnlineCalibration

            # the batch-1 stream needs a drafter whose proposal for a position depends only on
            # the tokens before it; ngram's can depend on where its step started (a later match)
            cal = OnlineCalibration(self.max_k, self.max_num_seqs, stream=self.method not in ("ngram", "suffix"),
                                    min_gain=self.min_gain, speculate_over_off=self.speculate_over_off)
            self._calibrations[arg] = cal
        else:
            cal.resume()
        return cal

    def set_calibrate(self, on: bool) -> None:
        """Turn online calibration on or off for embedded sources set from now on (``set_source``)."""
        self.calibrate = bool(on)

    def set_explore(self, rate: float) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"explore rate must be in [0, 1], got {rate}")
        self._explore = rate if self.max_k > 0 else 0.0
        # a draw starts a hold of H steps: start with p so that the fraction of explored steps is ``rate``
        h, f = self._hold, self._explore
        self._explore_p = f / (h - f * (h - 1)) if f < 1 else 1.0
        self._hold_left = 0

    def reset_counters(self) -> None:
        """Zero the step and overhead counters (benchmarks measure one configuration at a time)."""
        self.steps = self.decisions = self.explored = 0
        self.k_steps = [0] * (self.max_k + 1)
        self.choose_ns = self.hook_ns = self.refresh_ns = self.polls = 0
        self.step_ms_total = 0.0
        if self.recorder is not None:
            self.recorder.ns = 0

    # ------------------------------------------------------------------ lifecycle
    def stats(self) -> dict[str, Any]:
        steps = max(self.steps, 1)
        out = {"controlling": self.controlling, "method": self.method, "max_k": self.max_k,
               "version": self.version, "steps": self.steps, "k_steps": list(self.k_steps),
               "decisions": self.decisions,
               "explored": self.explored, "refreshes": self.refreshes, "polls": self.polls,
               "fallbacks": {"no_decision": self.fb_no_decision, "expired": self.fb_expired},
               "errors": {"hook": self.hook_errors, "poll": self.poll_errors, "bad_decision": self.bad_decisions},
               "last_error": self.last_error, "choose_us_per_step": self.choose_ns / 1000 / max(self.decisions, 1),
               "hook_us_per_step": self.hook_ns / 1000 / steps,
               "refresh_us_per_step": self.refresh_ns / 1000 / steps, "mean_step_ms": self.step_ms_total / steps}
        if self.source is not None:
            out["source"] = {"kind": self.source.name, **self.source.stats()}
        if self.recorder is not None:
            out["recorder"] = {**self.recorder.stats(), "us_per_step": self.recorder.ns / 1000 / steps}
        from serving_patch import drafter

        out["k0_path"] = dict(drafter.STATS)  # lazy drafter and plain k = 0 steps (this process's runners)
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self.source is not None:
            try:
                self.source.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing the %s source: %s", self.source.name, exc)
        self.stop_recording()
        _LIVE.discard(self)


# ---------------------------------------------------------------------- patching


def _guarded(ctl: StepController, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # the engine must not notice us: count, log a few, go on
        ctl.hook_errors += 1
        if ctl.hook_errors in (1, 10, 100, 1000):
            log.exception("spec-controller: hook error #%d (%s)", ctl.hook_errors, type(exc).__name__)


def install() -> bool:
    """Patch vLLM's scheduler (and the draft-model proposer) once per process; returns whether the patch is in place."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from serving_patch import drafter

    _patch_scheduler(Scheduler)
    drafter.install()  # k = 0 without the draft model's pass (a no-op unless the controller chooses k)
    return True


def _patch_scheduler(Scheduler) -> None:
    with _INSTALL_LOCK:
        if getattr(Scheduler, "_spec_controller_hooked", False):
            return
        orig_init = Scheduler.__init__
        orig_schedule = Scheduler.schedule
        orig_update = Scheduler.update_from_output
        orig_add = Scheduler.add_request
        orig_free = Scheduler._free_request
        orig_shutdown = Scheduler.shutdown

        @functools.wraps(orig_init)
        def __init__(self, *args, **kwargs):
            orig_init(self, *args, **kwargs)
            self._spec_ctl = None
            try:
                cfg = PluginConfig.from_env()
                if cfg.enabled:
                    self._spec_ctl = StepController(self, cfg)
            except Exception as exc:  # noqa: BLE001 -- a bad setting must not stop the engine
                log.error("spec-controller: not attached (%s); vLLM runs unchanged", exc)

        @functools.wraps(orig_schedule)
        def schedule(self, *args, **kwargs):
            ctl = self._spec_ctl
            if ctl is None:
                return orig_schedule(self, *args, **kwargs)
            t = _mono()
            out = orig_schedule(self, *args, **kwargs)
            _guarded(ctl, ctl.after_schedule, self, out, t)
            return out

        @functools.wraps(orig_update)
        def update_from_output(self, scheduler_output, model_runner_output):
            ctl = self._spec_ctl
            if ctl is None:
                return orig_update(self, scheduler_output, model_runner_output)
            _guarded(ctl, ctl.before_update, scheduler_output, model_runner_output)
            result = orig_update(self, scheduler_output, model_runner_output)
            _guarded(ctl, ctl.after_update, scheduler_output, model_runner_output)
            return result

        @functools.wraps(orig_add)
        def add_request(self, request):
            ctl = self._spec_ctl
            if ctl is not None and request.request_id not in self.requests:
                _guarded(ctl, ctl.on_arrival, request)
            return orig_add(self, request)

        @functools.wraps(orig_free)
        def _free_request(self, request, *args, **kwargs):
            ctl = self._spec_ctl
            if ctl is not None:
                _guarded(ctl, ctl.on_free, request)
            return orig_free(self, request, *args, **kwargs)

        @functools.wraps(orig_shutdown)
        def shutdown(self):
            ctl = self._spec_ctl
            if ctl is not None:
                _guarded(ctl, ctl.close)
            return orig_shutdown(self)

        Scheduler.__init__ = __init__
        Scheduler.schedule = schedule
        Scheduler.update_from_output = update_from_output
        Scheduler.add_request = add_request
        Scheduler._free_request = _free_request
        Scheduler.shutdown = shutdown
        Scheduler._spec_ctl = None  # class default: schedulers built before the patch stay untouched
        Scheduler._spec_controller_hooked = True
