"""Decode speed: gptjax's KV-cache generator against transformers' `generate`, side by side.

Both load the same GPT-2 weights from one Hugging Face folder (random GPT-2 124M weights
unless --weights names a real one: speed does not depend on the values), use the same
prompt ids, greedy decoding, exactly --new tokens (no early stop) and the same thread
count. Each repeat times both, alternating, so drift on a noisy machine hits both alike.

Reported per case: time to first token (prefill + first id), ms per later token, tokens/s
over the whole generation and the ratio to transformers in float32. The memory-bandwidth
floor is the time to read, once, the weights a decode step must read, timed right after
each gptjax repeat: the best of 3 jitted sums over those very arrays and 3 over one
contiguous array of the same order of size (scaled to the weights' bytes). This machine's read
bandwidth swings 24-43 GB/s within seconds, so a floor taken once per run says more about
the moment than about the decoder; each repeat's ms/token is divided by the floor read
next to it, and the median of those ratios is reported.

    python benchmarks/decode.py                      # the issue's CPU cases
    python benchmarks/decode.py --cases 1:float32 --repeats 3 --new 16   # a quick check
    python benchmarks/decode.py --cases 1:float32:xla 1:float32:native   # XLA vs native kernel

A case is BATCH:DTYPE[:MATMUL], MATMUL being ModelConfig.decode_matmul (default auto).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model
from gptjax.bench import provenance
from gptjax.bench import train_step as bench
from gptjax.config import ModelConfig
from gptjax.cpu import native
from gptjax.generation.decoder import Decoder, _advance, _start
from gptjax.generation.sampling import Sampling
from gptjax.hf.io import load_hf

HERE = Path(__file__).resolve().parent
DEFAULT_CASES = ["1:float32", "1:bfloat16", "8:float32"]  # batch:gptjax weight dtype[:matmul]
MATMULS = ModelConfig.__dataclass_fields__["decode_matmul"].metadata["choices"]


def weight_floor(params, contiguous_mib: int = 512):
    """(a function timing one floor read, best of its `repeats`, in seconds; the bytes read).

    Two reads are timed and the faster one, scaled to the weights' bytes, is the floor: a
    jitted sum over the weight arrays themselves, and a sum over one contiguous array of
    about the same size (no per-array overhead, so usually the stricter of the two). The
    position table is left out: a step reads one row of it.
    """
    leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
              if "wpe" not in jax.tree_util.keystr(path)]
    weights = sum(x.nbytes for x in leaves)
    block = jnp.ones((contiguous_mib * 2**20 // 4,), jnp.float32)
    read = jax.jit(lambda arrays: sum(jnp.sum(x, dtype=jnp.float32) for x in arrays))
    reads = [(lambda: read(leaves).block_until_ready(), 1.0),
             (lambda: read([block]).block_until_ready(), weights / block.nbytes)]
    for fn, _ in reads:
        fn()  # compile

    def seconds(repeats: int = 3) -> float:
        return min(scale * _timed(fn) for _ in range(repeats) for fn, scale in reads)
    return seconds, weights


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_bytes(params) -> int:
    """Weight bytes one decode step reads: everything but the unused position rows."""
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    wpe = params["wpe"]["embedding"]
    return total - wpe.nbytes + wpe.nbytes // wpe.shape[0]


def time_gptjax(params, cfg, prompts, new, warm=True):
    """(seconds to the first token, seconds for the rest); when warm, asserts no recompile."""
    sizes = (_start._cache_size(), _advance._cache_size())
    t0 = time.perf_counter()
    decoder = Decoder(params, cfg, prompts, new, Sampling(temperature=0.0))
    first = decoder.advance(0)
    t1 = time.perf_counter()
    rest = decoder.advance()
    t2 = time.perf_counter()
    if warm:
        assert (_start._cache_size(), _advance._cache_size()) == sizes, "recompiled while timed"
    assert all(len(a) + len(b) == new for a, b in zip(first, rest))
    return t1 - t0, t2 - t1


class _FirstTokenClock:
    """A transformers streamer that notes when `generate` hands over its first new token
    (the first `put` is the prompt), so one call gives both the time to first token and the
    rest; subtracting two separately timed calls went negative on tiny models."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def time_transformers(hf_model, prompts, new):
    import torch
    ids = torch.tensor(prompts)
    clock = _FirstTokenClock()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                pad_token_id=0, eos_token_id=None, max_new_tokens=new,
                                min_new_tokens=new, streamer=clock)
        t1 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new and clock.puts == new + 1
    return clock.first - t0, t1 - clock.first


def summarize(runs, batch, new):
    ttft = statistics.median(r[0] for r in runs)
    rest = statistics.median(r[1] for r in runs)
    return {"ttft_ms": 1000 * ttft, "ms_per_token": 1000 * rest / (new - 1),
            "tokens_per_s": batch * new / (ttft + rest)}


