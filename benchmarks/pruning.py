"""Pruning a trained model (gptjax.model.prune): perplexity against sparsity, for
unstructured magnitude pruning and for whole attention heads and MLP neurons ranked by
first-order Taylor importance, each before and after a short recovery fine-tune.

The script trains a `baby` run on the embedded corpus (--steps), scores its whole
validation split unpruned, then for every method and share: the masks, the perplexity
with them, --recover-steps AdamW steps on the training split with the pruned weights held
at zero, and the perplexity again. Taylor scores come from --score-batches training
batches. Writes the table (markdown; --results appends it) and a plot (--plot).

    python benchmarks/pruning.py --steps 600 --recover-steps 100 --plot docs/images/pruning.png
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
from pathlib import Path

import jax
import numpy as np

from gptjax.bench import provenance
from gptjax.bench.trained import train_small_run
from gptjax.data.windows import WindowSampler, eval_batches, gather
from gptjax.model import prune as P
from gptjax.runs.load import load_run, run_data
from gptjax.training.prune_recovery import recover
from gptjax.training.step import make_eval_step, mean_loss

METHODS = {"magnitude": (0.25, 0.5, 0.75, 0.9), "heads": (0.25, 0.5), "neurons": (0.25, 0.5, 0.75)}


def masks_for(method: str, share: float, params, scores):
    if method == "none":
        return P.ones_like(params)
    if method == "magnitude":
        return P.magnitude_masks(params, share)
    if method == "heads":
        return P.head_structure_masks(params, P.lowest(scores["heads"], share))
    return P.neuron_structure_masks(params, P.lowest(scores["neurons"], share))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="training steps of the baby run")
    p.add_argument("--recover-steps", type=int, default=100)
    p.add_argument("--recover-lr", type=float, default=3e-4, help="recovery's peak learning rate")
    p.add_argument("--score-batches", type=int, default=8)
    p.add_argument("--methods", default=",".join(METHODS), help="magnitude, heads, neurons")
    p.add_argument("--shares", default="", help="override every method's shares, e.g. 0.5")
    p.add_argument("--plot", default=None, help="write the perplexity plot here (PNG)")
    p.add_argument("--json", default=None)
    p.add_argument("--results", default=None, help="append the table to this file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        run = load_run(train_small_run(Path(scratch) / "baby", args.steps))
        data = run_data(run)
    m, t = run.config.model, run.config.train
    val = eval_batches(data.val, m.context_length, t.batch_size, 10**9)
    evaluate = jax.jit(make_eval_step(m))

    def ppl(params):
        return math.exp(mean_loss(evaluate, params, val))

    sampler = WindowSampler(len(data.train), m.context_length, t.batch_size, seed=1)

    def train_batches(start: int):
        return (gather(data.train, sampler.starts(start + i), m.context_length) for i in itertools.count())

    scores = P.taylor_scores(run.params, list(itertools.islice(train_batches(0), args.score_batches)), m)
    base = ppl(run.params)
    rows = []
    # "none" recovers too: the unpruned model's own gain from the same extra steps, which
    # the recovered rows are to be read against (a short run keeps improving).
    for method in ["none", *args.methods.split(",")]:
        shares = [0.0] if method == "none" else (
            [float(s) for s in args.shares.split(",")] if args.shares else METHODS[method])
        for share in shares:
            masks = masks_for(method, share, run.params, scores)
            pruned = P.apply_masks(run.params, masks)
            before = ppl(pruned)
            after = ppl(recover(pruned, masks, m, train_batches(10_000), args.recover_steps,
                                lr=args.recover_lr)) if args.recover_steps else None
            rows.append({"method": method, "share": share, **P.sparsity(run.params, masks),
                         "perplexity": before, "recovered": after})
    info = provenance.machine_info()
    lines = [f"### Pruning a trained baby run ({args.steps} steps on the embedded corpus; "
             f"{info['date']}, {info['cpu']}, {info['cores']} cores, jax {info['jax']})", "",
             f"Unpruned perplexity {base:.3f} (whole validation split). Recovery: "
             f"{args.recover_steps} AdamW steps (peak lr {args.recover_lr:g}), pruned weights held at "
             "zero; the row `none` is the unpruned model given the same steps. Taylor scores "
             f"from {args.score_batches} training batches.", "",
             "| method | share pruned | kernel sparsity | all weights | perplexity | after recovery |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        after = f"{r['recovered']:.3f}" if r["recovered"] is not None else "-"
        lines.append(f"| {r['method']} | {r['share']:.0%} | {r['kernels']:.1%} | {r['all']:.1%} | "
                     f"{r['perplexity']:.3f} | {after} |")
    lines.append("")
    if args.plot:
        _plot(rows, base, args.plot)
    provenance.publish({"machine": info, "unpruned": base, "rows": rows}, "\n".join(lines),
                       args.json, args.results)


def _plot(rows: list[dict], base: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows if r["method"] != "none")):
        mine = [r for r in rows if r["method"] == method]
        x = [0] + [100 * r["kernels"] for r in mine]
        ax.plot(x, [base] + [r["perplexity"] for r in mine], "o-", color=f"C{i}", label=f"{method}")
        if all(r["recovered"] is not None for r in mine):
            ax.plot(x, [base] + [r["recovered"] for r in mine], "s--", color=f"C{i}",
                    label=f"{method}, recovered")
    recovered = [r["recovered"] for r in rows if r["method"] == "none" and r["recovered"]]
    ax.axhline(base, color="grey", lw=1, label="unpruned")
    if recovered:
        ax.axhline(recovered[0], color="grey", lw=1, ls="--", label="unpruned, same extra steps")
    ax.set_xlabel("block kernel weights zeroed (%)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Pruning a trained baby GPT")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
