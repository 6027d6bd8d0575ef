"""How far `gptjax plan`'s predictions are from measured steps: for each case, the planner's
roofline (XLA's cost analysis over this device's peak and memory bandwidth) against the
same compiled step timed with `gptjax bench`'s protocol, and the planned memory against
what the step's plan really needs.

    python benchmarks/plan_accuracy.py --case tiny:16:32 --case baby:12:64 --case mini:8:256

Reported per case: predicted and measured tokens/s, the prediction error (predicted over
measured, minus one: positive means the plan was optimistic), which roofline term bound the
prediction (compute or memory), and the measured MFU.
"""

from __future__ import annotations

import argparse

import jax

from gptjax import config as C
from gptjax.bench import plan as P
from gptjax.bench import provenance
from gptjax.bench.train_step import build_train_step, parse_case, run_train_bench
from gptjax.cpu import host_memory
from gptjax.errors import GptjaxError


def measure(case: str, dev: P.Device, repeats: int) -> dict:
    name, batch, context = parse_case(case)
    cfg = C.preset(name, context_length=context, vocab_size=C.preset(name).vocab_size or 65)
    bench = build_train_step(cfg, C.TrainConfig(batch_size=batch, max_steps=10_000, warmup_steps=10))
    guess = P.predict(cfg, "data=1", cfg.remat, batch, bench, dev, 1, 0.0)
    one_step = max(guess.step_seconds, 1e-4)
    steps = max(2, round(0.5 / one_step))
    measured, _ = run_train_bench(bench, steps=steps, repeats=repeats, warmup=2,
                                  peak=dev.peak_flops * dev.count)
    real = measured["tokens_per_s"]["median"]
    bound = "compute" if guess.flops / dev.peak_flops >= guess.bytes_accessed / dev.bandwidth else "memory"
    return {"case": case, "predicted": guess.tokens_per_s, "measured": real,
            "error": guess.tokens_per_s / real - 1, "bound": bound, "mfu": measured["mfu"],
            "predicted_mfu": guess.mfu}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="preset:batch:context (repeatable; default: "
                    "tiny:16:32, baby:12:64, mini:8:256)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    host_memory.keep_freed_memory()  # as gptjax bench measures
    dev = P.device()
    cases = args.case or ["tiny:16:32", "baby:12:64", "mini:8:256"]
    rows = [measure(c, dev, args.repeats) for c in cases]
    info = provenance.machine_info()
    where = info["cpu"] if info["backend"] == "cpu" else info["device_kind"]
    print(f"{where}, jax {jax.__version__}; peak {dev.peak_flops / 1e12:.3g} TFLOP/s "
          f"({dev.sources['peak']}), bandwidth {dev.bandwidth / 1e9:.0f} GB/s ({dev.sources['bandwidth']})")
    print("| case | predicted tokens/s | measured tokens/s | prediction error | bound by | "
          "predicted MFU | measured MFU |\n|---|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['predicted']:,.0f} | {r['measured']:,.0f} | {r['error']:+.0%} | "
              f"{r['bound']} | {r['predicted_mfu']:.1%} | {r['mfu']:.1%} |")


if __name__ == "__main__":
    try:
        main()
    except GptjaxError as e:
        raise SystemExit(f"plan_accuracy: error: {e}") from None
