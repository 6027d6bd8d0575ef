"""Attention weights of a prompt, per layer and head, as PNG heatmaps and an .npz array.

    probs = attention_maps(params, cfg, ids)          # (layer, head, query, key), float32
    paths = write_maps(probs, labels, out_dir, layers=[0, 3], heads=None)

The weights are `model.apply_observed`'s: the explicit causal softmax of q k^T recomputed
from the model's own q and k, whichever attention formulation the model trains with.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError

# Past this many tokens, label every n-th position only: the labels would overlap.
MAX_LABELS = 48


def attention_maps(params: dict, cfg: ModelConfig, ids: list[int]) -> np.ndarray:
    """The attention weights (layer, head, query, key) of the sequence `ids`."""
    if not ids:
        raise GptjaxError("the prompt is empty: it needs at least one token")
    if len(ids) > cfg.context_length:
        raise GptjaxError(f"the prompt is {len(ids)} tokens; the model reads at most "
                          f"{cfg.context_length} (context_length)")
    _, seen = model.apply_observed(params, jnp.asarray([ids], jnp.int32), cfg)
    return np.asarray(seen["attn_probs"])


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """One readable label per token: its text, with whitespace made visible."""
    out = []
    for i in ids:
        text = tokenizer.decode([i])
        out.append(text.replace(" ", "\u00b7").replace("\n", "\\n").replace("\t", "\\t") or "\u2205")
    return out


def parse_selection(text: str | None, count: int, what: str) -> list[int]:
    """Indices from "all" (or None), or a comma list such as "0,2,-1" (negative counts from
    the end), each checked against `count`."""
    if text is None or text.strip() == "all":
        return list(range(count))
    picked = []
    for part in text.split(","):
        try:
            i = int(part)
        except ValueError:
            raise GptjaxError(f"--{what} takes all or comma-separated indices, not {text!r}") from None
        if not -count <= i < count:
            raise GptjaxError(f"--{what}: {i} is out of range; the model has {count} {what} (0-{count - 1})")
        picked.append(i % count)
    return list(dict.fromkeys(picked))


def write_maps(probs: np.ndarray, labels: list[str], out: Path, layers: list[int],
               heads: list[int], title: str = "") -> list[Path]:
    """attention.npz (all layers and heads, and the labels) and one PNG per picked layer,
    a panel per picked head. Returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "attention.npz", probs=probs, tokens=np.asarray(labels))
    return [_plot_layer(probs[layer], labels, layer, heads, out / f"attention_layer{layer}.png", title)
            for layer in layers]


def _plot_layer(probs_hqk: np.ndarray, labels: list[str], layer: int, heads: list[int],
                path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    t = len(labels)
    side = min(max(2.6, 0.16 * t + 1.2), 8.0)  # room for the labels of a longer prompt
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1.0, side * rows + 0.5),
                             dpi=110, squeeze=False, layout="constrained")
    every = max(1, math.ceil(t / MAX_LABELS))
    ticks = list(range(0, t, every))
    image = None
    for ax, head in zip(axes.flat, heads):
        image = ax.imshow(probs_hqk[head], cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=9)
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    fig.suptitle(f"{title + ': ' if title else ''}layer {layer} attention weights", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.9, label="weight")
    fig.savefig(path)
    plt.close(fig)
    return path
