"""A/B of train-step variants: the same case under different ModelConfig/TrainConfig fields.

Each variant is the train step `gptjax train` builds (gptjax.bench.train_step.build_train_step,
unless it changes how the step is jitted: below), all compiled in this one process and timed
alternately (the order flips every repeat), so the machine's drift hits every variant alike.
A variant is a comma-separated list of config overrides (so a multi-axis `mesh` cannot be
one: use a one-axis mesh), or of how the step is jitted (`donate=0`: the state not donated;
`fused_update=0`: the optimizer update in a jit of its own; `stats=1`: the per-layer
statistics step that `train.stats_every` runs); the empty variant is the preset as it
stands. Every variant's state stays in memory at once, so on an accelerator compare sizes
that fit together. Reported: median
ms/step (min-max), tokens/s, MFU (PaLM formula over gptjax.bench.train_step's peak: a data sheet on
accelerators, the measured float32 matmul rate on CPU), each variant's tokens/s over the
first's (the ratio of medians, and the median of the per-repeat ratios, each repeat's
variants having run back to back), and XLA's planned temporaries. With --compile-only
nothing runs: only the memory plans (e.g. GPT-2 XL's remat policies on a machine that could
never run it). This is the measurement behind the entries of benchmarks/NOTES.md. Freed
host memory is kept, as in `gptjax train` (gptjax/cpu/host_memory.py), unless
GPTJAX_KEEP_FREED_MEMORY=0.

    python benchmarks/train_step_ab.py --case mini:8:256 attention_impl=xla attention_impl=blocked
    python benchmarks/train_step_ab.py --case baby:12:64 scan_unroll=1 scan_unroll=4
    python benchmarks/train_step_ab.py --case mini:8:256 '' donate=0 fused_update=0
    python benchmarks/train_step_ab.py --case baby:12:64 '' stats=1   # what a statistics step costs
    python benchmarks/train_step_ab.py --case gpt2:8:1024 --compile-only \
        scan_unroll=1 remat=dots_no_batch remat=full      # remat runs the layer scan rolled
    # on a GPU (more in benchmarks/gpu_session.sh): python benchmarks/train_step_ab.py \
    #     --case gpt2:16:1024 dtype=bfloat16,attention_impl=xla dtype=bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax

from gptjax import config as C
from gptjax.bench import provenance
from gptjax.bench import train_step as bench
from gptjax.config import ModelConfig, TrainConfig, preset
from gptjax.cpu import host_memory
from gptjax.errors import GptjaxError

# Keywords of bench.build_train_step, not config fields: how the step is jitted. Training
# always donates its state and updates inside the step's jit; these measure what that is worth.
# stats=1 is the per-layer statistics step, which training runs every train.stats_every steps.
STEP_OPTIONS = ("donate", "fused_update", "stats")


def parse_variant(text: str, model_cfg: ModelConfig, train_cfg: TrainConfig):
    """'field=value,field=value' applied to whichever config has the field, then validated
    as `gptjax train` validates a run's config: (model_cfg, train_cfg, step options), the
    options being STEP_OPTIONS items (booleans) for bench.build_train_step."""
    options = {}
    for item in filter(None, text.split(",")):
        name, sep, raw = item.partition("=")
        target = next((c for c in (model_cfg, train_cfg)  # fields, not properties
                       if name in {f.name for f in dataclasses.fields(c)}), None)
        if not sep or (target is None and name not in STEP_OPTIONS):
            raise GptjaxError(f"bad variant item {item!r}: expected FIELD=VALUE of a model or "
                              f"train config field, or one of {', '.join(STEP_OPTIONS)}")
        kind = bool if target is None else type(getattr(target, name))
        try:
            value = parse_bool(raw) if kind is bool else kind(raw)
        except ValueError:
            raise GptjaxError(f"bad variant item {item!r}: {name} takes {kind.__name__} values") from None
        if target is None:
            options[name] = value
        elif target is model_cfg:
            model_cfg = dataclasses.replace(model_cfg, **{name: value})
        else:
            train_cfg = dataclasses.replace(train_cfg, **{name: value})
    C.validate(C.RunConfig(model=model_cfg, train=train_cfg))
    return model_cfg, train_cfg, options


def parse_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise ValueError(raw)


def base_configs(case: str, vocab: int | None) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a PRESET:BATCH:CONTEXT case that variants start from: the preset at
    that context with `vocab` (default: the preset's, else 65), and a train config whose
    schedule is long enough that no timed step reaches its end."""
    name, batch, context = bench.parse_case(case)
    model_cfg = preset(name, context_length=context)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab or model_cfg.vocab_size or 65)
    return model_cfg, TrainConfig(batch_size=batch, max_steps=10_000, warmup_steps=10)


