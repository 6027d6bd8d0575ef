"""`gptjax bench`: train-step throughput, MFU, compile time, memory and decode latency.

A thin shell over gptjax.bench.train_step: one case per preset x batch x context (or the lists
paired element-wise with --zip), each measured by the same protocol (GUIDE.md §5).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import tempfile
from pathlib import Path

from gptjax.cli.options import add_old_spellings
from gptjax.errors import GptjaxError

DESCRIPTION = """\
Measure gptjax's training step (as `gptjax train` builds it: same optimizer, donated
state, mesh layout) on random tokens, for every combination of --preset, --batch and
--context:

  tokens/s and ms/step: after --warmup steps, --repeats repeats of --steps steps each,
    dispatched back to back and blocked on once at the end; median (min-max) of repeats;
    any JAX trace or compile while the clock runs is an error (asserted, not assumed);
  MFU by the PaLM formula 6N + 12*L*d*T FLOPs per token (N without position embeddings)
    over the data-sheet bf16 peak of known accelerators, else the float32 matmul rate
    measured in this run;
  compile time (trace+lower, and XLA compile) apart from run time; with --compile-cache,
    also in fresh processes: cold, then again with JAX's persistent compilation cache;
  memory: XLA's plan for the step (arguments, outputs, temporaries) and the process's
    peak resident memory so far (cumulative over cases);
  with --decode, time to first token and ms/token of the KV-cache decoder (random
    weights, greedy, no early stop).

