"""Decode speed: gptjax's KV-cache generator against transformers' `generate`, side by side.

Both load the same GPT-2 weights from one Hugging Face folder (random GPT-2 124M weights
unless --weights names a real one: speed does not depend on the values), use the same
prompt ids, greedy decoding, exactly --new tokens (no early stop) and the same thread
count. Each repeat times both, alternating, so drift on a noisy machine hits both alike.

Reported per case: time to first token (prefill + first id), ms per later token, tokens/s
over the whole generation and the ratio to transformers in float32. The memory-bandwidth
floor is the bytes of weights a decode step must read divided by the read bandwidth
measured in the same run (a large array sum).

    python benchmarks/decode.py                      # the issue's CPU cases
    python benchmarks/decode.py --cases 1:float32 --repeats 3 --new 16   # a quick check
    python benchmarks/decode.py --cases 1:bfloat16:xla 1:bfloat16:auto   # XLA vs native kernel

A case is BATCH:DTYPE[:MATMUL], MATMUL being ModelConfig.decode_matmul (default auto).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import bench, model, native
from gptjax.generate import Decoder, _advance, _start
from gptjax.hf import load_hf
from gptjax.sampling import Sampling

HERE = Path(__file__).resolve().parent
DEFAULT_CASES = ["1:float32", "1:bfloat16", "8:float32"]  # batch:gptjax weight dtype[:matmul]
MATMULS = model.ModelConfig.__dataclass_fields__["decode_matmul"].metadata["choices"]


def read_bandwidth_gbs(mbytes: int = 1024, repeats: int = 5) -> float:
    """Best-of sustained read bandwidth: summing an array far larger than the caches."""
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(repeats))
    return x.nbytes / best / 1e9


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


def time_transformers(hf_model, prompts, new):
    import torch
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf_model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        out = hf_model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new
    # generate(1 token) is the time to first token; the full call minus it is the rest.
    return t1 - t0, (t2 - t1) - (t1 - t0)


def summarize(runs, batch, new):
    ttft = statistics.median(r[0] for r in runs)
    rest = statistics.median(r[1] for r in runs)
    return {"ttft_ms": 1000 * ttft, "ms_per_token": 1000 * rest / (new - 1),
            "tokens_per_s": batch * new / (ttft + rest)}


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
    from transformers import GPT2Config, GPT2LMHeadModel
    import torch
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
    bandwidth = read_bandwidth_gbs()
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
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(time_gptjax(params, cfg, prompts, args.new))
            theirs.append(time_transformers(hf_model, prompts, args.new))
        row = {"batch": batch, "gptjax_dtype": dtype, "decode_matmul": matmul, "gptjax": summarize(ours, batch, args.new),
               "transformers_float32": summarize(theirs, batch, args.new),
               "floor_ms_per_token": 1000 * decode_bytes(params) / (bandwidth * 1e9)}
        row["ratio"] = row["gptjax"]["tokens_per_s"] / row["transformers_float32"]["tokens_per_s"]
        row["vs_floor"] = row["gptjax"]["ms_per_token"] / row["floor_ms_per_token"]
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {"machine": machine(args.threads), "bandwidth_gbs": bandwidth,
              "prompt_len": args.prompt_len, "new_tokens": args.new, "repeats": args.repeats,
              "weights": args.weights or "random GPT-2 124M", "results": results}
    bench.publish(report, markdown(report), args.json, args.results)
    return 0


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    import torch
    import transformers
    return {"cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": threads, "device": str(jax.devices()[0].device_kind),
            "python": platform.python_version(), "jax": jax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "native_kernel": native.available()}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"### Decode, GPT-2 124M, prompt {report['prompt_len']} + {report['new_tokens']} new "
             f"tokens ({time.strftime('%Y-%m-%d')})", "",
             f"{m['cpu']} ({m['device']}), {m['cores']} cores, {m['threads']} threads; jax {m['jax']}, torch "
             f"{m['torch']}, transformers {m['transformers']}, Python {m['python']}; median of "
             f"{report['repeats']} alternating repeats; weights: {report['weights']}; read "
             f"bandwidth {report['bandwidth_gbs']:.1f} GB/s; native kernel "
             f"{'available' if m['native_kernel'] else 'unavailable'}. Command: `python benchmarks/decode.py"
             f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.", "",
             "| batch | gptjax weights | decode matmul | gptjax TTFT ms | gptjax ms/token | gptjax tok/s | "
             "transformers f32 TTFT ms | ms/token | tok/s | ratio | floor ms/token | vs floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        g, t = r["gptjax"], r["transformers_float32"]
        lines.append(f"| {r['batch']} | {r['gptjax_dtype']} | {r['decode_matmul']} | {g['ttft_ms']:.0f} | "
                     f"{g['ms_per_token']:.1f} | {g['tokens_per_s']:.1f} | {t['ttft_ms']:.0f} | "
                     f"{t['ms_per_token']:.1f} | {t['tokens_per_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['floor_ms_per_token']:.1f} | {r['vs_floor']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
