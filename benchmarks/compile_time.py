"""Compile time of the train step against depth: 12 vs 48 layers of the same width.

The layers run under a rolled `nn.scan` (scan_unroll=1, what models deeper than 12 layers
get by default), so XLA compiles one block body whatever the depth; this measures how close
to flat that keeps compile time. Shape: the `gpt2` preset's width (d 768, 12 heads, its
GPT-2 vocabulary, context 1024) and batch 8, float32; the two depths differ only in n_layer.
Each measurement is a fresh Python process with no persistent compilation cache
(`python -m gptjax.bench.train_step compile`), so nothing is reused between them; the depths
alternate, and the reported figure is the ratio of the medians of trace+lower+compile.
Nothing is allocated: the step is compiled from abstract shapes.

    python benchmarks/compile_time.py                          # 12 vs 48 layers, 5 repeats
    python benchmarks/compile_time.py --layers 12 48 --repeats 3 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from gptjax.bench import provenance
from gptjax.bench import train_step as bench
from gptjax.bench.compile import compile_in_subprocess
from gptjax.config import TrainConfig, preset

TARGET_RATIO = 1.5  # the issue: 48 layers compile within 1.5x the time of 12


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2", help="width, heads, vocabulary and context (default: gpt2)")
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 48])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, help="context length (default: the preset's)")
    ap.add_argument("--scan-unroll", type=int, default=1, help="layers per scan iteration "
                    "(default: 1, a rolled loop)")
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per depth (default: 5)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--results", type=Path, help="append the markdown table to this file "
                    "(e.g. benchmarks/RESULTS.md); default: print only")
    args = ap.parse_args(argv)
    if args.repeats < 1 or len(args.layers) < 1 or min(args.layers) < 1:
        ap.error("--repeats and --layers must be positive")

    overrides = {"scan_unroll": args.scan_unroll}
    if args.context:
        overrides["context_length"] = args.context
    configs = {n: preset(args.preset, n_layer=n, **overrides) for n in args.layers}
    train_cfg = TrainConfig(batch_size=args.batch)
    runs = {n: [] for n in args.layers}
    for r in range(args.repeats):
        order = args.layers if r % 2 == 0 else args.layers[::-1]
        for n in order:
            result = compile_in_subprocess(configs[n], train_cfg)
            runs[n].append(result)
            print(f"repeat {r + 1}: {n} layers: lower {result['lower_seconds']:.2f}s + compile "
                  f"{result['compile_seconds']:.2f}s", flush=True)
    rows = []
    base = args.layers[0]
    for n in args.layers:
        total = [x["seconds"] for x in runs[n]]
        rows.append({"n_layer": n, "seconds": bench.median_min_max(total),
                     "lower_seconds": statistics.median(x["lower_seconds"] for x in runs[n]),
                     "compile_seconds": statistics.median(x["compile_seconds"] for x in runs[n]),
                     "temp_mib": runs[n][0]["memory"].get("temp", 0) / 2**20, "runs": runs[n]})
    for row in rows:
        row["ratio"] = row["seconds"]["median"] / rows[0]["seconds"]["median"]
    cfg = configs[base]
    report = {"machine": provenance.machine_info(),
              "command": "python benchmarks/compile_time.py"
                         + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
              "shape": {"preset": args.preset, "d_model": cfg.d_model, "n_head": cfg.n_head,
                        "vocab": cfg.vocab_size, "context": cfg.context_length, "batch": args.batch,
                        "scan_unroll": args.scan_unroll, "dtype": cfg.dtype},
              "repeats": args.repeats, "target_ratio": TARGET_RATIO, "results": rows}
    provenance.publish(report, markdown(report), args.json, args.results)
    return 0


def markdown(report: dict) -> str:
    m, s = report["machine"], report["shape"]
    rows = report["results"]
    lines = [f"### Train-step compile time vs depth ({m['date'][:10]})", "",
             f"{m['cpu']} ({m['device_kind']}), {m['cores']} cores; jax {m['jax']}, jaxlib "
             f"{m['jaxlib']}, flax {m['flax']}, optax {m['optax']}, Python {m['python']}; "
             f"XLA_FLAGS={m['xla_flags'] or '(none)'}; 1-min load average {m['load_average_1min']:.1f} "
             f"at the end. Shape: {s['preset']} width (d {s['d_model']}, "
             f"{s['n_head']} heads, vocab {s['vocab']:,}, T {s['context']}), batch {s['batch']}, "
             f"{s['dtype']}, scan_unroll {s['scan_unroll']}; the full train step (AdamW, clipping, "
             f"donated state) lowered and compiled from abstract shapes in a fresh process, no "
             f"persistent cache; median (min–max) of {report['repeats']} alternating processes. "
             f"Command: `{report['command']}`.", "",
             "| layers | trace+lower s | XLA compile s | total s (min–max) | vs "
             f"{rows[0]['n_layer']} layers | temp MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["seconds"]
        lines.append(f"| {r['n_layer']} | {r['lower_seconds']:.2f} | {r['compile_seconds']:.2f} | "
                     f"{t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f}) | {r['ratio']:.2f}x | "
                     f"{r['temp_mib']:,.0f} |")
    if len(rows) > 1:
        worst = rows[-1]["ratio"]
        lines += ["", f"Target: the deepest within {report['target_ratio']}x of the shallowest: "
                  f"{'met' if worst <= report['target_ratio'] else 'not met'} ({worst:.2f}x)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
