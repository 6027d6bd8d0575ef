"""What device prefetch could gain: the training loop's host data path against batches
already on the device.

`gptjax train` builds each batch on the host (sampler offsets, a gather of windows from the
memory-mapped token file, `jax.make_array_from_process_local_data`) and dispatches the step
without waiting for it, so the host normally runs ahead of the device and the data path is
hidden. Prefetching batches to the device in a background thread can only remove what is
left exposed. This times both, alternating repeats in one process on the same compiled step
(`gptjax.training.train.CompiledSteps`, as `gptjax train` compiles it):

  live:  the loop's own data path every step (sample, gather from a np.memmap, put);
  ready: the same number of steps over batches placed on the device beforehand, which is
         what a perfect prefetcher would achieve.

ready/live in tokens/s is the ceiling on prefetching's gain. Also reported: the host's
time per step in the data path and in dispatch, and how far into the repeat the host had
dispatched its last step (well under 100%: the host runs ahead and the device never waits
for data).

    python benchmarks/host_overhead.py                                  # CPU: tiny and baby
    python benchmarks/host_overhead.py --cases gpt2:16:1024 --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from gptjax import config as C
from gptjax.bench import provenance
from gptjax.bench import train_step as bench
from gptjax.cpu import host_memory
from gptjax.data.windows import WindowSampler, gather
from gptjax.errors import GptjaxError
from gptjax.training.train import CompiledSteps

DEFAULT_CASES = ["tiny:8:64", "baby:12:64"]


def time_loop(steps: CompiledSteps, state, batch_for, n: int):
    """Dispatch `n` steps back to back, blocking once at the end.

    Returns (wall seconds, host seconds spent in `batch_for`, host seconds dispatching,
    when the last dispatch returned as a fraction of the wall time, final state).
    """
    data = dispatch = 0.0
    t0 = time.perf_counter()
    for i in range(n):
        h0 = time.perf_counter()
        batch = batch_for(i)
        h1 = time.perf_counter()
        state, metrics = steps.train_step(state, batch)
        h2 = time.perf_counter()
        data, dispatch = data + h1 - h0, dispatch + h2 - h1
    dispatched = time.perf_counter() - t0
    jax.block_until_ready((state, metrics))
    wall = time.perf_counter() - t0
    return wall, data, dispatch, dispatched / wall, state


def run_case(case: str, args, tokens: np.ndarray) -> dict:
    """Both loops on one case's compiled step, alternating repeats."""
    name, batch, context = bench.parse_case(case)
    vocab = args.vocab or C.PRESETS[name].get("vocab_size") or 65  # as `gptjax bench`
    cfg = C.RunConfig(model=C.preset(name, vocab_size=vocab, context_length=context,
                                     dtype=args.dtype),
                      train=C.TrainConfig(batch_size=batch, max_steps=10**6, warmup_steps=10))
    C.validate(cfg)
    steps = CompiledSteps(cfg)
    sampler = WindowSampler(len(tokens), context, batch, "random", seed=0)

    def live(i):
        starts = sampler.starts(i)
        return steps.put_batch(lambda rows: gather(tokens, starts[rows], context), len(starts))

    prepared = [live(i) for i in range(8)]

    def ready(i):
        return prepared[i % len(prepared)]

    state = steps.init_state()
    for fn in (live, ready):  # warm-up
        state = time_loop(steps, state, fn, 2)[-1]
    runs = {"live": [], "ready": []}
    with bench.no_compiles("the timed loops"):
        for r in range(args.repeats):
            order = ("live", "ready") if r % 2 == 0 else ("ready", "live")
            for which in order:
                *timing, state = time_loop(steps, state, live if which == "live" else ready, args.steps)
                runs[which].append(timing)
    tokens_per_step = batch * context

    def summary(rows):
        wall, data, dispatch, ahead = (statistics.median(col) for col in zip(*rows))
        return {"ms_per_step": 1000 * wall / args.steps, "tokens_per_s": tokens_per_step * args.steps / wall,
                "host_data_ms": 1000 * data / args.steps, "host_dispatch_ms": 1000 * dispatch / args.steps,
                "last_dispatch_at": ahead}
    out = {"case": case, **{k: summary(v) for k, v in runs.items()}}
    out["ceiling"] = statistics.median(
        (lv[0] / rd[0]) for lv, rd in zip(runs["live"], runs["ready"]))  # ready tok/s over live
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"### Host data path vs batches on the device ({time.strftime('%Y-%m-%d')})", "",
             f"{m['cpu']} / {m['device_kind']} x {m['device_count']} ({m['backend']}); jax {m['jax']}, "
             f"Python {m['python']}; freed host memory: {m['host_memory']}; dtype {report['dtype']}; "
             f"median of {report['repeats']} alternating repeats x {report['steps']} steps. live = the "
             f"training loop's data path each step (sample, gather from a memmap, put); ready = batches "
             f"placed on the device beforehand (a perfect prefetcher); ceiling = ready tok/s over live, "
             f"paired per repeat. Command: `python benchmarks/host_overhead.py"
             f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.", "",
             "| case | live ms/step | ready ms/step | ceiling | host data ms/step | host dispatch ms/step "
             "| last dispatch at (live) |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lv, rd = r["live"], r["ready"]
        lines.append(f"| {r['case']} | {lv['ms_per_step']:.2f} | {rd['ms_per_step']:.2f} | "
                     f"{r['ceiling']:.3f}x | {lv['host_data_ms']:.3f} | {lv['host_dispatch_ms']:.3f} | "
                     f"{100 * lv['last_dispatch_at']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="PRESET:BATCH:CONTEXT")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's, else 65)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=40, help="steps per repeat (default: 40)")
    ap.add_argument("--repeats", type=int, default=5, help="alternating repeats (default: 5)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--results", type=Path, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    try:
        [bench.parse_case(case) for case in args.cases]  # all of them before any compile
    except GptjaxError as e:
        ap.error(str(e))
    host_memory.keep_freed_memory()  # as `gptjax train` does
    with tempfile.TemporaryDirectory() as tmp:
        # A token file read through a memory map, as prepared data is.
        path = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(0, 65, 1 << 22, dtype=np.uint16).tofile(path)  # valid ids for any vocab
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        results = [run_case(case, args, tokens) for case in args.cases]
    report = {"machine": provenance.machine_info(), "dtype": args.dtype, "steps": args.steps,
              "repeats": args.repeats, "results": results}
    provenance.publish(report, markdown(report), args.json, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