def machine_name(info: dict) -> str:
    """What ran the steps, from provenance.machine_info(): the CPU's model, else the device's kind."""
    return info["cpu"] if info["backend"] == "cpu" else info["device_kind"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="FIELD=VALUE[,FIELD=VALUE] per variant ('' = as is)")
    ap.add_argument("--case", default="mini:8:256", help="preset:batch:context")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's, else 65)")
    ap.add_argument("--steps", type=int, default=0, help="steps per repeat (0: about 1 s)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile-only", action="store_true", help="print memory plans, run nothing")
    args = ap.parse_args(argv)
    host_memory.keep_freed_memory()  # as `gptjax train` does; before JAX's runtime starts
    base_model, base_train = base_configs(args.case, args.vocab)
    vocab = base_model.vocab_size
    runs = []
    for text in args.variants:
        m, t, options = parse_variant(text, base_model, base_train)
        step = bench.build_train_step(m, t, **options)
        temp = step.memory.get("temp", 0) / 2**30
        if args.compile_only:
            print(f"| {text or '(as is)'} | temporaries {temp:.2f} GiB | compile "
                  f"{step.lower_seconds + step.compile_seconds:.1f} s |")
            continue
        batches = [step.put(b) for b in bench.random_batches(4, t.batch_size, m.context_length,
                                                             m.vocab_size)]
        state = step.init_state()
        warm, state, _ = bench.time_steps(step, state, batches, 2)
        runs.append({"label": text or "(as is)", "step": step, "batches": batches,
                     "state": state, "warm": warm / 2, "ms": [], "temp": temp})
    if args.compile_only:
        return
    peak = bench.resolve_peak()
    steps = args.steps or max(1, round(1.0 / min(r["warm"] for r in runs)))
    with bench.no_compiles("the timed train steps"):
        for rep in range(args.repeats):
            for r in (runs if rep % 2 == 0 else runs[::-1]):
                seconds, r["state"], _ = bench.time_steps(r["step"], r["state"], r["batches"], steps)
                r["ms"].append(1000 * seconds / steps)
    info = provenance.machine_info()
    print(f"case {args.case}, vocab {vocab}, {steps} steps x {args.repeats} alternating "
          f"repeats; {machine_name(info)}, "
          f"jax {jax.__version__}; "
          f"freed host memory: {info['host_memory']}; gptjax's native CPU kernels: "
          f"{info['native_kernels']}")
    print(f"MFU over {peak['flops_per_s'] / 1e12:.3g} TFLOP/s ({peak['source']})")
    print("| variant | attention | ms/step median (min-max) | tokens/s | MFU | tokens/s vs first | "
          "vs first per repeat, median (min-max) | temporaries GiB |\n|---|---|---|---|---|---|---|---|")
    medians = [statistics.median(r["ms"]) for r in runs]
    tokens_per_s = [r["step"].tokens_per_step / (ms / 1000) for r, ms in zip(runs, medians)]
    for r, ms, rate in zip(runs, medians, tokens_per_s):
        mfu = rate * r["step"].flops_per_token / peak["flops_per_s"]
        # Repeat i of every variant ran back to back, so their ratio sees the same machine.
        paired = [a / b for a, b in zip(runs[0]["ms"], r["ms"])]
        print(f"| {r['label']} | {r['step'].attention} | {ms:.1f} ({min(r['ms']):.1f}-{max(r['ms']):.1f}) | "
              f"{rate:,.0f} | {mfu:.1%} | {rate / tokens_per_s[0]:.2f}x | "
              f"{statistics.median(paired):.3f}x ({min(paired):.2f}-{max(paired):.2f}) | {r['temp']:.2f} |")


if __name__ == "__main__":
    try:
        main()
    except GptjaxError as e:
        raise SystemExit(f"train_step_ab: error: {e}") from None
