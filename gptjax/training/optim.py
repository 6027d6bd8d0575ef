"""The optax chain: global-norm clipping, then AdamW with a warmup-cosine schedule.

Weight decay applies to matrices of linear layers only ("kernel" leaves): never to
biases, LayerNorm parameters or the embeddings, following GPT-2/nanoGPT practice.
"""

from __future__ import annotations

import jax
import optax

from gptjax.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, cosine lr -> min_lr by max_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.max_steps, end_value=cfg.min_lr,
    )


def decay_mask(params):
    """True for leaves that get weight decay: linear-layer kernels."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    # Always a two-stage chain, so the optimizer-state structure (and thus checkpoints)
    # does not depend on whether clipping is on.
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    adamw = optax.adamw(schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(clip, adamw)
