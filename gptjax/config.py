"""Frozen configuration dataclasses, named model presets and validation.

Every field carries a one-line `help` in its metadata so the CLI can expose it with
its default. Fields marked `resume_safe` may change when a run is resumed because
they do not affect the sequence of parameter updates (beyond float summation order, as a
different mesh, attention formulation or rematerialisation policy changes it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from gptjax.errors import GptjaxError


def _f(default, help: str, *, choices=None, resume_safe: bool = False, metavar: str = ""):
    meta = {"help": help, "resume_safe": resume_safe}
    if choices:
        meta["choices"] = tuple(choices)
    if metavar:  # the CLI's name for the value, where its type alone says too little
        meta["metavar"] = metavar
    return field(default=default, metadata=meta)


# scan_unroll=0 unrolls models up to this depth fully: 1.48x faster than a rolled scan for
# GPT-2 124M on an H100 (where unrolling 2 or 4 layers per step gained nothing), ~20% for
# "baby" on a 2-core CPU (benchmarks/NOTES.md: "Unrolling the layer scan", GPU entry 2).
# Deeper models keep the rolled scan's flat compile time.
FULL_UNROLL_MAX_LAYERS = 12

TOKENIZER_KINDS = ("gpt2", "char", "byte")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the GPT. vocab_size 0 means 'the tokenizer's'."""

    vocab_size: int = _f(0, "vocabulary rows; 0 = the tokenizer's size (larger pads it)")
    context_length: int = _f(64, "maximum sequence length (learned position embeddings)")
    n_layer: int = _f(4, "number of transformer blocks")
    n_head: int = _f(4, "attention heads per block")
    d_model: int = _f(128, "residual stream width")
    mlp_ratio: int = _f(4, "MLP hidden width as a multiple of d_model")
    dropout: float = _f(0.0, "dropout on embeddings and residual branches")
    bias: bool = _f(True, "biases in linear layers and LayerNorms (GPT-2 has them)")
    layer_norm_eps: float = _f(1e-5, "LayerNorm epsilon")
    dtype: str = _f("float32", "activation/compute dtype", choices=("float32", "bfloat16", "float16"))
    param_dtype: str = _f("float32", "parameter storage dtype", choices=("float32", "bfloat16"))
    scan_unroll: int = _f(
        0, "layers unrolled per layer-scan step: 0 = auto (all of them up to "
        f"{FULL_UNROLL_MAX_LAYERS} layers, else 1, a rolled scan whose compile time does not "
        "grow with depth); --remat runs the scan rolled; may change on resume",
        resume_safe=True)
    remat: str = _f(
        "none", "recompute each block's activations in the backward pass to save memory: none, "
        "full (keep only block inputs), dots (keep every product), dots_no_batch (keep the "
        "linear layers' products, recompute attention); runs the layer scan rolled, whatever "
        "--scan-unroll says (fully unrolled, it saved no memory); may change on resume",
        choices=("none", "full", "dots", "dots_no_batch"), resume_safe=True)
    attention_impl: str = _f(
        "auto", "causal attention: native (gptjax's fused float32 CPU kernel, one device, "
        "x86 with AVX-512, up to 2048 positions), blocked (query blocks that skip masked "
        "keys), xla or cudnn (jax.nn.dot_product_attention); auto = native on CPU where it "
        "can run, else blocked on CPU; cudnn on one NVIDIA GPU (compute capability 8.0+) "
        "for bfloat16/float16 with head dims that are multiples of 8 up to 128, else xla; "
        "may change on resume",
        choices=("auto", "native", "blocked", "xla", "cudnn"), resume_safe=True)
    decode_matmul: str = _f(
        "auto", "decoding's few-row products: native = gptjax's kernel for up to 8 float32 "
        "or 32 bfloat16 rows on x86 CPUs with AVX-512 (built on first use; XLA where it "
        "cannot be); auto = the same, except that one float32 row takes whichever of the "
        "kernel and XLA's dot this machine measured faster (timed once, recorded); xla = "
        "XLA's dot always",
        choices=("auto", "native", "xla"), resume_safe=True)
    quantize: str = _f(
        "none", "decoding's weights (generate, serve): none, int8 (per output channel, "
        "symmetric; gptjax's CPU kernel reads them where it runs) or int4 (group-wise, "
        "quant_group inputs per scale); training keeps float weights; may change on resume",
        choices=("none", "int8", "int4"), resume_safe=True)
    quant_group: int = _f(64, "with quantize int4: inputs that share one scale (even, and "
                              "dividing d_model and the MLP width)", resume_safe=True)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.mlp_ratio * self.d_model


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, batching, evaluation and checkpointing."""

    seed: int = _f(0, "seed for parameters, dropout and batch sampling")
    batch_size: int = _f(12, "global batch: sequences per optimizer step")
    grad_accum: int = _f(1, "micro-batches per step (the global batch stays batch_size)")
    max_steps: int = _f(2000, "optimizer steps in the whole run")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(100, "linear warm-up steps from 0 to lr")
    decay_steps: int = _f(0, "length of the warm-up and cosine schedule; 0 = max_steps "
                             "(--extend-to keeps the first length here)")
    lr_tails: str = _f("", "cosine tails added by --extend-to, START:END:LR[,...]: from START "
                           "the rate decays again from LR to min_lr at END", metavar="TAILS")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (kernels only)")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.99, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    grad_clip: float = _f(1.0, "clip gradients to this global norm; 0 disables")
    sampler: str = _f("random", "training windows: random offsets or a shuffled sliding window",
                      choices=("random", "sliding"))
    stride: int = _f(0, "sliding-window stride in tokens; 0 = context_length")
    log_every: int = _f(50, "steps between console/JSONL training records", resume_safe=True)
    log_to: str = _f("jsonl", "where metrics go: comma-separated jsonl (metrics.jsonl, always "
                     "written), tensorboard, wandb (offline unless $WANDB_MODE), mlflow (a file "
                     "store in the run folder); each tracker is an extra: pip install "
                     "'gptjax[tensorboard]'", resume_safe=True, metavar="SINKS")
    stats_every: int = _f(0, "steps between per-layer statistics (gradient, update and "
                          "parameter norms per block and kind, activation RMS, attention "
                          "entropy per head) to metrics.jsonl, stats.png and the trackers; "
                          "computed by a second compiled step only at those steps; 0 = off",
                          resume_safe=True)
    eval_every: int = _f(250, "steps between validation runs and checkpoints", resume_safe=True)
    eval_batches: int = _f(20, "validation batches per evaluation", resume_safe=True)
    keep_checkpoints: int = _f(3, "most recent checkpoints kept (the best is kept too)",
                               resume_safe=True)
    max_new_tokens: int = _f(200, "new tokens in the sample generated at the end (it runs past "
                                  "end-of-text); 0 = no sample", resume_safe=True)
    mesh: str = _f("", "device mesh, e.g. data=2,fsdp=2,tensor=2 (one axis may be -1 = the "
                       "rest); empty = data parallel over all devices. May change on resume: "
                       "checkpoints restore onto any mesh", resume_safe=True, metavar="MESH")
    on_nonfinite: str = _f(
        "abort", "a non-finite loss or gradient norm: abort (stop with an error; nothing past "
        "the last finite checkpoint is saved) or skip (drop that update, stop after max_skips "
        "in a row); may change on resume", choices=("abort", "skip"), resume_safe=True)
    max_skips: int = _f(10, "with on_nonfinite skip: dropped updates in a row that stop the run",
                        resume_safe=True)
    spike_policy: str = _f(
        "none", "a loss above spike_factor x the running median of the last 100 step losses: "
        "none (train on) or rollback (restore the last checkpoint and skip the batches since "
        "it); may change on resume", choices=("none", "rollback"), resume_safe=True)
    spike_factor: float = _f(3.0, "with spike_policy rollback: how many times the median loss "
                                  "is a spike", resume_safe=True)
    peak_flops: float = _f(0.0, "peak FLOP/s for MFU; 0 = the data-sheet bf16 peak of known "
                                "accelerators, else this CPU's recorded matmul rate (then saved "
                                "with the run)", resume_safe=True)
    peak_source: str = _f("", "where peak_flops came from, set by the run: flag, a data sheet, "
                              "this machine's recorded matmul rate, or a rate a step achieved "
                              "above it", resume_safe=True)


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from."""

    data: str = _f("", "prepared data directory (gptjax prepare); empty = embedded corpus",
                   metavar="DIR")
    tokenizer: str = _f("", "char, byte or gpt2; empty = char for the embedded corpus, else the "
                            "prepared data's (a different one is an error)",
                        choices=TOKENIZER_KINDS)
    val_fraction: float = _f(0.1, "share of the embedded corpus held out for validation")
    gpt2_ranks: str = _f("", "local GPT-2 BPE ranks file (else $GPTJAX_GPT2_RANKS, else download)",
                         resume_safe=True, metavar="FILE")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}