def floor_comparison(ours, floors, floor_bytes, step_bytes, new) -> dict:
    """The floor per repeat (scaled from the bytes read to the bytes a step reads) and
    gptjax's ms/token over it, paired repeat by repeat; medians summarize."""
    floor_ms = [1000 * s * step_bytes / floor_bytes for s in floors]
    vs = [1000 * rest / (new - 1) / f for (_, rest), f in zip(ours, floor_ms)]
    gbs = [floor_bytes / s / 1e9 for s in floors]
    return {"floor_ms_per_token": statistics.median(floor_ms), "vs_floor": statistics.median(vs),
            "vs_floor_per_repeat": vs, "read_gbs": bench.median_min_max(gbs)}


def parse_case(case: str) -> tuple[int, str, str]:
    parts = case.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or int(parts[0]) < 1:
        raise SystemExit(f"decode.py: bad case {case!r}: expected BATCH:DTYPE[:MATMUL], e.g. 1:bfloat16")
    if parts[1] not in ("float32", "bfloat16"):
        raise SystemExit(f"decode.py: bad dtype in {case!r}: float32 or bfloat16")
    matmul = parts[2] if len(parts) == 3 else "auto"
    if matmul not in MATMULS:
        raise SystemExit(f"decode.py: bad matmul in {case!r}: {' or '.join(MATMULS)}")
    return int(parts[0]), parts[1], matmul


def random_gpt2(directory: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)
    return directory


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="Hugging Face GPT-2 folder (default: random GPT-2 124M)")
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="BATCH:DTYPE")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"),
                    help="markdown file the table is appended to ('' = none)")
    args = ap.parse_args(argv)

    import torch
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.weights) if args.weights else random_gpt2(Path(tmp) / "gpt2")
        hf_model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
        cfg32, params32 = load_hf(folder)
    rng = np.random.default_rng(0)
    results = []
    for case in args.cases:
        batch, dtype, matmul = parse_case(case)
        prompts = rng.integers(0, cfg32.vocab_size, (batch, args.prompt_len)).tolist()
        params, cfg = (params32, cfg32) if dtype == "float32" else model.cast(params32, cfg32, dtype)
        cfg = dataclasses.replace(cfg, decode_matmul=matmul)
        params = model.decode_params(params)  # the decode layout, once, like loading
        time_gptjax(params, cfg, prompts, args.new, warm=False)  # compile
        time_transformers(hf_model, prompts, 2)  # warm up
        floor_seconds, floor_bytes = weight_floor(params)
        ours, theirs, floors = [], [], []
        for _ in range(args.repeats):
            ours.append(time_gptjax(params, cfg, prompts, args.new))
            floors.append(floor_seconds())  # next to gptjax's repeat, before torch's threads run
            theirs.append(time_transformers(hf_model, prompts, args.new))
        row = {"batch": batch, "gptjax_dtype": dtype, "decode_matmul": matmul, "gptjax": summarize(ours, batch, args.new),
               "transformers_float32": summarize(theirs, batch, args.new)}
        row["ratio"] = row["gptjax"]["tokens_per_s"] / row["transformers_float32"]["tokens_per_s"]
        row.update(floor_comparison(ours, floors, floor_bytes, decode_bytes(params), args.new))
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {"machine": machine(args.threads),
              "prompt_len": args.prompt_len, "new_tokens": args.new, "repeats": args.repeats,
              "weights": args.weights or "random GPT-2 124M", "results": results}
    provenance.publish(report, markdown(report), args.json, args.results)
    return 0


def machine(threads: int) -> dict:
    """gptjax.bench.train_step's record of the machine, with this run's threads and the peer's versions."""
    import torch
    import transformers
    info = provenance.machine_info()
    return {**info, "threads": threads, "device": info["device_kind"],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "native_kernel": native.available()}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"### Decode, GPT-2 124M, prompt {report['prompt_len']} + {report['new_tokens']} new "
             f"tokens ({time.strftime('%Y-%m-%d')})", "",
             f"{m['cpu']} ({m['device']}), {m['cores']} cores, {m['threads']} threads; jax {m['jax']}, torch "
             f"{m['torch']}, transformers {m['transformers']}, Python {m['python']}; median of "
             f"{report['repeats']} alternating repeats; weights: {report['weights']}; floor = the "
             f"weights read once (best of 3 jitted sums over them and 3 over a contiguous 512 MiB array, "
             f"scaled) right after each gptjax repeat, "
             f"vs floor = median over repeats of ms/token over that repeat's floor; native kernel "
             f"{'available' if m['native_kernel'] else 'unavailable'}. Command: `python benchmarks/decode.py"
             f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.", "",
             "| batch | gptjax weights | decode matmul | gptjax TTFT ms | gptjax ms/token | gptjax tok/s | "
             "transformers f32 TTFT ms | ms/token | tok/s | ratio | read GB/s (min–max) | floor ms/token | "
             "vs floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        g, t = r["gptjax"], r["transformers_float32"]
        lines.append(f"| {r['batch']} | {r['gptjax_dtype']} | {r['decode_matmul']} | {g['ttft_ms']:.0f} | "
                     f"{g['ms_per_token']:.1f} | {g['tokens_per_s']:.1f} | {t['ttft_ms']:.0f} | "
                     f"{t['ms_per_token']:.1f} | {t['tokens_per_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['read_gbs']['median']:.1f} ({r['read_gbs']['min']:.1f}–{r['read_gbs']['max']:.1f}) | "
                     f"{r['floor_ms_per_token']:.1f} | {r['vs_floor']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
