"""Prometheus metrics of the sidecar: counters (``*_total``), histograms, small fixed label sets.

Like vLLM's ``v1/spec_decode/metrics.py``, only counts are exported and ratios are left to
PromQL, so they aggregate correctly over time and instances.  The dashboards
(``dashboards/``) use, among others::

    # accept rate vs load (batch-size bucket): the main panel
    sum by (bucket) (rate(spec_controller_accepted_tokens_total[5m]))
      / sum by (bucket) (rate(spec_controller_draft_tokens_total[5m]))
    # mean chosen k by batch-size bucket
    sum by (bucket) (rate(spec_controller_spec_len_total[5m])) / sum by (bucket) (rate(spec_controller_steps_total[5m]))
    # mean decoding batch size (load)
    sum(rate(spec_controller_batch_size_sum[5m])) / sum(rate(spec_controller_batch_size_count[5m]))
    # goodput (tokens committed per second)
    sum(rate(spec_controller_committed_tokens_total[5m]))
    # decision latency p99
    histogram_quantile(0.99, sum by (le) (rate(spec_controller_decision_seconds_bucket[5m])))

Label values: ``bucket`` is one of :data:`BUCKET_LABELS` (zero-padded so they sort),
``k`` and ``width`` are ``"0".."8"`` or ``"9+"``, ``reason`` one of
:data:`controller.sidecar.schemas.FALLBACK_REASONS`.  Every fixed label value is created
at start, so a series exists (at 0) before its first event and rates never come back empty.
The registry is passed in (``registry=None`` makes a fresh one), so each test reads its
own values with ``registry.get_sample_value``.

    >>> bucket_label(0), bucket_label(1), bucket_label(5), bucket_label(300)
    ('000', '001', '004-007', '256+')
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from controller.sidecar.schemas import ERROR_KINDS, FALLBACK_REASONS

__all__ = ["BUCKET_LABELS", "SidecarMetrics", "bucket_label", "small_label"]

PREFIX = "spec_controller"
_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
BUCKET_LABELS = tuple(
    (f"{lo:03d}" if hi == lo else f"{lo:03d}-{hi:03d}") if hi is not None else f"{lo}+"
    for lo, hi in zip(_EDGES, [e - 1 for e in _EDGES[1:]] + [None]))
_BUCKET_OF = [BUCKET_LABELS[max(i for i, e in enumerate(_EDGES) if e <= b)] for b in range(_EDGES[-1])]
SMALL_LABELS = tuple(str(i) for i in range(9)) + ("9+",)
MAX_POSITIONS = 8  # accepted-per-position series: positions 0..7, deeper positions folded into "8+"
POSITION_LABELS = tuple(str(i) for i in range(MAX_POSITIONS)) + (f"{MAX_POSITIONS}+",)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, float("inf"))
BATCH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, float("inf"))
DECISION_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 0.0016, 0.0032, 0.0064, 0.0128, 0.05,
                    float("inf"))


def bucket_label(batch_size: int) -> str:
    return _BUCKET_OF[batch_size] if batch_size < len(_BUCKET_OF) else BUCKET_LABELS[-1]


def small_label(n: int) -> str:
    return SMALL_LABELS[n] if n < 9 else "9+"


class SidecarMetrics:
    """All sidecar metrics in one registry; label children cached (``labels()`` costs ~1 us)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry = CollectorRegistry() if registry is None else registry
        p = PREFIX
        self.steps = Counter(f"{p}_steps", "Engine steps reported, by batch-size bucket", ["bucket"],
                             registry=registry)
        self.spec_len = Counter(f"{p}_spec_len", "Sum of the speculative length k the engine ran, by batch-size "
                                "bucket (divide by steps_total for the mean chosen k)", ["bucket"], registry=registry)
        self.steps_by_k = Counter(f"{p}_steps_by_k", "Engine steps reported, by the k and width they ran",
                                  ["k", "width"], registry=registry)
        self.drafts = Counter(f"{p}_drafts", "Sequences that got a draft, by batch-size bucket", ["bucket"],
                              registry=registry)
        self.draft_tokens = Counter(f"{p}_draft_tokens", "Draft tokens proposed, by batch-size bucket", ["bucket"],
                                    registry=registry)
        self.accepted_tokens = Counter(f"{p}_accepted_tokens", "Draft tokens accepted, by batch-size bucket",
                                       ["bucket"], registry=registry)
        self.accepted_per_pos = Counter(f"{p}_accepted_per_pos", "Drafts whose position was accepted",
                                        ["position"], registry=registry)
        self.committed_tokens = Counter(f"{p}_committed_tokens", "Tokens committed (batch_size + accepted), by "
                                        "batch-size bucket", ["bucket"], registry=registry)
        self.step_seconds = Histogram(f"{p}_step_seconds", "Engine step wall time, by k", ["k"],
                                      buckets=STEP_BUCKETS, registry=registry)
        self.batch_size = Histogram(f"{p}_batch_size", "Decoding batch size of the reported steps",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.decisions = Counter(f"{p}_decisions", "Decisions served, by the (k, width) they give at the engine's "
                                 "current batch size", ["k", "width"], registry=registry)
        self.decision_seconds = Histogram(f"{p}_decision_seconds", "Time to make a decision inside the sidecar "
                                          "(fold steps, features, forward pass, encode)", buckets=DECISION_BUCKETS,
                                          registry=registry)
        self.decide_requests = Counter(f"{p}_decide_requests", "POST /v1/decide calls by outcome", ["outcome"],
                                       registry=registry)
        self.fallbacks = Counter(f"{p}_fallbacks", "Engine steps that ran without a fresh decision (client "
                                 "reports) and static decisions served (sidecar), by reason", ["reason"],
                                 registry=registry)
        self.client_errors = Counter(f"{p}_client_errors", "Failed sidecar calls the engine clients reported, "
                                     "by kind", ["kind"], registry=registry)
        self.dropped_steps = Counter(f"{p}_dropped_steps", "Step records engine clients dropped from a full queue",
                                     registry=registry)
        self.policy_reloads = Counter(f"{p}_policy_reloads", "Policy reload attempts", ["trigger", "result"],
                                      registry=registry)
        self.policy_info = Info(f"{p}_policy", "The policy being served", registry=registry)
        self.policy_loaded = Gauge(f"{p}_policy_loaded_timestamp_seconds", "Unix time the serving policy was "
                                   "swapped in", registry=registry)
        self.engines = Gauge(f"{p}_engines_connected", "Engines that called within engine_ttl_s", registry=registry)
        self.recorded_steps = Counter(f"{p}_recorded_steps", "Step records written to spec-trace/1 files",
                                      registry=registry)
        self.recorded_requests = Counter(f"{p}_recorded_requests", "Request records written to spec-trace/1 files",
                                         registry=registry)
        self.recorder_errors = Counter(f"{p}_recorder_errors", "Step or request records the recorder could not "
                                       "write", registry=registry)

        # children, created now so every fixed series exists from the start
        self._b = {b: (self.steps.labels(b), self.spec_len.labels(b), self.drafts.labels(b),
                       self.draft_tokens.labels(b), self.accepted_tokens.labels(b), self.committed_tokens.labels(b))
                   for b in BUCKET_LABELS}
        self._pos = [self.accepted_per_pos.labels(x) for x in POSITION_LABELS]
        self._k_step = {k: self.step_seconds.labels(k) for k in SMALL_LABELS}
        self._kw: dict[tuple[int, int], tuple] = {}
        self._fb = {r: self.fallbacks.labels(r) for r in FALLBACK_REASONS}
        self._err = {e: self.client_errors.labels(e) for e in ERROR_KINDS}
        self._ok, self._invalid = self.decide_requests.labels("ok"), self.decide_requests.labels("invalid")
        for trigger in ("file", "put"):
            for result in ("ok", "refused"):
                self.policy_reloads.labels(trigger, result)
        self.steps_by_k.labels("0", "1")
        self.decisions.labels("0", "1")

    def _kw_children(self, k: int, w: int) -> tuple:
        c = self._kw.get((k, w))
        if c is None:
            kl, wl = small_label(k), small_label(w)
            c = self._kw[(k, w)] = (self.steps_by_k.labels(kl, wl), self.decisions.labels(kl, wl))
        return c

    # ------------------------------------------------------------------ updates
    def observe_step(self, s) -> None:
        """One finished step (an object with the trace step fields)."""
        steps, spec_len, drafts, draft_tokens, accepted, committed = self._b[bucket_label(s.batch_size)]
        steps.inc()
        if s.k:
            spec_len.inc(s.k)
            drafts.inc(s.drafts)
            draft_tokens.inc(s.draft_tokens)
            accepted.inc(s.accepted_tokens)
            pos = self._pos
            for i, a in enumerate(s.accepted_per_pos):
                if a:
                    pos[min(i, MAX_POSITIONS)].inc(a)
        committed.inc(s.batch_size + s.accepted_tokens)
        self.batch_size.observe(s.batch_size)
        self._k_step[small_label(s.k)].observe(s.step_ms / 1000.0)
        self._kw_children(s.k, s.width)[0].inc()

    def observe_decision(self, action: tuple[int, int], seconds: float) -> None:
        self._kw_children(*action)[1].inc()
        self.decision_seconds.observe(seconds)
        self._ok.inc()

    def observe_client(self, report) -> None:
        for reason, n in report.fallbacks.items():
            if n > 0:
                self._fb[reason].inc(n)
        for kind, n in report.errors.items():
            if n > 0:
                self._err[kind].inc(n)
        if report.dropped_steps:
            self.dropped_steps.inc(report.dropped_steps)

    def fallback(self, reason: str) -> None:
        self._fb[reason].inc()

    def invalid_request(self) -> None:
        self._invalid.inc()

    def policy_swapped(self, snapshot, trigger: str | None) -> None:
        self.policy_info.info({"version": snapshot.version, "sha256": snapshot.sha256[:12],
                               "source": "PUT" if snapshot.source == "PUT" else "file"})
        self.policy_loaded.set(snapshot.loaded_at)
        if trigger is not None:
            self.policy_reloads.labels(trigger, "ok").inc()

    def policy_refused(self, trigger: str) -> None:
        self.policy_reloads.labels(trigger, "refused").inc()

    def track_engines(self, count: Callable[[], int]) -> None:
        self.engines.set_function(count)
