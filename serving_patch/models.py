"""Tiny Llama target + draft pair for tests, traces and benchmarks, built locally.

No model hub is reachable, so ``build-tiny-models`` makes the pair from what the machine
has, deterministically (seeded; the same Python stdlib gives the same bytes):

1. **Corpus**: the top-level ``*.py`` files of the running Python's standard library
   (``sysconfig.get_paths()["stdlib"]``; 168 files, 4.7 MB on 3.11.7), sorted by name.
2. **Tokenizer**: a byte-level BPE (``tokenizers``) with ``vocab_size`` entries, saved as
   ``tokenizer.json`` + ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``.
3. **Draft**: a small Llama (``transformers.LlamaForCausalLM``, random init, seeded)
   trained for ``train_steps`` AdamW steps of next-token loss on the corpus.
4. **Target**: the draft *grown* into a much larger Llama, Net2Net-style (Chen et al.,
   arXiv 1511.05641): hidden size, heads, MLP width and depth increase; the draft's weights
   sit in the first dimensions/heads/neurons of some layers with every new connection into
   the residual stream zero, so the grown model computes the draft's function; the other
   layers are random with their output projections scaled to a perturbation found by
   bisection, so that draft and target agree on ``agreement`` (default 0.5) of the next
   tokens of held-out corpus windows (teacher forced): that sets the acceptance rate.

Why grow rather than train the target: a target big enough to be memory-bound at batch 1
on this CPU (the regime where speculation pays, as on a GPU) cannot be trained in minutes
on 2 cores, and a target unrelated to the draft would accept almost no draft tokens.  The
grown target has the *cost* of a 68M-parameter model (16 layers, hidden 512, MLP 2048; the
draft has 0.69M: 2 layers, hidden 128) and a draft whose agreement with it is set by one
number.  Measured on the 2-core CPU by ``bench/bench_engine.py``:
speculation wins at batch 1 and loses at large batches (the numbers are in the README).

Both models and the tokenizer go to ``$SPEC_MODELS_DIR`` (default
``~/.cache/spec-controller/models``) under a name that hashes the settings, and are
rebuilt only when missing (atomically: a concurrent reader never sees half a pair).
``torch.set_num_threads(2)`` during the build; ~75 s on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from serving_patch.compat import hide_broken_torch_addons

__all__ = ["ModelPair", "TinyModelSpec", "build_tiny_models", "default_models_dir", "main", "read_corpus"]

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class TinyModelSpec:
    """Every setting that changes the built bytes (hashed into the cache directory name)."""

    vocab_size: int = 2048
    # draft (trained)
    draft_layers: int = 2
    draft_hidden: int = 128
    draft_intermediate: int = 384
    # target (grown from the draft)
    target_layers: int = 16
    target_hidden: int = 512
    target_intermediate: int = 2048
    agreement: float = 0.5       # top-1 agreement of draft and target the perturbation is calibrated to
    head_dim: int = 64           # vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...
    max_position_embeddings: int = 1024
    train_steps: int = 800
    train_batch: int = 8
    train_seq: int = 128
    lr: float = 8e-3
    seed: int = 0
    threads: int = 2

    def __post_init__(self):
        for name in ("draft_hidden", "target_hidden"):
            h = getattr(self, name)
            if h % self.head_dim:
                raise ValueError(f"{name}={h} must be a multiple of head_dim={self.head_dim}")
        if self.head_dim not in (32, 64, 80, 96, 112, 128, 256):
            raise ValueError(f"head_dim={self.head_dim}: vLLM's CPU attention needs one of 32, 64, 80, 96, 112, 128")
        if not 0 < self.agreement < 1:
            raise ValueError(f"agreement must be in (0, 1), got {self.agreement}")
        if (self.target_hidden < self.draft_hidden or self.target_intermediate < self.draft_intermediate
                or self.target_layers < self.draft_layers):
            raise ValueError("the target must be at least as large as the draft in every dimension "
                             f"(draft {self.draft_layers}x{self.draft_hidden}/{self.draft_intermediate}, "
                             f"target {self.target_layers}x{self.target_hidden}/{self.target_intermediate})")

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + sys.version.split()[0]
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def target_params(self) -> int:
        h, i, v = self.target_hidden, self.target_intermediate, self.vocab_size
        return self.target_layers * (4 * h * h + 3 * h * i + 2 * h) + v * h + h


@dataclass(frozen=True)
class ModelPair:
    """Paths of a built pair (``target`` and ``draft`` are Hugging Face model directories)."""

    root: Path
    target: Path
    draft: Path
    info: dict

    @property
    def name(self) -> str:
        return f"spec-tiny-{self.info['key']}"


def default_models_dir() -> Path:
    return Path(os.environ.get("SPEC_MODELS_DIR") or Path.home() / ".cache" / "spec-controller" / "models")


def read_corpus() -> tuple[list[str], str]:
    """The stdlib's top-level ``*.py`` files (sorted) and their SHA-256 (provenance)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in the Python stdlib at {stdlib}: the corpus cannot be built")
    h = hashlib.sha256()
    texts = []
    for f in files:
        data = f.read_bytes()
        h.update(data)
        texts.append(data.decode("utf-8", errors="replace"))
    return texts, h.hexdigest()


