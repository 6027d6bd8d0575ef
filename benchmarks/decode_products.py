"""A decode step's products alone: gptjax's native few-row kernel against XLA's dot.

Every projection of GPT-2 124M plus its tied head (~124M weights, output-major as the decode
layout keeps them) times `rows` activation rows, in one jitted call per side, alternating
repeats in one process. Reading the weights is the whole cost, so the table gives each
side's effective read rate; compare it with `benchmarks/decode.py`'s floor.

    python benchmarks/decode_products.py --rows 1 --dtype float32
    python benchmarks/decode_products.py --rows 8 --dtype bfloat16 --repeats 21
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from gptjax.config import preset
from gptjax.cpu import native
from gptjax.cpu.products import GPT2_BLOCK_SHAPES, GPT2_HEAD_SHAPE, out_major_product


def products(mode: str):
    """All of a step's products under decode_matmul=`mode`."""
    cfg = dataclasses.replace(preset("gpt2"), decode_matmul=mode)

    @jax.jit
    def run(weights, inputs):
        # One column of each output keeps the result small; every weight is still read.
        return [out_major_product(w, inputs[w.shape[1]], cfg, jnp.float32)[:, :1]
                for w in weights]
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1, help="activation rows (the decode batch)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weight dtype")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5, help="calls per repeat")
    ap.add_argument("--layers", type=int, default=12, help="blocks (GPT-2 124M has 12)")
    args = ap.parse_args(argv)
    if min(args.rows, args.repeats, args.calls, args.layers) < 1:
        ap.error("--rows, --repeats, --calls and --layers must be positive")
    if jax.default_backend() != "cpu" or not native.available():
        print("error: needs a CPU where gptjax's native kernels are available", file=sys.stderr)
        return 2
    key = jax.random.PRNGKey(0)
    shapes = [*GPT2_BLOCK_SHAPES * args.layers, GPT2_HEAD_SHAPE]
    weights = [(0.02 * jax.random.normal(jax.random.fold_in(key, i), s)).astype(args.dtype)
               for i, s in enumerate(shapes)]
    inputs = {n: jax.random.normal(jax.random.fold_in(key, 10_000 + n), (args.rows, n))
              for n in (768, 3072)}
    nbytes = sum(w.size * w.dtype.itemsize for w in weights)
    sides = {"native": products("native"), "xla": products("xla")}
    first = {name: run(weights, inputs) for name, run in sides.items()}  # compiles, untimed
    differ = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(first["native"], first["xla"]))
    seconds = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                out = run(weights, inputs)
            jax.block_until_ready(out)
            seconds[name].append((time.perf_counter() - start) / args.calls)
    print(f"{args.rows} row(s), {args.dtype} weights ({nbytes / 1e6:.0f} MB), "
          f"{args.repeats} alternating repeats of {args.calls} calls; the sides' outputs differ "
          f"by at most {differ:.2e}")
    print("| side | ms per step, median (min-max) | read GB/s |")
    print("|---|---|---|")
    for name, times in seconds.items():
        med = statistics.median(times)
        print(f"| {name} | {med * 1e3:.2f} ({min(times) * 1e3:.2f}-{max(times) * 1e3:.2f}) | "
              f"{nbytes / med / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
