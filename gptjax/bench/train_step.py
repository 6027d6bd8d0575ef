"""The train step as training compiles it, timed: throughput, MFU and memory.

The step is `make_train_step` with `optim.optimizer` and `init_state`, jitted with the
state donated and laid out on the mesh exactly as `gptjax.training.compiled.CompiledSteps`
does, and compiled ahead of time so compile time is measured apart from run time. The
protocol (`gptjax.bench.timing`, shared with benchmarks/): warm-up steps first; then each
repeat dispatches `steps` steps back to back and blocks once, on the final state and
metrics, with no compiles while the clock runs; results are the median (with min and max)
of the repeats.

FLOPs use the PaLM formula (`gptjax.training.metrics.MFU_FORMULA`). The MFU denominator is
the data-sheet bf16 peak of a known accelerator, else the float32 matmul rate measured in
the same run (the best of a measurement before and one after the timed cases). Compile
time in fresh processes is `gptjax.bench.compile`. This module never imports torch.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import model
from gptjax.bench.timing import RecompileError, median_min_max, no_compiles  # noqa: F401  (the protocol, with the step)
from gptjax.config import ModelConfig, TrainConfig
from gptjax.cpu import host_memory
from gptjax.data.windows import WindowSampler, gather
from gptjax.errors import GptjaxError
from gptjax.model import attention
from gptjax.parallel.mesh import make_mesh
from gptjax.parallel.sharding import batch_sharding, check_batch, check_divisible, shardings
from gptjax.training import optim
from gptjax.training.metrics import MFU_FORMULA, PEAK_BF16, flops_per_token, measure_matmul_flops
from gptjax.training.step import init_state, make_step_parts, make_train_step

__all__ = ["MFU_FORMULA", "RecompileError", "TrainStepBench", "build_train_step",
           "median_min_max",
           "no_compiles", "peak_rss_mib", "random_batches", "remeasure_peak", "resolve_peak",
           "run_train_bench", "throughput", "time_steps"]

@dataclass
class TrainStepBench:
    """A compiled train step and everything needed to run and account for it."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    step: Any  # (state, batch) -> (state, metrics): the AOT-compiled executable, or a
    # function of two (build_train_step's fused_update=False)
    init_state: Any  # jitted () -> fresh state on the step's shardings
    batch_sharding: NamedSharding
    lower_seconds: float  # trace + lower to StableHLO
    compile_seconds: float  # XLA compile (or persistent-cache load)
    memory: dict
    attention: str  # the formulation traced into the step (attention_impl resolved)

    @property
    def tokens_per_step(self) -> int:
        return self.train_cfg.batch_size * self.model_cfg.context_length

    @property
    def flops_per_token(self) -> float:
        return flops_per_token(self.model_cfg, model.param_count(self.model_cfg, exclude_position=True))

    def put(self, batch: dict) -> dict:
        """A host batch placed the way the compiled step expects it."""
        return {k: jax.device_put(v, self.batch_sharding) for k, v in batch.items()}


def build_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, *, donate: bool = True,
                     fused_update: bool = True, stats: bool = False) -> TrainStepBench:
    """Lower and compile the training step as `gptjax.training.train.CompiledSteps` builds it.

    `donate=False` and `fused_update=False` build what training does not, for the A/B that
    measures them (benchmarks/train_step_ab.py): the state not donated, and the gradients
    and the optimizer update as two jits called one after the other. `step` is then a
    function of the two executables, and the compile times and memory plans are the two
    parts' sums. `stats=True` builds the statistics step that `train.stats_every` runs at
    its steps (per-layer norms, activation RMS, attention entropy)."""
    mesh = make_mesh(train_cfg.mesh)
    check_divisible(model_cfg, mesh)
    check_batch(train_cfg.batch_size, mesh, train_cfg.grad_accum)
    tx = optim.optimizer(train_cfg)
    abstract = jax.eval_shape(lambda: init_state(model_cfg, train_cfg, tx))
    state_sharding = shardings(abstract, mesh)
    rows = batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    tokens = jax.ShapeDtypeStruct((train_cfg.batch_size, model_cfg.context_length), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens}
    state_donation = (0,) if donate else ()
    with jax.set_mesh(mesh):
        if fused_update:
            parts = [(jax.jit(make_train_step(model_cfg, train_cfg, tx, stats=stats),
                              donate_argnums=state_donation, in_shardings=(state_sharding, rows),
                              out_shardings=(state_sharding, replicated)), (abstract, batch))]
        else:
            gradients, update = make_step_parts(model_cfg, train_cfg, tx, stats=stats)
            grads_sharding = (state_sharding.params, replicated, replicated, replicated)
            grads_abstract = jax.eval_shape(gradients, abstract, batch)
            parts = [(jax.jit(gradients, in_shardings=(state_sharding, rows),
                              out_shardings=grads_sharding), (abstract, batch)),
                     (jax.jit(update, donate_argnums=state_donation,
                              in_shardings=(state_sharding, *grads_sharding),
                              out_shardings=(state_sharding, replicated)),
                      (abstract, *grads_abstract))]
        t0 = time.perf_counter()
        lowered = [jitted.lower(*args) for jitted, args in parts]
        t1 = time.perf_counter()
        compiled = [low.compile() for low in lowered]
        t2 = time.perf_counter()
        fresh = jax.jit(lambda: init_state(model_cfg, train_cfg, tx), out_shardings=state_sharding)
    plans = [memory_stats(c) for c in compiled]
    memory = {k: sum(p[k] for p in plans) for k in plans[0]} if all(plans) else {}
    for c in compiled:
        note = host_memory.fit_to_compiled(c)
        if note:
            warnings.warn(note)
    if fused_update:
        step = compiled[0]
    else:
        def step(state, batch, grads_fn=compiled[0], update_fn=compiled[1]):
            return update_fn(state, *grads_fn(state, batch))
    return TrainStepBench(model_cfg, train_cfg, step, fresh, rows, t1 - t0, t2 - t1, memory,
                          traced_attention(model_cfg, train_cfg.batch_size, lowered[0]))