def _train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=1))
    return tok


def _llama_config(spec: TinyModelSpec, layers: int, hidden: int, intermediate: int):
    from transformers import LlamaConfig

    heads = hidden // spec.head_dim
    return LlamaConfig(vocab_size=spec.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=spec.head_dim, max_position_embeddings=spec.max_position_embeddings,
                       rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2, torch_dtype="float32")


def _train_draft(spec: TinyModelSpec, ids, log_fn) -> object:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(_llama_config(spec, spec.draft_layers, spec.draft_hidden, spec.draft_intermediate))
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, spec.train_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.1, 1 - s / spec.train_steps))
    model.train()
    t0 = time.perf_counter()
    loss = float("nan")
    for step in range(spec.train_steps):
        starts = torch.randint(0, len(data) - spec.train_seq - 1, (spec.train_batch,), generator=gen)
        x = torch.stack([data[s: s + spec.train_seq] for s in starts.tolist()])
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        if step % 200 == 0 or step == spec.train_steps - 1:
            log_fn(f"  draft step {step + 1}/{spec.train_steps}: loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return model, loss


def grow(spec: TinyModelSpec, draft, perturb: float) -> object:
    """The target: the draft's function inside a larger Llama, plus perturbing layers (module docstring)."""
    import torch
    from transformers import LlamaForCausalLM

    hd, ht = spec.draft_hidden, spec.target_hidden
    idr, itg = spec.draft_intermediate, spec.target_intermediate
    torch.manual_seed(spec.seed + 1)
    target = LlamaForCausalLM(_llama_config(spec, spec.target_layers, ht, itg))
    # the draft's layers spread over the depth; the rest perturb
    places = [round(j * (spec.target_layers - 1) / max(1, spec.draft_layers - 1)) if spec.draft_layers > 1 else 0
              for j in range(spec.draft_layers)]
    scale = (hd / ht) ** 0.5  # RMS over ht dims of a vector living in the first hd dims
    d_sd = draft.state_dict()
    with torch.no_grad():
        sd = target.state_dict()
        sd["model.embed_tokens.weight"].zero_()[:, :hd] = d_sd["model.embed_tokens.weight"]
        sd["model.norm.weight"].zero_()[:hd] = d_sd["model.norm.weight"] * scale
        for i in range(spec.target_layers):
            p = f"model.layers.{i}."
            if i in places:
                j = places.index(i)
                q = f"model.layers.{j}."
                for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    sd[p + name + ".weight"].zero_()[:hd, :hd] = d_sd[q + name + ".weight"]
                sd[p + "self_attn.o_proj.weight"].zero_()[:hd, :hd] = d_sd[q + "self_attn.o_proj.weight"]
                for name in ("mlp.gate_proj", "mlp.up_proj"):
                    sd[p + name + ".weight"].zero_()[:idr, :hd] = d_sd[q + name + ".weight"]
                sd[p + "mlp.down_proj.weight"].zero_()[:hd, :idr] = d_sd[q + "mlp.down_proj.weight"]
                for name in ("input_layernorm", "post_attention_layernorm"):
                    sd[p + name + ".weight"].zero_()[:hd] = d_sd[q + name + ".weight"] * scale
            else:
                for name in ("self_attn.o_proj", "mlp.down_proj"):
                    w = sd[p + name + ".weight"]
                    w.mul_(perturb / max(float(w.std()), 1e-12))
        target.load_state_dict(sd)
    target.eval()
    return target


def _agreement(draft, target, x) -> float:
    """Top-1 next-token agreement of draft and target on the windows ``x`` (teacher forced)."""
    import torch

    with torch.no_grad():
        a = draft(input_ids=x).logits.argmax(-1)
        b = target(input_ids=x).logits.argmax(-1)
    return float((a == b).float().mean())


def calibrate(spec: TinyModelSpec, draft, ids, log_fn, iters: int = 7) -> tuple[object, float, float]:
    """Grow the target with the perturbation (bisection in log scale) that gives ``spec.agreement``."""
    import math

    import torch

    gen = torch.Generator().manual_seed(spec.seed + 7)
    starts = torch.randint(0, len(ids) - 129, (6,), generator=gen).tolist()
    x = torch.tensor([ids[s: s + 128] for s in starts])
    lo, hi = math.log(0.01), math.log(8.0)
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        target = grow(spec, draft, math.exp(mid))
        agree = _agreement(draft, target, x)
        if best is None or abs(agree - spec.agreement) < abs(best[2] - spec.agreement):
            best = (target, math.exp(mid), agree)
        if agree > spec.agreement:
            lo = mid
        else:
            hi = mid
        log_fn(f"  perturbation {math.exp(mid):.3f}: agreement {agree:.3f}")
    return best


def build_tiny_models(root: str | os.PathLike | None = None, spec: TinyModelSpec | None = None, *,
                      force: bool = False, log_fn=None) -> ModelPair:
    """Build (or find in the cache) the tokenizer, draft and target; return their paths."""
    spec = spec or TinyModelSpec()
    log_fn = log_fn or log.info
    root = Path(root) if root is not None else default_models_dir()
    base = root / f"spec-tiny-{spec.key()}"
    info_path = base / "build.json"
    if info_path.exists() and not force:
        info = json.loads(info_path.read_text())
        return ModelPair(base, base / "target", base / "draft", info)
    hide_broken_torch_addons()
    import torch

    torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    tmp = root / f".building-{spec.key()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    texts, corpus_sha = read_corpus()
    log_fn(f"building tiny models in {base} (corpus: {len(texts)} stdlib files, sha256 {corpus_sha[:12]})")
    tok = _train_tokenizer(texts, spec.vocab_size, tmp / "tokenizer")
    ids = [i for t in texts for i in tok.encode(t).ids]
    log_fn(f"  tokenizer: {spec.vocab_size} byte-level BPE tokens, corpus {len(ids):,} tokens "
           f"({time.perf_counter() - t0:.0f} s)")
    draft, loss = _train_draft(spec, ids, log_fn)
    target, perturb, agree = calibrate(spec, draft, ids, log_fn)
    n_draft = sum(p.numel() for p in draft.parameters())
    n_target = sum(p.numel() for p in target.parameters())
    for name, model in (("draft", draft), ("target", target)):
        model.save_pretrained(tmp / name, safe_serialization=True)
        for f in (tmp / "tokenizer").iterdir():
            shutil.copy(f, tmp / name / f.name)
    info = {"key": spec.key(), "spec": asdict(spec), "corpus_sha256": corpus_sha, "corpus_tokens": len(ids),
            "draft_params": n_draft, "target_params": n_target, "draft_final_loss": round(loss, 4),
            "top1_agreement": round(agree, 4), "perturb": round(perturb, 4), "python": sys.version.split()[0], "torch": torch.__version__,
            "build_seconds": round(time.perf_counter() - t0, 1)}
    (tmp / "build.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(tmp / "tokenizer")
    base.parent.mkdir(parents=True, exist_ok=True)
    if base.exists():
        shutil.rmtree(base)
    os.replace(tmp, base)  # atomic: a concurrent reader never sees half a model
    log_fn(f"  draft {n_draft / 1e6:.2f}M params (loss {loss:.3f}), target {n_target / 1e6:.1f}M params, "
           f"top-1 agreement {agree:.3f}; {info['build_seconds']:.0f} s")
    return ModelPair(base, base / "target", base / "draft", info)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build-tiny-models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="cache directory (default: $SPEC_MODELS_DIR or "
                                                "~/.cache/spec-controller/models)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the pair is cached")
    ap.add_argument("--train-steps", type=int, default=TinyModelSpec.train_steps)
    ap.add_argument("--agreement", type=float, default=TinyModelSpec.agreement,
                    help="draft/target top-1 agreement to calibrate to (sets the acceptance rate)")
    ap.add_argument("--target-layers", type=int, default=TinyModelSpec.target_layers)
    args = ap.parse_args(argv)
    try:
        spec = TinyModelSpec(train_steps=args.train_steps, agreement=args.agreement, target_layers=args.target_layers)
        pair = build_tiny_models(args.out, spec, force=args.force,
                                 log_fn=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError) as exc:
        print(f"build-tiny-models: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"target": str(pair.target), "draft": str(pair.draft), **pair.info}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