Freed host memory is kept for reuse as in `gptjax train` (recorded with the results;
GPTJAX_KEEP_FREED_MEMORY=0 measures glibc's default instead).

Examples:
  gptjax bench --preset baby,mini --batch-size 12,8 --context-length 64,256 --zip
  gptjax bench --preset gpt2 --batch-size 16 --context-length 1024 --dtype bfloat16  # on a GPU
  gptjax bench --preset tiny --steps 2 --repeats 1 --json out.json --results RESULTS.md
"""


def add_parser(sub) -> None:
    """Register the `bench` subcommand on the CLI's subparsers."""
    p = sub.add_parser("bench", help="measure train-step tokens/s, MFU, compile time, memory, decode",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="baby", metavar="LIST",
                   help="comma-separated model presets (default: baby)")
    p.add_argument("--batch-size", default="12", metavar="LIST",
                   help="comma-separated batch sizes (default: 12)")
    p.add_argument("--context-length", metavar="LIST",
                   help="comma-separated context lengths (default: each preset's)")
    p.add_argument("--zip", action="store_true", help="pair the lists element-wise instead of "
                   "taking every combination (lists of length 1 are repeated)")
    p.add_argument("--vocab-size", type=int, metavar="INT",
                   help="vocabulary size (default: the preset's, else 65 = "
                   "nanoGPT's shakespeare_char, for parity with its CPU numbers)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; parameters and optimizer state stay float32 (default: float32)")
    p.add_argument("--repeats", type=int, default=5, metavar="INT", help="timed repeats (default: 5; the "
                   "protocol asks for >= 5)")
    p.add_argument("--steps", type=int, default=10, metavar="INT",
                   help="train steps per repeat (default: 10)")
    p.add_argument("--warmup", type=int, default=3, metavar="INT", help="untimed steps first (default: 3)")
    p.add_argument("--peak-flops", type=float, default=0.0, metavar="FLOAT", help="MFU denominator in FLOP/s "
                   "(default: data sheet of known accelerators, else measured f32 matmul)")
    p.add_argument("--compile-cache", action="store_true", help="also time the compile in fresh "
                   "processes: cold, then with JAX's persistent compilation cache")
    p.add_argument("--decode", action="store_true", help="add decode rows (time to first token, "
                   "ms/token) for each preset and context")
    p.add_argument("--decode-batch-size", default="1", metavar="LIST",
                   help="comma-separated decode batch sizes "
                   "(default: 1)")
    p.add_argument("--decode-prompt-tokens", type=int, metavar="INT",
                   help="prompt tokens (default: min(32, context/4))")
    p.add_argument("--decode-new-tokens", type=int, metavar="INT",
                   help="new tokens (default: min(128, context - prompt))")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON here")
    p.add_argument("--results", metavar="FILE", help="append the markdown table (with hardware, "
                   "versions, flags and this command) to this file, e.g. benchmarks/RESULTS.md")
    p.add_argument("--remeasure-peak", action="store_true", help="measure this CPU's float32 and "
                   "bfloat16 matmul rates again (a few seconds on a quiet machine) and replace the "
                   "record that `gptjax train` uses as MFU's peak, then stop; the benchmark "
                   "itself always measures the rate in the same run")
    add_old_spellings(p)


def _remeasure_peak() -> int:
    import jax

    from gptjax.cpu import peak
    if jax.devices()[0].platform != "cpu":
        raise GptjaxError("--remeasure-peak measures a CPU; accelerators use their data-sheet peaks")
    for dtype in ("float32", "bfloat16"):
        old, new, saved = peak.remeasure(dtype)
        before = f"was {old / 1e12:.3g}" if old else "none recorded before"
        print(f"{peak.key(dtype)}: {new / 1e12:.3g} TFLOP/s ({before})"
              + ("" if saved else f"; not recorded: {peak.record_path()} is not writable"))
    print(f"record: {peak.record_path()}")
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise GptjaxError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise GptjaxError(f"{flag} values must be positive, got {text!r}")
    return values


def _cases(args) -> list[tuple[str, int, int | None]]:
    from gptjax.config import PRESETS

    presets = [p.strip() for p in args.preset.split(",")]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise GptjaxError(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    batches = _ints(args.batch_size, "--batch-size")
    contexts = _ints(args.context_length, "--context-length") if args.context_length else [None]
    if not args.zip:
        return list(itertools.product(presets, batches, contexts))
    n = max(len(presets), len(batches), len(contexts))
    if any(len(x) not in (1, n) for x in (presets, batches, contexts)):
        raise GptjaxError("with --zip, --preset, --batch-size and --context-length need equal lengths (or 1)")
    def pick(xs, i):
        return xs[0] if len(xs) == 1 else xs[i]
    return [(pick(presets, i), pick(batches, i), pick(contexts, i)) for i in range(n)]


def _check(args) -> None:
    if args.repeats < 1:
        raise GptjaxError(f"--repeats must be at least 1, got {args.repeats}")
    for flag in ("steps", "warmup"):
        if getattr(args, flag) < 1:
            raise GptjaxError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise GptjaxError(f"--vocab-size must be positive, got {args.vocab_size}")
    if args.peak_flops < 0:
        raise GptjaxError(f"--peak-flops must be >= 0, got {args.peak_flops}")
    for flag in ("decode_prompt_tokens", "decode_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "decode_new_tokens" else 1):
            raise GptjaxError(f"--{flag.replace('_', '-')} is too small: {value}")
    for flag in ("json", "results"):
        path = getattr(args, flag)
        if path and not Path(path).parent.is_dir():
            raise GptjaxError(f"--{flag}: no such directory: {Path(path).parent}")


def _model_config(name: str, context: int | None, args):
    from gptjax.config import PRESETS, RunConfig, TrainConfig, preset, validate

    overrides = {"dtype": args.dtype, "param_dtype": "float32"}
    if context:
        overrides["context_length"] = context
    overrides["vocab_size"] = args.vocab_size or PRESETS[name].get("vocab_size") or 65
    cfg = preset(name, **overrides)
    validate(RunConfig(model=cfg, train=TrainConfig()))
    return cfg


def run(args) -> int:
    if args.remeasure_peak:
        return _remeasure_peak()
    _check(args)
    cases = _cases(args)
    decode_batches = _ints(args.decode_batch_size, "--decode-batch-size") if args.decode else []
    configs = [(_model_config(name, ctx, args), name, batch) for name, batch, ctx in cases]

    from gptjax.bench import decode as bench_decode
    from gptjax.bench import provenance
    from gptjax.bench import train_step as bench
    from gptjax.bench.compile import compile_in_subprocess
    from gptjax.config import TrainConfig
    from gptjax.cpu import host_memory
    from gptjax.model.gpt import param_count

    decode_models = []  # distinct (config, preset name): the batch does not change a decode row
    for cfg, name, _ in configs:
        if decode_batches and all(cfg != c for c, _ in decode_models):
            prompt, new = bench_decode.decode_lengths(cfg.context_length, args.decode_prompt_tokens,
                                                          args.decode_new_tokens)
            if prompt + new > cfg.context_length:
                raise GptjaxError(f"decode prompt {prompt} + {new} new tokens exceed {name}'s "
                                  f"context {cfg.context_length}")
            decode_models.append((cfg, name))
    if args.repeats < 5:
        print(f"note: --repeats {args.repeats}: the measuring protocol asks for at least 5 "
              "(medians of fewer are indicative only)")

    machine = provenance.machine_info()
    peak = bench.resolve_peak(args.peak_flops)
    print(f"{machine['device_kind']} ({machine['backend']}, {machine['cores']} cores); MFU "
          f"denominator {peak['flops_per_s'] / 1e12:.3g} TFLOP/s ({peak['source']})", flush=True)
    rows, decode_rows, decode_params = [], [], {}
    for i, (cfg, name, batch) in enumerate(configs, 1):
        label = (f"[{i}/{len(configs)}] {name} B={batch} T={cfg.context_length} {cfg.dtype} "
                 f"vocab {cfg.vocab_size}")
        print(f"{label}: compiling...", flush=True)
        train_cfg = TrainConfig(batch_size=batch, seed=0)
        step = bench.build_train_step(cfg, train_cfg)
        result, state = bench.run_train_bench(step, steps=args.steps, repeats=args.repeats,
                                              warmup=args.warmup, peak=peak["flops_per_s"])
        for j, (c, _) in enumerate(decode_models):
            if c == cfg and j not in decode_params:  # decode from the trained weights: no init
                decode_params[j] = state.params
        row = {"preset": name, "batch": batch, "context": cfg.context_length, "dtype": cfg.dtype,
               "attention": step.attention, "param_dtype": cfg.param_dtype,
               "vocab": cfg.vocab_size, "n_layer": cfg.n_layer, "d_model": cfg.d_model,
               "n_head": cfg.n_head, "params": param_count(cfg),
               "train": result,
               "compile": {"lower_seconds": step.lower_seconds,
                           "compile_seconds": step.compile_seconds,
                           "seconds": step.lower_seconds + step.compile_seconds},
               "memory": {**step.memory, "device_peak_bytes": bench.device_peak_bytes(),
                          "process_peak_rss_mib": bench.peak_rss_mib(),
                          # after build_train_step, which may have turned the policy off
                          "host_memory": host_memory.status()}}
        if args.compile_cache:
            with tempfile.TemporaryDirectory(prefix="gptjax-jax-cache-") as cache:
                row["compile"]["cold_process"] = compile_in_subprocess(cfg, train_cfg, cache)
                row["compile"]["cached_process"] = compile_in_subprocess(cfg, train_cfg, cache)
        rows.append(row)
        del state, step  # free the case's buffers before the next one compiles
        tok = result["tokens_per_s"]
        print(f"{label}: {tok['median']:,.0f} tok/s ({tok['min']:,.0f}-{tok['max']:,.0f}), "
              f"{result['ms_per_step']['median']:.1f} ms/step, MFU {100 * result['mfu']:.1f}%, "
              f"{row['attention']} attention, "
              f"compile {row['compile']['seconds']:.1f}s" + _cache_note(row["compile"]), flush=True)
    policies = {row["memory"]["host_memory"] for row in rows}
    machine["host_memory"] = policies.pop() if len(policies) == 1 else "differs by case (see JSON)"
    for j, (cfg, name) in enumerate(decode_models):
        prompt, new = bench_decode.decode_lengths(cfg.context_length, args.decode_prompt_tokens,
                                                          args.decode_new_tokens)
        for batch in decode_batches:
            d = bench_decode.run_decode_bench(cfg, batch, prompt, new, args.repeats,
                                       params=decode_params.get(j))
            d.update(preset=name, context=cfg.context_length, dtype=cfg.dtype)
            decode_rows.append(d)
            print(f"decode {name} T={cfg.context_length} batch {batch}: first token "
                  f"{d['ttft_ms']['median']:.1f} ms, {d['ms_per_token']['median']:.2f} ms/token",
                  flush=True)
    peak = bench.remeasure_peak(peak)
    for row in rows:  # the final denominator: the best matmul rate seen in this run
        row["train"]["mfu"] = row["train"]["flops_per_s"] / peak["flops_per_s"]
    if sys.argv[1:2] == ["bench"]:  # run as `gptjax bench ...` / `python -m gptjax bench ...`
        command = "gptjax " + shlex.join(sys.argv[1:])
    else:
        command = "gptjax bench " + _argv_of(args)
    report = {"machine": machine, "command": command,
              "protocol": {"repeats": args.repeats, "steps": args.steps, "warmup": args.warmup},
              "flops_formula": bench.MFU_FORMULA, "peak": peak, "train": rows, "decode": decode_rows}
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table)
    return 0


def _argv_of(args) -> str:
    """The command line reconstructed from parsed arguments (when called as a library)."""
    parts = []
    for key, value in sorted(vars(args).items()):
        if key == "command" or value in (None, False):
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def _cache_note(compile_: dict) -> str:
    if "cold_process" not in compile_:
        return ""
    return (f" (fresh process: cold {compile_['cold_process']['seconds']:.1f}s, persistent cache "
            f"{compile_['cached_process']['seconds']:.1f}s)")


def _mib(n) -> str:
    return f"{n / 2**20:,.0f}" if n is not None else "–"


def markdown(report: dict) -> str:
    """The results as a markdown section: header line, then one table row per case."""
    m, peak = report["machine"], report["peak"]
    measured = peak.get("measured")
    peak_text = (f"float32 matmul rate measured in this run ({', '.join(f'{r / 1e9:.0f}' for r in measured)}"
                 " GFLOP/s; the best is used)" if measured else peak["source"])
    p = report["protocol"]
    lines = [f"### gptjax bench ({m['date']})", "",
             f"{m['device_kind']} x {m['device_count']} ({m['backend']}); host {m['cpu']}, "
             f"{m['cores']} cores, threads {m['threads'] or 'n/a'}; jax {m['jax']}, jaxlib "
             f"{m['jaxlib']}, flax {m['flax']}, optax {m['optax']}, Python {m['python']}; "
             f"XLA_FLAGS={m['xla_flags'] or '(none)'}; freed host memory: {m['host_memory']}; "
             f"gptjax's native CPU kernels: {m.get('native_kernels', 'n/a')}"
             + (f"; {' '.join(f'{k}={v}' for k, v in m['jax_env'].items())}" if m['jax_env'] else "")
             + (f"; 1-min load average {m['load_average_1min']:.1f} at the start"
                if m.get("load_average_1min") is not None else "")
             + f". dtype = compute dtype (parameters and AdamW state float32). "
             f"Median (min–max) of {p['repeats']} repeats x {p['steps']} steps after "
             f"{p['warmup']} warm-up steps, no compiles while timed (asserted). MFU: "
             f"{report['flops_formula']}, over {peak_text}. Compile = trace+lower / XLA compile "
             f"in this process; fresh-process columns: cold and with the persistent cache. "
             f"Command: `{report['command']}`.", "",
             "| preset | params | B | T | dtype | attention | tok/s (min–max) | ms/step | TFLOP/s | MFU | "
             "compile s (lower + XLA) | fresh cold s | fresh cached s | args MiB | temp MiB | "
             "peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["train"]:
        t, c, mem = r["train"], r["compile"], r["memory"]
        tok = t["tokens_per_s"]
        cold = c.get("cold_process", {}).get("seconds")
        cached = c.get("cached_process", {}).get("seconds")
        lines.append(
            f"| {r['preset']} | {r['params']:,} | {r['batch']} | {r['context']} | {r['dtype']} | "
            f"{r['attention']} | {tok['median']:,.0f} ({tok['min']:,.0f}–{tok['max']:,.0f}) | "
            f"{t['ms_per_step']['median']:.1f} | {t['flops_per_s'] / 1e12:.3g} | {100 * t['mfu']:.1f}% | "
            f"{c['seconds']:.1f} ({c['lower_seconds']:.1f} + {c['compile_seconds']:.1f}) | "
            f"{f'{cold:.1f}' if cold is not None else '–'} | "
            f"{f'{cached:.1f}' if cached is not None else '–'} | {_mib(mem.get('argument'))} | "
            f"{_mib(mem.get('temp'))} | {mem['process_peak_rss_mib']:,.0f} |")
    if report["decode"]:
        lines += ["", "| decode: preset | T | dtype | batch | prompt + new | first token ms | "
                  "ms/token | tok/s |", "|---|---|---|---|---|---|---|---|"]
        for d in report["decode"]:
            lines.append(f"| {d['preset']} | {d['context']} | {d['dtype']} | {d['batch']} | "
                         f"{d['prompt_len']} + {d['new_tokens']} | {d['ttft_ms']['median']:.1f} | "
                         f"{d['ms_per_token']['median']:.2f} | {d['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"