def traced_attention(cfg: ModelConfig, batch_size: int, lowered) -> str:
    """The attention formulation in a lowered train step: what attention_impl resolves to
    for its shapes, except that "auto" takes XLA's when cuDNN refuses while tracing (with
    a warning), seen as no cuDNN attention call in the lowered module."""
    qkv = jax.ShapeDtypeStruct((batch_size, cfg.context_length, 3, cfg.n_head,
                                cfg.d_model // cfg.n_head), jnp.dtype(cfg.dtype))
    chosen = attention.choose_impl(qkv, cfg.attention_impl)
    if chosen == "cudnn" and "__cudnn$fmha" not in lowered.as_text():
        return "xla"
    return chosen


def memory_stats(compiled) -> dict:
    """Bytes XLA planned for the step (arguments, outputs, temporaries), where reported."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        m = None
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    # Donated outputs reuse argument buffers (alias): count them once.
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first device (GPU/TPU allocators report it; CPU does not)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        return None
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def parse_case(text: str) -> tuple[str, int, int]:
    """A benchmark case written PRESET:BATCH:CONTEXT (e.g. baby:12:64), as the scripts in
    benchmarks/ take them."""
    try:
        name, batch, context = text.split(":")
        return name, int(batch), int(context)
    except ValueError:
        raise GptjaxError(f"bad case {text!r}: expected PRESET:BATCH:CONTEXT, e.g. baby:12:64") from None


def random_batches(n: int, batch_size: int, context: int, vocab: int, seed: int = 0,
                   corpus_tokens: int = 1 << 16) -> list[dict]:
    """`n` host batches of windows (WindowSampler, as training draws them) from random tokens."""
    rng = np.random.default_rng(seed)
    corpus = rng.integers(0, vocab, max(corpus_tokens, context + 1), dtype=np.int32)
    sampler = WindowSampler(len(corpus), context, batch_size, "random", seed=seed)
    return [gather(corpus, sampler.starts(i), context) for i in range(n)]


def time_steps(bench: TrainStepBench, state, batches: list[dict], steps: int):
    """Run `steps` steps back to back, block once at the end: (seconds, state, metrics)."""
    t0 = time.perf_counter()
    metrics = None
    for i in range(steps):
        state, metrics = bench.step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - t0, state, metrics


def throughput(bench: TrainStepBench, seconds: list[float], steps: int, peak: float) -> dict:
    """Tokens/s, ms/step, achieved FLOP/s and MFU from per-repeat wall times of `steps` steps."""
    tok = [bench.tokens_per_step * steps / s for s in seconds]
    fpt = bench.flops_per_token
    return {"tokens_per_s": median_min_max(tok),
            "ms_per_step": median_min_max(1000 * s / steps for s in seconds),
            "flops_per_s": statistics.median(tok) * fpt,
            "mfu": statistics.median(tok) * fpt / peak,
            "flops_per_token": fpt, "repeat_seconds": seconds}


def run_train_bench(bench: TrainStepBench, *, steps: int, repeats: int, warmup: int,
                    peak: float, n_batches: int = 4):
    """The protocol on one compiled step: warm up, time `repeats` x `steps`, summarize.

    Returns (summary dict, the final train state).
    """
    m, t = bench.model_cfg, bench.train_cfg
    batches = [bench.put(b) for b in random_batches(n_batches, t.batch_size, m.context_length,
                                                    m.vocab_size, t.seed)]
    state = bench.init_state()
    _, state, _ = time_steps(bench, state, batches, max(warmup, 1))
    seconds = []
    with no_compiles("the timed train steps") as guard:
        for _ in range(repeats):
            elapsed, state, metrics = time_steps(bench, state, batches, steps)
            seconds.append(elapsed)
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"the benchmarked train step produced a non-finite loss ({loss})")
    out = throughput(bench, seconds, steps, peak)
    out.update(steps=steps, repeats=repeats, warmup_steps=max(warmup, 1), last_loss=loss,
               no_recompile_guard=guard.summary())
    return out, state


def resolve_peak(configured: float = 0.0) -> dict:
    """The MFU denominator: configured, the data-sheet bf16 peak of a known chip, or measured."""
    if configured > 0:
        return {"flops_per_s": configured, "source": "configured"}
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return {"flops_per_s": peak * jax.device_count(),
                    "source": f"data sheet: {name} dense bf16 x {jax.device_count()} device(s)"}
    rate = measure_matmul_flops() * jax.device_count()
    return {"flops_per_s": rate, "source": "measured float32 matmul (1024^3, best of 10)",
            "measured": [rate]}


def remeasure_peak(peak: dict) -> dict:
    """Measure the matmul rate again (after the cases) and keep the better of the two."""
    if "measured" not in peak:
        return peak
    rate = measure_matmul_flops() * jax.device_count()
    measured = peak["measured"] + [rate]
    return {**peak, "flops_per_s": max(measured), "measured": measured}