# Model presets. The GPT-2 shapes are OpenAI's, but their 50,257-row vocabulary is padded
# to 50,304 rows (a multiple of 128; `gptjax generate` never samples the extra rows): on an
# H100 that made GPT-2 124M's step 1.06x faster. Pretrained weights keep their own
# vocabulary (their config.json). "baby" is nanoGPT's CPU example and "mini" the ~10M
# config the throughput issue measures.
GPT2_VOCAB_PADDED = 50304
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, d_model=32, context_length=32),
    "baby": dict(n_layer=4, n_head=4, d_model=128, context_length=64),
    "mini": dict(n_layer=6, n_head=6, d_model=384, context_length=256),
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, context_length=1024,
                 vocab_size=GPT2_VOCAB_PADDED),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024, context_length=1024,
                        vocab_size=GPT2_VOCAB_PADDED),
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280, context_length=1024,
                       vocab_size=GPT2_VOCAB_PADDED),
    "gpt2-xl": dict(n_layer=48, n_head=25, d_model=1600, context_length=1024,
                    vocab_size=GPT2_VOCAB_PADDED),
}


DEFAULT_PRESET = "baby"


def preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset with optional field overrides."""
    if name not in PRESETS:
        raise GptjaxError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(ModelConfig(), **{**PRESETS[name], **overrides})


def check_quantize(m: ModelConfig) -> None:
    """int4's groups must tile every product's inputs: d_model, heads x head_dim, the MLP."""
    if m.quantize == "int4" and (m.quant_group < 2 or m.quant_group % 2 or m.d_model % m.quant_group
                                 or m.d_mlp % m.quant_group):
        raise GptjaxError(f"model.quant_group {m.quant_group} must be even and divide d_model "
                          f"({m.d_model}) and the MLP width ({m.d_mlp})")


def validate(cfg: RunConfig) -> RunConfig:
    """Raise GptjaxError for the first inconsistent or out-of-range field."""
    m, t, d = cfg.model, cfg.train, cfg.data
    for section, cls in SECTIONS.items():  # a hand-edited or older config.json included
        for f in dataclasses.fields(cls):
            value, choices = getattr(getattr(cfg, section), f.name), f.metadata.get("choices")
            if choices and value not in choices and value != f.default:  # "" = resolved later
                raise GptjaxError(f"{section}.{f.name} must be one of {', '.join(choices)}, "
                                  f"got {value!r}")
    for name in ("context_length", "n_layer", "n_head", "d_model", "mlp_ratio"):
        _positive(f"model.{name}", getattr(m, name))
    for name in ("vocab_size", "scan_unroll"):  # 0: the tokenizer's / auto
        if getattr(m, name) < 0:
            raise GptjaxError(f"model.{name} must be >= 0, got {getattr(m, name)}")
    if m.d_model % m.n_head:
        raise GptjaxError(f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    if not 0.0 <= m.dropout < 1.0:
        raise GptjaxError(f"model.dropout must be in [0, 1), got {m.dropout}")
    check_quantize(m)
    if not 0 <= t.seed < 2**31:
        raise GptjaxError(f"train.seed must be in [0, 2**31), got {t.seed}")
    if t.spike_factor <= 1.0:
        raise GptjaxError(f"train.spike_factor must be above 1, got {t.spike_factor}")
    for name in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every",
                 "eval_batches", "keep_checkpoints", "max_skips"):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("lr", "beta2", "eps"):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("min_lr", "warmup_steps", "weight_decay", "grad_clip", "stride",
                 "max_new_tokens", "peak_flops", "beta1", "stats_every"):
        if not getattr(t, name) >= 0:
            raise GptjaxError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.min_lr > t.lr:
        raise GptjaxError(f"train.min_lr ({t.min_lr}) exceeds train.lr ({t.lr})")
    if t.batch_size % t.grad_accum:
        raise GptjaxError(f"train.batch_size ({t.batch_size}) must be divisible by "
                          f"train.grad_accum ({t.grad_accum})")
    if t.warmup_steps >= t.max_steps:
        raise GptjaxError(f"train.warmup_steps ({t.warmup_steps}) must be less than "
                          f"train.max_steps ({t.max_steps}); set it with --warmup-steps")
    check_tails(t)
    if not (t.beta1 < 1 and t.beta2 < 1):
        raise GptjaxError("train.beta1 and train.beta2 must be below 1")
    parse_mesh(t.mesh)
    if d.tokenizer not in ("", *TOKENIZER_KINDS):
        raise GptjaxError(f"unknown tokenizer {d.tokenizer!r}; choose one of {', '.join(TOKENIZER_KINDS)}")
    if not 0.0 < d.val_fraction < 1.0:
        raise GptjaxError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    return cfg


def _positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise GptjaxError(f"{name} must be positive, got {value}")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


# Fields renamed since runs were first written: old config.json files still load.
RENAMED = {"train": {"sample_tokens": "max_new_tokens"}}


def from_dict(raw: dict) -> RunConfig:
    """Rebuild a RunConfig from to_dict() output, rejecting unknown fields."""
    sections = {}
    for section, cls in SECTIONS.items():
        values = {RENAMED.get(section, {}).get(k, k): v for k, v in raw.get(section, {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GptjaxError(f"unknown {section} config field(s): {', '.join(unknown)}")
        sections[section] = cls(**values)
    return RunConfig(**sections)


def save(cfg: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load(path: Path) -> RunConfig:
    try:
        return from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise GptjaxError(f"cannot read config {path}: {e}") from None


def training_differences(saved: RunConfig, given: RunConfig) -> list[str]:
    """Fields that differ between two configs and would change the training trajectory."""
    diffs = []
    for section, cls in SECTIONS.items():
        a, b = getattr(saved, section), getattr(given, section)
        for f in dataclasses.fields(cls):
            if f.metadata.get("resume_safe"):
                continue
            if getattr(a, f.name) != getattr(b, f.name):
                diffs.append(f"{section}.{f.name} (run has {getattr(a, f.name)!r}, "
                             f"given {getattr(b, f.name)!r})")
    return diffs


# ---- train.lr_tails: the cosine tails of an extended run (gptjax/training/extend.py) ----

class Tail(NamedTuple):
    start: int  # the step from which this cosine applies
    end: int  # where it reaches min_lr (the run's max_steps, for the last tail)
    lr: float  # the rate at `start`


def parse_tails(spec: str) -> list[Tail]:
    if not spec:
        return []
    tails = []
    for part in spec.split(","):
        try:
            start, end, lr = part.split(":")
            tails.append(Tail(int(start), int(end), float(lr)))
        except ValueError:
            raise GptjaxError(f"train.lr_tails: {part!r} is not START:END:LR "
                              "(e.g. 60:80:0.0001)") from None
    return tails


def format_tails(tails: list[Tail]) -> str:
    return ",".join(f"{t.start}:{t.end}:{t.lr!r}" for t in tails)


def check_tails(train) -> None:
    """Each tail starts after the one before, within it, and the last ends at max_steps."""
    tails = parse_tails(train.lr_tails)
    if train.decay_steps < 0:
        raise GptjaxError(f"train.decay_steps must be >= 0, got {train.decay_steps}")
    previous_end = train.decay_steps or train.max_steps
    previous_start = 0
    for t in tails:
        if not previous_start < t.start <= previous_end or t.end <= t.start or t.lr < 0:
            raise GptjaxError(f"train.lr_tails: {format_tails([t])} must start after step "
                              f"{previous_start}, by step {previous_end}, and end after it "
                              "starts, from a learning rate >= 0")
        previous_start, previous_end = t.start, t.end
    if tails and tails[-1].end != train.max_steps:
        raise GptjaxError(f"train.lr_tails ends at step {tails[-1].end}, but train.max_steps "
                          f"is {train.max_steps}")


# ---- the mesh spec: written in the config, resolved against devices in gptjax.parallel ----

AXES = ("data", "fsdp", "tensor")


def parse_mesh(spec: str | dict | None) -> dict[str, int]:
    """{"data": n, "fsdp": n, "tensor": n} from "data=2,fsdp=-1" (or a dict, or None = data=-1)."""
    if spec is None or spec == "":
        return {"data": -1, "fsdp": 1, "tensor": 1}
    if isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, eq, value = part.strip().partition("=")
            if not eq:
                raise GptjaxError(f"mesh entry {part.strip()!r} is not AXIS=SIZE (e.g. data=2,fsdp=4)")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise GptjaxError(f"mesh axis {name.strip()} has a non-integer size {value!r}") from None
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise GptjaxError(f"unknown mesh axis {', '.join(unknown)}; the axes are {', '.join(AXES)}")
    bad = [f"{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
    if bad:
        raise GptjaxError(f"mesh axis sizes must be positive or -1 (the rest): {', '.join(bad)}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise GptjaxError("at most one mesh axis may be -1 (the remaining devices)")
    return {axis: sizes.get(axis, 1) for axis in AXES}
