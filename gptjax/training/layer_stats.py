"""Per-layer training statistics, computed inside a jitted step only when asked.

A statistics step (`make_train_step(..., stats=True)`, run every `train.stats_every` steps)
returns, beside the usual metrics, `metrics["stats"]`:

- gradient, update and parameter norms per block (the stacked layer axis) and per kind of
  parameter (embeddings, attention, mlp, norms), and the update/parameter norm ratios;
- the residual stream's RMS after each block (over the whole micro-batch), and each head's
  attention entropy (nats, averaged over query positions) on the micro-batch's first row,
  both from `model.apply_observed`.

`flatten` turns them into one flat record for metrics.jsonl and the trackers, and
`plot_stats` draws stats.png from those records.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp

KINDS = ("embeddings", "attention", "mlp", "norms")
_KIND_OF = {"wte": "embeddings", "wpe": "embeddings", "attn": "attention", "mlp": "mlp",
            "ln1": "norms", "ln2": "norms", "ln_f": "norms"}
# Norms kept apart by block and by kind: gradients, optimizer updates, parameters.
TREES = ("grad", "update", "param")


def kind_of(path) -> str:
    """The kind of the parameter at a tree path: the first of its keys that names one."""
    for key in path:
        name = getattr(key, "key", None)
        if name in _KIND_OF:
            return _KIND_OF[name]
    return "other"


def tree_norms(tree) -> dict:
    """{"block": (layer,) norms over each layer's slice of the stacked blocks, and one norm
    per kind over every parameter of that kind}."""
    squares = {kind: jnp.zeros((), jnp.float32) for kind in KINDS}
    by_block = None
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        sq = jnp.square(leaf.astype(jnp.float32))
        kind = kind_of(path)
        squares[kind] = squares.get(kind, 0.0) + sq.sum()
        if getattr(path[0], "key", None) == "blocks":
            per_layer = sq.reshape(sq.shape[0], -1).sum(axis=1)
            by_block = per_layer if by_block is None else by_block + per_layer
    out = {kind: jnp.sqrt(v) for kind, v in squares.items()}
    if by_block is not None:
        out["block"] = jnp.sqrt(by_block)
    return out


def attention_entropy(probs_lhqk: jax.Array) -> jax.Array:
    """Each head's entropy in nats, averaged over query positions: (layer, head). Query i
    can reach at most log(i + 1); a head that attends to one key scores 0."""
    plogp = jnp.where(probs_lhqk > 0, probs_lhqk * jnp.log(jnp.where(probs_lhqk > 0, probs_lhqk, 1.0)), 0.0)
    return -plogp.sum(-1).mean(-1)


def summarize_observed(seen: dict) -> dict:
    """What a statistics step keeps of `model.apply_observed`'s output (small arrays only)."""
    return {"act_rms": seen["resid_rms"], "attn_entropy": attention_entropy(seen["attn_probs"])}


def step_stats(grads, updates, params, observed: dict) -> dict:
    """The statistics of one step: norms of the three trees, update/parameter ratios, and
    the observed activations. `params` are the parameters before the update."""
    norms = {name: tree_norms(tree) for name, tree in zip(TREES, (grads, updates, params))}
    ratio = {k: norms["update"][k] / jnp.maximum(norms["param"][k], 1e-12) for k in norms["param"]}
    return {**{f"{name}_norm": v for name, v in norms.items()}, "update_ratio": ratio, **observed}


def flatten(stats: dict) -> dict:
    """Host statistics as one flat record: "grad_norm/block0", "grad_norm/attention",
    "update_ratio/mlp", "act_rms/block2", "attn_entropy/layer1/head3", ..."""
    out = {}
    for group, value in stats.items():
        if isinstance(value, dict):
            for key, v in value.items():
                if key == "block":
                    out.update({f"{group}/block{i}": float(x) for i, x in enumerate(v)})
                else:
                    out[f"{group}/{key}"] = float(v)
        elif group == "attn_entropy":
            for layer, heads in enumerate(value):
                out.update({f"{group}/layer{layer}/head{h}": float(x) for h, x in enumerate(heads)})
        else:
            out.update({f"{group}/block{i}": float(x) for i, x in enumerate(value)})
    return out


def plot_stats(records: list[dict], path: Path, title: str = "") -> Path | None:
    """stats.png from the "stats" records of metrics.jsonl: six panels against step. None
    when there are no such records."""
    rows = [r for r in records if r.get("kind") == "stats"]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    n_layer = sum(1 for k in rows[0] if k.startswith("grad_norm/block"))
    panels = [("gradient norm by kind", [f"grad_norm/{k}" for k in KINDS], KINDS, True),
              ("gradient norm by block", _blocks("grad_norm", n_layer), None, True),
              ("update / parameter norm by block", _blocks("update_ratio", n_layer), None, True),
              ("parameter norm by block", _blocks("param_norm", n_layer), None, False),
              ("residual RMS after each block", _blocks("act_rms", n_layer), None, False),
              ("attention entropy (nats, mean of heads)", None, None, False)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=100, layout="constrained")
    for ax, (name, keys, labels, log) in zip(axes.flat, panels):
        if keys is None:  # entropy: each layer's mean over its heads
            for layer in range(n_layer):
                heads = [k for k in rows[0] if k.startswith(f"attn_entropy/layer{layer}/")]
                ax.plot(steps, [sum(r[k] for k in heads) / len(heads) for r in rows], label=f"layer {layer}")
        else:
            for key, label in zip(keys, labels or [f"block {i}" for i in range(len(keys))]):
                ys = [r.get(key, math.nan) for r in rows]
                if any(math.isfinite(y) and y > 0 for y in ys):
                    ax.plot(steps, ys, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (n_layer <= 12 or labels):
            ax.legend(fontsize=7, ncols=2 if n_layer > 6 else 1)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path)
    plt.close(fig)
    return path


def _blocks(group: str, n_layer: int) -> list[str]:
    return [f"{group}/block{i}" for i in range(n_layer)]
