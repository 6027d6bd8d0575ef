"""A sweep's report: one row per member (its values, last train and validation loss, best
validation loss, divergence) as sweep.json and a markdown table, and a loss plot with one
colour per member."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gptjax import config as C
from gptjax.training import sweep


def summarize(members: list[C.TrainConfig], records: list[dict]) -> list[dict]:
    """One row per member from the sweep's metrics.jsonl records."""
    rows = []
    for i, m in enumerate(members):
        mine = [r for r in records if r.get("member") == i]
        train = [r for r in mine if r["kind"] == "train"]
        evals = [r for r in mine if r["kind"] == "eval" and r["val_loss"] is not None]
        diverged = next((r["step"] for r in mine if r["kind"] == "diverged"), None)
        best = min(evals, key=lambda r: r["val_loss"], default=None)
        rows.append({"member": i, **{k: getattr(m, k) for k in sweep.SWEPT},
                     "train_loss": train[-1]["loss"] if train else None,
                     "val_loss": next((r["val_loss"] for r in reversed(mine) if r["kind"] == "eval"), None),
                     "best_val_loss": best["val_loss"] if best else None,
                     "best_step": best["step"] if best else None, "diverged_at": diverged})
    return rows


def best_member(rows: list[dict]) -> dict | None:
    """The member with the lowest final validation loss, among those that did not diverge."""
    ok = [r for r in rows if r["val_loss"] is not None and r["diverged_at"] is None]
    return min(ok, key=lambda r: r["val_loss"], default=None)


def swept(rows: list[dict]) -> list[str]:
    """The fields whose values differ between members (all three for a single member)."""
    return [k for k in sweep.SWEPT if len({r[k] for r in rows}) > 1] or list(sweep.SWEPT)


def table(rows: list[dict]) -> str:
    best = best_member(rows)
    head = ["member", "lr", "weight decay", "seed", "train loss", "val loss", "best val (step)", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        status = (f"diverged at step {r['diverged_at']}" if r["diverged_at"] is not None
                  else "best" if r is best else "")
        best_val = f"{_num(r['best_val_loss'])} ({r['best_step']})" if r["best_step"] else "-"
        cells = [r["member"], f"{r['lr']:g}", f"{r['weight_decay']:g}", r["seed"],
                 _num(r["train_loss"]), _num(r["val_loss"]), best_val, status]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def write(out: Path, cfg: C.RunConfig, rows: list[dict], summary: dict, echo) -> dict:
    """sweep.json, sweep.md and loss.png in `out`; the table goes to the console too."""
    files = {"table": out / "sweep.md", "summary": out / "sweep.json", "loss curves": out / "loss.png",
             "metrics": out / "metrics.jsonl"}
    best = best_member(rows)
    text = table(rows)
    note = (f"best: member {best['member']} ({label(best, swept(rows))}), val loss {best['val_loss']:.4f}"
            if best else "no member finished with a finite validation loss")
    speed = f"{summary['tokens_per_s']:,.0f}" if summary.get("tokens_per_s") else "-"
    files["table"].write_text(
        f"# Sweep: {summary['members']} members, {summary['steps']} steps\n\n{text}\n\n{note}\n\n"
        f"tokens/s (all members): {speed}; compiled in {summary['compile_seconds']}s\n")
    files["summary"].write_text(json.dumps({**summary, "config": C.to_dict(cfg), "members": rows,
                                            "best_member": best["member"] if best else None},
                                           indent=2) + "\n")
    plot(out / "metrics.jsonl", rows, files["loss curves"], f"sweep of {len(rows)} members")
    echo(text)
    echo(f"{note}; {speed} tokens/s over all members")
    for what, path in files.items():
        echo(f"{what:>12}: {path}")
    return files


def label(row: dict, fields: list[str]) -> str:
    return ", ".join(f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in fields)


def plot(metrics: Path, rows: list[dict], path: Path, title: str) -> Path:
    """Train loss (line) and validation loss (dots) against step, one colour per member."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fields = swept(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    colours = plt.cm.viridis([i / max(len(rows) - 1, 1) for i in range(len(rows))])
    for r, colour in zip(rows, colours):
        i = r["member"]
        train = [(x["step"], x["loss"]) for x in records
                 if x.get("member") == i and x["kind"] == "train" and x["loss"] is not None]
        val = [(x["step"], x["val_loss"]) for x in records
               if x.get("member") == i and x["kind"] == "eval" and x["val_loss"] is not None]
        name = f"{i}: {label(r, fields)}" + (" (diverged)" if r["diverged_at"] is not None else "")
        if train:
            ax.plot(*zip(*train), color=colour, lw=1.2, label=name)
        if val:
            ax.plot(*zip(*val), "o", color=colour, ms=4)
    ax.set_title(f"{title}: train loss (lines), val loss (dots)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if len(rows) <= 16:  # past that a legend hides the curves
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _num(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"
