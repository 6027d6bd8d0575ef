"""Weight-only quantization (gptjax.model.quantize): what int8 and int4 cost in perplexity
on a trained model, what they gain in decode speed, and the bytes of the weights.

1. Perplexity: the script trains a `baby` run on the embedded corpus (`gptjax train`,
   --steps steps, into a temporary folder), then scores its whole validation split with
   float weights and with each quantization (`gptjax eval --quantize`: the weights rounded
   through the grid, which is what a quantized decode computes with).
2. Decode: GPT-2 124M's shape with random weights, greedy, batch 1 and 8, float32,
   bfloat16, int8 and int4, in one process; rounds alternate the settings so the
   machine's drift hits all alike, and each cell is the median over rounds.
3. Bytes: the decode layout's weights as each setting holds them in memory.

    python benchmarks/quantization.py --steps 600 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax

from gptjax import config as C
from gptjax import model
from gptjax.bench import provenance
from gptjax.bench.decode import run_decode_bench
from gptjax.bench.trained import train_small_run
from gptjax.eval.loss import evaluate
from gptjax.model.gpt import cast
from gptjax.model.quantize import quantized_config, weight_bytes

SETTINGS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"),
            "int8": ("float32", "int8"), "int4": ("float32", "int4")}


def perplexities(steps: int, groups: list[int]) -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "baby"
        train_small_run(run, steps)
        cases = [("float32", "none", 64), ("int8", "int8", 64),
                 *((f"int4 (group {g})", "int4", g) for g in groups)]
        rows = []
        for name, mode, group in cases:
            r = evaluate(run, full=True, quantize=mode, quant_group=group)
            rows.append({"weights": name, "loss": r.loss, "perplexity": r.perplexity,
                         "tokens": r.tokens})
        return rows, f"baby, {steps} steps on the embedded corpus"


def decode_table(preset: str, group: int, batches: list[int], rounds: int, prompt: int,
                 new: int) -> list[dict]:
    base = C.preset(preset, vocab_size=50257)
    params = model.init(base, jax.random.PRNGKey(0))
    configs = {}
    for name, (dtype, mode) in SETTINGS.items():
        p, c = cast(params, base, dtype) if dtype != "float32" else (params, base)
        if mode != "none":
            c = quantized_config(c, mode, group)
        configs[name] = (model.decode_params(p, c), c)
    times = {(name, b): [] for name in configs for b in batches}
    for i in range(rounds):
        order = list(configs) if i % 2 == 0 else list(reversed(configs))
        for name in order:
            p, c = configs[name]
            for b in batches:
                r = run_decode_bench(c, b, prompt, new, 1, params=p)
                times[name, b].append(r["ms_per_token"]["median"])
    return [{"weights": name, "batch": b, "ms_per_token": statistics.median(times[name, b]),
             "weight_bytes": weight_bytes(configs[name][0])} for name in configs for b in batches]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="training steps of the baby run")
    p.add_argument("--groups", default="32,64,128", help="int4 group sizes scored")
    p.add_argument("--decode-preset", default="gpt2", choices=list(C.PRESETS),
                   help="the model decoded, with random weights (default: gpt2, 124M)")
    p.add_argument("--decode-group", type=int, default=64, help="int4's group in the decode table")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--results", default=None, help="append the tables to this file")
    args = p.parse_args(argv)

    ppl, trained = perplexities(args.steps, [int(g) for g in args.groups.split(",")])
    batches = [int(b) for b in args.batches.split(",")]
    decode = decode_table(args.decode_preset, args.decode_group, batches, args.rounds,
                          args.prompt_tokens, args.new_tokens)
    info = provenance.machine_info()
    base = ppl[0]["perplexity"]
    lines = [f"### Quantization ({info['date']}, {info['cpu']}, {info['cores']} cores, jax "
             f"{info['jax']}, native kernels {info['native_kernels']})", "",
             f"Perplexity, {trained} (whole validation split, {ppl[0]['tokens']:,} tokens):", "",
             "| weights | val loss | perplexity | vs float32 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['weights']} | {r['loss']:.4f} | {r['perplexity']:.3f} | "
              f"{100 * (r['perplexity'] / base - 1):+.2f}% |" for r in ppl]
    lines += ["", f"Decode, {args.decode_preset} (random weights), greedy, prompt {args.prompt_tokens} + "
              f"{args.new_tokens} new tokens, median of {args.rounds} alternating rounds:", "",
              "| weights | weight bytes | " + " | ".join(f"ms/token at batch {b}" for b in
                                                      args.batches.split(",")) + " |",
              "|---|---:|" + "---:|" * len(args.batches.split(","))]
    for name in SETTINGS:
        cells = [r for r in decode if r["weights"] == name]
        label = f"int4 (group {args.decode_group})" if name == "int4" else name
        lines.append(f"| {label} | {cells[0]['weight_bytes'] / 2**20:,.0f} MiB | "
                     + " | ".join(f"{r['ms_per_token']:.2f}" for r in cells) + " |")
    lines.append("")
    provenance.publish({"machine": info, "perplexity": ppl, "decode": decode}, "\n".join(lines),
                       args.json, args.results)


if __name__ == "__main__":
    main()
