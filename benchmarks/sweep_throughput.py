"""Tokens/s of a vmapped sweep (`gptjax sweep`) against training its members one after
another, side by side in one process.

For each case, N members (distinct learning rates) are trained two ways: by the sweep's
one compiled step over the stacked states (gptjax.training.sweep), and by N single-run
train steps (the step `gptjax train` compiles, one per member) called in turn, which is
what running the members one after another costs apart from start-up. Both run the same
steps on the same batches, alternating every repeat (the order flips) so the machine's
drift hits both alike. Reported: tokens/s of each (all members' tokens), and the sweep's
speed-up as the median of the per-repeat ratios; the script stops with an error unless both
ways give the same losses after the two warm-up steps. Freed host memory is kept, as in
`gptjax train`, unless GPTJAX_KEEP_FREED_MEMORY=0.

    python benchmarks/sweep_throughput.py --case tiny:8:32 --case baby:8:64 --members 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from gptjax import config as C
from gptjax.bench import provenance
from gptjax.bench.train_step import parse_case, random_batches
from gptjax.cpu import host_memory
from gptjax.errors import GptjaxError
from gptjax.training import sweep
from gptjax.training.step import init_state, make_train_step


def build(case: str, n: int):
    name, batch, context = parse_case(case)
    model_cfg = C.preset(name, context_length=context, vocab_size=65)
    base = C.RunConfig(model=model_cfg, train=C.TrainConfig(batch_size=batch, max_steps=10_000,
                                                            warmup_steps=10, min_lr=1e-5))
    members = sweep.grid(base, lrs=[1e-3 * (0.8 ** i) for i in range(n)])
    singles = [random_batches(4, batch, context, 65, seed=i) for i in range(n)]
    stacked = [sweep.stack_batches([s[j] for s in singles]) for j in range(4)]
    swept = {"step": jax.jit(sweep.make_sweep_step(model_cfg, base.train), donate_argnums=0),
             "state": sweep.init_states(model_cfg, base.train, members),
             "hp": sweep.hparams(members), "batches": [jax.device_put(b) for b in stacked]}
    alone = [{"step": jax.jit(make_train_step(model_cfg, m), donate_argnums=0),
              "state": init_state(model_cfg, m), "batches": [jax.device_put(b) for b in s]}
             for m, s in zip(members, singles)]
    return model_cfg, base.train, swept, alone


def run_swept(swept: dict, steps: int) -> float:
    t0 = time.perf_counter()
    for i in range(steps):
        swept["state"], metrics = swept["step"](swept["state"], swept["batches"][i % 4], swept["hp"])
    jax.block_until_ready((swept["state"], metrics))
    swept["loss"] = metrics["loss"]
    return time.perf_counter() - t0


def run_alone(alone: list[dict], steps: int) -> float:
    t0 = time.perf_counter()
    for a in alone:  # one member's steps, then the next member's
        for i in range(steps):
            a["state"], metrics = a["step"](a["state"], a["batches"][i % 4])
        jax.block_until_ready((a["state"], metrics))
        a["loss"] = metrics["loss"]
    return time.perf_counter() - t0


def measure(case: str, n: int, repeats: int, steps: int = 0) -> dict:
    model_cfg, train_cfg, swept, alone = build(case, n)
    run_swept(swept, 2)  # compile and warm both
    run_alone(alone, 2)
    # Two steps from the same start on the same batches: the same losses, or the two ways
    # are not training alike (later, float32 rounding in a memorising model drifts apart).
    alone_losses = np.array([a["loss"] for a in alone])
    if not np.allclose(swept["loss"], alone_losses, rtol=1e-5):
        raise GptjaxError(f"{case}: the sweep's losses {swept['loss']} differ from the "
                          f"members' own {alone_losses}: the two ways did not train alike")
    one = run_swept(swept, 3) / 3
    steps = steps or max(2, round(1.0 / one))  # about a second of sweep per repeat
    swept_s, alone_s = [], []
    for rep in range(repeats):
        order = (("s", "a") if rep % 2 == 0 else ("a", "s"))
        for which in order:
            if which == "s":
                swept_s.append(run_swept(swept, steps))
            else:
                alone_s.append(run_alone(alone, steps))
    tokens = n * train_cfg.batch_size * model_cfg.context_length * steps
    ratios = [a / s for s, a in zip(swept_s, alone_s)]
    return {"case": case, "members": n, "steps": steps,
            "swept_tokens_per_s": tokens / statistics.median(swept_s),
            "alone_tokens_per_s": tokens / statistics.median(alone_s),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="preset:batch:context (repeatable; "
                    "default: tiny:8:32 and baby:8:64)")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=0, help="steps per repeat (0: about 1 s of sweep)")
    args = ap.parse_args(argv)
    host_memory.keep_freed_memory()
    if args.members < 1:
        raise GptjaxError(f"--members must be positive, got {args.members}")
    cases = args.case or ["tiny:8:32", "baby:8:64"]
    rows = [measure(c, args.members, args.repeats, args.steps) for c in cases]
    info = provenance.machine_info()
    where = info["cpu"] if info["backend"] == "cpu" else info["device_kind"]
    print(f"{args.repeats} alternating repeats; {where}, jax {jax.__version__}; freed host "
          f"memory: {info['host_memory']}")
    print("| case | members | steps/repeat | sweep tokens/s | one after another tokens/s | "
          "sweep speed-up, per-repeat median (min-max) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['members']} | {r['steps']} | {r['swept_tokens_per_s']:,.0f} | "
              f"{r['alone_tokens_per_s']:,.0f} | {r['ratio']:.2f}x "
              f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")


if __name__ == "__main__":
    try:
        main()
    except GptjaxError as e:
        raise SystemExit(f"sweep_throughput: error: {e}") from None
