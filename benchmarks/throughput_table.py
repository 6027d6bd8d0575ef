"""The markdown table `benchmarks/train_throughput.py` prints and appends to RESULTS.md."""

from __future__ import annotations


def _load(m: dict) -> str:
    values = [m.get("load_average_1min_start"), m.get("load_average_1min")]
    return " → ".join(f"{v:.1f}" for v in values if v is not None) or "n/a"


def _verdict(row: dict, key: str) -> str:
    if key not in row["met"]:
        return "–"
    return "met" if row["met"][key] else "not met"


def _torch_rate(report: dict) -> str:
    rates = report.get("torch_matmul", {}).get("measured")  # absent in older reports
    if not rates:
        return ""
    return f"; PyTorch's own float32 matmul {', '.join(f'{r / 1e9:.0f}' for r in rates)} GFLOP/s"


def markdown(report: dict) -> str:
    m = report["machine"]
    measured = ", ".join(f"{r / 1e9:.0f}" for r in report["matmul_peak"].get("measured", []))
    lines = [f"### Train-step throughput, gptjax vs PyTorch eager ({m['date'][:10]})", "",
             f"{m['cpu']} ({m['device_kind']}), {m['cores']} cores; XLA:CPU {m['threads']} threads, "
             f"torch {m['torch_threads']} threads; jax {m['jax']}, jaxlib {m['jaxlib']}, flax "
             f"{m['flax']}, optax {m['optax']}, torch {m['torch']}, Python {m['python']}; "
             f"XLA_FLAGS={m['xla_flags'] or '(none)'}; freed host memory on both sides: "
             f"{m['host_memory']}; gptjax's native CPU kernels: {m.get('native_kernels', 'n/a')}; "
             f"1-min load average {_load(m)}; float32, "
             f"same batches and config on both "
             f"sides, full AdamW step with clipping; median of alternating repeats "
             f"({report['results'][0]['processes'] if report['results'] else ''}). FLOPs: "
             f"{report['flops_formula']}; float32 matmul rate measured in this run "
             f"{measured} GFLOP/s (the best is the denominator){_torch_rate(report)}. "
             f"Command: `{report['command']}`.", "",
             "| case (preset:B:T) | params | steps x repeats | gptjax tok/s (min–max) | torch tok/s "
             "(min–max) | ratio (min–max) | gptjax ms/step | torch ms/step | gptjax GFLOP/s | "
             "of matmul rate | torch of matmul rate | cores busy gptjax / torch | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        g, t, q = r["gptjax"], r["torch"], r["ratio"]
        targets, goals = r["targets"] or {}, []
        if "ratio" in targets:
            goals.append(f"ratio >= {targets['ratio']}x: {_verdict(r, 'ratio')}")
        if "matmul_fraction" in targets:
            goals.append(f"matmul >= {targets['matmul_fraction']:.0%}: "
                         f"{_verdict(r, 'matmul_fraction')}")
        goal = "; ".join(goals) or "–"
        lines.append(
            f"| {r['case']} | {r['params']:,} | {r['steps_per_repeat']} x {r['repeats']} | "
            f"{g['tokens_per_s']['median']:,.0f} ({g['tokens_per_s']['min']:,.0f}–"
            f"{g['tokens_per_s']['max']:,.0f}) | {t['tokens_per_s']['median']:,.0f} "
            f"({t['tokens_per_s']['min']:,.0f}–{t['tokens_per_s']['max']:,.0f}) | "
            f"{q['median']:.2f}x ({q['min']:.2f}–{q['max']:.2f}) | {g['ms_per_step']:.1f} | "
            f"{t['ms_per_step']:.1f} | {g['flops_per_s'] / 1e9:.1f} | {g['matmul_fraction']:.0%} | "
            f"{t['matmul_fraction']:.0%} | {g['cpu_per_wall']:.2f} / {t['cpu_per_wall']:.2f} | {goal} |")
    return "\n".join(lines) + "\n"
