"""Pruning: masks that zero weights of a trained GPT, unstructured or by whole heads and
MLP neurons, and what they leave.

- `magnitude_masks(params, sparsity)`: in every block's four kernels (attention qkv and
  output, MLP in and out), the `sparsity` share of each matrix with the smallest |w|.
  Embeddings, LayerNorms and biases are kept: they are a small share of a block model's
  weights and the first to break it.
- `head_masks` / `neuron_masks(params, scores, share)`: the `share` of attention heads,
  or of MLP neurons, with the lowest importance in each layer. A head is its q, k and v
  columns (and biases) and its rows of the output projection; a neuron is its MLP input
  column (and bias) and its output row.
- `taylor_scores(params, batches, config)`: importance as first-order Taylor, the summed
  |w * dL/dw| over a structure's weights on a few batches (Molchanov et al., 2019): an
  estimate of how much the loss moves when the structure is removed.

A mask is a tree like the parameters (1 keep, 0 drop) and `apply_masks` multiplies. The
shapes stay: zeroed heads and neurons still compute, so pruning here measures what
quality a smaller model keeps, not its speed. `masked_gradients` is what recovery
fine-tuning needs: with masked gradients, AdamW's moments for a pruned weight stay zero,
its update stays zero, and decoupled weight decay keeps a zero at zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax import model
from gptjax.config import ModelConfig

KERNELS = (("attn", "qkv"), ("attn", "out"), ("mlp", "fc"), ("mlp", "proj"))


def ones_like(params: dict) -> dict:
    return jax.tree.map(lambda x: jnp.ones(x.shape, jnp.bool_), params)


def apply_masks(params: dict, masks: dict) -> dict:
    return jax.tree.map(lambda p, m: p * m.astype(p.dtype), params, masks)


def masked_gradients(grads: dict, masks: dict) -> dict:
    return apply_masks(grads, masks)


def _with_blocks(masks: dict, module: str, proj: str, name: str, value) -> dict:
    """A copy of `masks` with blocks/module/proj/name set to `value`."""
    out = jax.tree.map(lambda x: x, masks)  # new containers, the same arrays
    out["blocks"][module][proj][name] = value
    return out


def magnitude_masks(params: dict, sparsity: float) -> dict:
    """Drop the `sparsity` share of each block kernel with the smallest |w|, layer by layer."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    masks = ones_like(params)
    for module, proj in KERNELS:
        kernel = params["blocks"][module][proj]["kernel"]  # (layers, ...)
        flat = jnp.abs(kernel.reshape(kernel.shape[0], -1))
        k = int(round(sparsity * flat.shape[1]))
        if k == 0:
            continue
        # the k-th smallest |w| of each layer; ties at the threshold are dropped with it
        threshold = jnp.sort(flat, axis=1)[:, k - 1:k]
        keep = (flat > threshold).reshape(kernel.shape)
        masks = _with_blocks(masks, module, proj, "kernel", keep)
    return masks


def head_structure_masks(params: dict, drop_lh) -> dict:
    """Masks dropping heads: `drop_lh` (layers, heads) True where a head goes."""
    keep_lh = ~drop_lh
    qkv = params["blocks"]["attn"]["qkv"]  # kernel (L, d, 3, h, hd), bias (L, 3, h, hd)
    out = params["blocks"]["attn"]["out"]  # kernel (L, h, hd, d)
    masks = ones_like(params)
    masks = _with_blocks(masks, "attn", "qkv", "kernel",
                         jnp.broadcast_to(keep_lh[:, None, None, :, None], qkv["kernel"].shape))
    if "bias" in qkv:
        masks = _with_blocks(masks, "attn", "qkv", "bias",
                             jnp.broadcast_to(keep_lh[:, None, :, None], qkv["bias"].shape))
    return _with_blocks(masks, "attn", "out", "kernel",
                        jnp.broadcast_to(keep_lh[:, :, None, None], out["kernel"].shape))


def neuron_structure_masks(params: dict, drop_ln) -> dict:
    """Masks dropping MLP neurons: `drop_ln` (layers, width) True where a neuron goes."""
    keep_ln = ~drop_ln
    fc, proj = params["blocks"]["mlp"]["fc"], params["blocks"]["mlp"]["proj"]
    masks = ones_like(params)
    masks = _with_blocks(masks, "mlp", "fc", "kernel",
                         jnp.broadcast_to(keep_ln[:, None, :], fc["kernel"].shape))
    if "bias" in fc:
        masks = _with_blocks(masks, "mlp", "fc", "bias", keep_ln)
    return _with_blocks(masks, "mlp", "proj", "kernel",
                        jnp.broadcast_to(keep_ln[:, :, None], proj["kernel"].shape))


def lowest(scores_lx, share: float):
    """(layers, x) True for the `share` of each layer's entries with the lowest score."""
    if not 0 <= share < 1:
        raise ValueError(f"the share pruned must be in [0, 1), got {share}")
    k = int(round(share * scores_lx.shape[1]))
    ranks = jnp.argsort(jnp.argsort(scores_lx, axis=1), axis=1)
    return ranks < k


def taylor_scores(params: dict, batches: list[dict], config: ModelConfig) -> dict:
    """{"heads": (layers, heads), "neurons": (layers, width)}: summed |w * dL/dw| over each
    structure's weights, accumulated over `batches`."""
    grad = jax.jit(jax.grad(lambda p, b: model.loss(p, b, config)))
    heads = neurons = 0.0
    for b in batches:
        g = grad(params, b)
        saliency = jax.tree.map(lambda w, d: jnp.abs(w * d), params, g)
        attn, mlp = saliency["blocks"]["attn"], saliency["blocks"]["mlp"]
        h = attn["qkv"]["kernel"].sum(axis=(1, 2, 4)) + attn["out"]["kernel"].sum(axis=(2, 3))
        if "bias" in attn["qkv"]:
            h = h + attn["qkv"]["bias"].sum(axis=(1, 3))
        n = mlp["fc"]["kernel"].sum(axis=1) + mlp["proj"]["kernel"].sum(axis=2)
        if "bias" in mlp["fc"]:
            n = n + mlp["fc"]["bias"]
        heads, neurons = heads + h, neurons + n
    return {"heads": heads, "neurons": neurons}


def sparsity(params: dict, masks: dict) -> dict:
    """The share of zeroed weights: of the block kernels, and of all parameters."""
    kernels = [(masks["blocks"][m][p]["kernel"], params["blocks"][m][p]["kernel"]) for m, p in KERNELS]
    dropped = sum(int((~m).sum()) for m, _ in kernels)
    total_k = sum(k.size for _, k in kernels)
    all_dropped = sum(int((~m).sum()) for m in jax.tree.leaves(masks))
    return {"kernels": dropped / total_k,
            "all": all_dropped / sum(x.size for x in jax.tree.leaves(params))}
