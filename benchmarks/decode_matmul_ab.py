"""Decoding under each `decode_matmul` setting, alternating in one process.

`benchmarks/decode.py` times one setting per case, so two settings it compares ran minutes
apart, and this machine's read bandwidth moves 25% in that time. Here each repeat decodes
once with every setting in turn (GPT-2 124M, random weights, greedy, the same prompts) and
then times a floor read (as decode.py does), so the ratios between settings are from the same
moments.

    python benchmarks/decode_matmul_ab.py                         # batch 1, float32
    python benchmarks/decode_matmul_ab.py --batch 8 --dtype bfloat16 --modes native xla
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from gptjax import model
from gptjax.cpu import native, products
from gptjax.hf.io import load_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import MATMULS, random_gpt2, time_gptjax, weight_floor  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", choices=MATMULS, default=list(MATMULS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--weights", help="Hugging Face GPT-2 folder (default: random GPT-2 124M)")
    args = ap.parse_args(argv)
    if min(args.batch, args.prompt_len, args.repeats) < 1 or args.new < 2:
        ap.error("--batch, --prompt-len and --repeats must be positive, --new at least 2")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.weights) if args.weights else random_gpt2(Path(tmp) / "gpt2")
        cfg, params = load_hf(folder)
    if args.dtype != "float32":
        params, cfg = model.cast(params, cfg, args.dtype)
    params = model.decode_params(params)
    prompts = np.random.default_rng(0).integers(
        0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    configs = {m: dataclasses.replace(cfg, decode_matmul=m) for m in args.modes}
    for c in configs.values():
        time_gptjax(params, c, prompts, args.new, warm=False)  # compiles (and measures auto)
    floor_seconds, _ = weight_floor(params)
    ms = {m: [] for m in configs}
    floors = []
    for _ in range(args.repeats):
        for m, c in configs.items():
            ms[m].append(1e3 * time_gptjax(params, c, prompts, args.new)[1] / (args.new - 1))
        floors.append(1e3 * floor_seconds())
    floor = statistics.median(floors)
    print(f"batch {args.batch}, {args.dtype} weights, prompt {args.prompt_len} + {args.new} "
          f"new tokens, {args.repeats} alternating repeats; floor (weights read once, median) "
          f"{floor:.2f} ms")
    if not native.available():
        print("gptjax's native kernel is not available here: every setting ran XLA's dot")
    elif "auto" in configs and args.batch == 1 and args.dtype == "float32":
        print("auto took the "
              + ("native kernel" if products.kernel_wins_one_float32_row() else "XLA dot")
              + " (this machine's one-row measurement)")
    print("| decode_matmul | ms/token, median (min-max) | vs floor |")
    print("|---|---|---|")
    for m, times in ms.items():
        med = statistics.median(times)
        print(f"| {m} | {med:.2f} ({min(times):.2f}-{max(times):.2f}) | {med / floor:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
