"""Request and response bodies of the sidecar API (``/v1``), as pydantic models.

The step record mirrors the ``spec-trace/1`` step fields (``shared/trace-format.md``);
ranges are checked here (so the OpenAPI schema documents them) and the cross-field
invariants by :func:`envs.trace.validate_record`, the one validator of the format.

A decision travels as runs of the per-batch-size table (:mod:`controller.sidecar.wire`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ERROR_KINDS",
    "FALLBACK_REASONS",
    "ClientReport",
    "DecideRequest",
    "DecideResponse",
    "PolicyInfo",
    "StepRecord",
]

# Why an engine step did not run a fresh decision (client side) or why the sidecar served
# its static choice (sidecar side): a small fixed set, so it can be a metric label.
FALLBACK_REASONS = ("no_decision", "stale", "expired", "policy_error")
FallbackReason = Literal["no_decision", "stale", "expired", "policy_error"]
# Transport failures the client saw since its last successful call.
ERROR_KINDS = ("connect", "timeout", "http_status", "bad_response")
ErrorKind = Literal["connect", "timeout", "http_status", "bad_response"]

MAX_K = 64       # sanity bounds; the trace header's max_k is checked per engine
MAX_WIDTH = 64
BIG = 2**31 - 1

ENGINE_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
EngineId = Field(pattern=ENGINE_ID_PATTERN, description="stable id of the engine (one FeatureState each); "
                 "letters, digits and `_.:-` (it names the recording folder)", examples=["vllm-0"])


class StepRecord(BaseModel):
    """One finished engine step: the ``spec-trace/1`` step fields (unknown fields ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    type: Literal["step"] = "step"
    t_s: float = Field(ge=0, le=1e9, description="when the step began, seconds since the engine's trace start")
    batch_size: int = Field(ge=0, le=BIG, description="requests decoding in this step")
    prefill_tokens: int = Field(ge=0, le=BIG, description="prompt tokens processed in this step")
    waiting: int = Field(ge=0, le=BIG, description="requests queued and not yet scheduled")
    kv_usage: float = Field(ge=0, le=1, description="fraction of KV-cache blocks in use")
    k: int = Field(ge=0, le=MAX_K, description="speculative length used; 0 = off")
    width: int = Field(ge=1, le=MAX_WIDTH, description="tree width used (1 = chain)")
    drafts: int = Field(ge=0, le=BIG, description="sequences that got a draft")
    draft_tokens: int = Field(ge=0, le=BIG, description="draft tokens proposed")
    accepted_tokens: int = Field(ge=0, le=BIG, description="draft tokens accepted")
    accepted_per_pos: list[Annotated[int, Field(ge=0, le=BIG)]] = Field(max_length=MAX_K, description="k ints, non-increasing: accepted at position i")
    step_ms: float = Field(gt=0, le=3.6e6, description="wall time of the whole step")
    draft_ms: float | None = Field(None, ge=0, le=3.6e6)
    verify_ms: float | None = Field(None, ge=0, le=3.6e6)

    def trace_fields(self) -> dict[str, Any]:
        """The record as ``envs.trace`` wants it (optional fields only when present)."""
        return self.model_dump(exclude_none=True)


class RequestRecord(BaseModel):
    """One finished request: the ``spec-trace/1`` request fields, times on the steps' clock."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    type: Literal["request"] = "request"
    id: str = Field(min_length=1, max_length=256, description="unique within the engine's trace")
    arrival_s: float = Field(ge=0, le=1e9, description="when it arrived, on the clock of the steps' t_s")
    prompt_tokens: int = Field(ge=1, le=BIG)
    output_tokens: int = Field(ge=1, le=BIG, description="tokens generated for it")
    finish_s: float | None = Field(None, ge=0, le=1e9, description="when its last token was produced")

    def trace_fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ClientReport(BaseModel):
    """What the engine-side client counted since its last successful call (deltas)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    fallbacks: dict[FallbackReason, int] = Field(default_factory=dict, description="steps by fallback reason")
    errors: dict[ErrorKind, int] = Field(default_factory=dict, description="failed calls by kind")
    dropped_steps: int = Field(0, ge=0, le=BIG, description="step records dropped from a full queue")


class DecideRequest(BaseModel):
    """The engine's per-step call: the finished steps since the last call, oldest first."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    engine_id: str = EngineId
    steps: list[StepRecord] = Field(default_factory=list, max_length=65536,
                                    description="finished steps since the last call (empty = refresh only)")
    prefill_pending: int | None = Field(None, ge=0, le=BIG, description="prompt tokens still to prefill now; "
                                        "default: the last step's prefill_tokens")
    max_k: int | None = Field(None, ge=1, le=MAX_K, description="largest k the engine runs (its trace header max_k)")
    widths: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] | None = Field(
        None, min_length=1, max_length=16, description="tree widths the engine supports (its trace header widths)")
    requests: list[RequestRecord] = Field(
        default_factory=list, max_length=65536,
        description="requests finished since the last call, in arrival order (recorded with the steps, so the "
                    "recording replays the load: `train-controller` needs them)")
    client: ClientReport | None = None


class DecideResponse(BaseModel):
    """The decision for the engine's coming steps and the policy that made it."""

    engine_id: str
    version: str = Field(description="policy version that made the table")
    max_num_seqs: int
    runs: list[list[int]] = Field(description="the table by batch size as [first_batch, last_batch, k, width] runs")
    fallback: FallbackReason | None = Field(None, description="set when the sidecar served its static choice")


class PolicyInfo(BaseModel):
    """``GET /v1/policy``: what is serving and the table it gives now."""

    version: str
    sha256: str
    source: str = Field(description="file path, or 'PUT' for an uploaded artifact")
    loaded_at: float = Field(description="unix time of the swap")
    feature_names: list[str]
    feature_spec: dict[str, Any]
    actions: list[list[int]]
    provenance: dict[str, Any]
    evaluation: dict[str, Any]
    engine_id: str | None = Field(None, description="the engine whose state the table is for (None: a fresh state)")
    table: list[list[int]] = Field(description="[k, width] for batch size 0..max_num_seqs at that state")
    ranges: list[list[int]] = Field(description="vLLM's num_speculative_tokens_per_batch_size form [[lo, hi, k]]")
