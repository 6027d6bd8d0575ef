"""The optax chain: global-norm clipping, then AdamW with a warmup-cosine schedule.

Weight decay applies to matrices of linear layers only ("kernel" leaves): never to
biases, LayerNorm parameters or the embeddings, following GPT-2/nanoGPT practice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gptjax.config import Tail, TrainConfig, parse_tails


def schedule(cfg: TrainConfig, lr=None) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, cosine lr -> min_lr by max_steps (or
    decay_steps); then each of a run's extensions (`lr_tails`) from its start step.

    `lr` replaces cfg.lr and may be traced: a sweep's members each bring their own."""
    if lr is None:
        first = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.decay_steps or cfg.max_steps, end_value=cfg.min_lr)
    else:  # optax's schedule branches on the peak's value, which a traced one has not
        first = _warmup_cosine(cfg, lr)
    tails = parse_tails(cfg.lr_tails)
    if not tails:
        return first
    return optax.join_schedules([first, *(_cosine_tail(t, cfg.min_lr) for t in tails)],
                                [t.start for t in tails])


def _warmup_cosine(cfg: TrainConfig, lr) -> optax.Schedule:
    """optax.warmup_cosine_decay_schedule's values, with arithmetic only: `lr` may be traced."""
    warm = cfg.warmup_steps
    length = max((cfg.decay_steps or cfg.max_steps) - warm, 1)

    def rate(count):
        rising = lr * jnp.clip(count, 0, warm) / max(warm, 1)
        done = jnp.clip(count - warm, 0, length) / length
        falling = cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * done))
        return jnp.where(count < warm, rising, falling)
    return rate


def _cosine_tail(tail: Tail, min_lr: float) -> optax.Schedule:
    """tail.lr at its start (count 0, as join_schedules counts) down to min_lr at its end."""
    length = tail.end - tail.start

    def rate(count):
        done = jnp.clip(count / length, 0.0, 1.0)
        return min_lr + (tail.lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * done))
    return rate


def decay_mask(params):
    """True for leaves that get weight decay: linear-layer kernels."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def optimizer(cfg: TrainConfig, lr=None, weight_decay=None) -> optax.GradientTransformation:
    """The chain for cfg; `lr` and `weight_decay` replace cfg's and may be traced (a sweep's
    per-member values): the optimizer state's structure does not depend on them."""
    # Always a two-stage chain, so the optimizer-state structure (and thus checkpoints)
    # does not depend on whether clipping is on.
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    decay = cfg.weight_decay if weight_decay is None else weight_decay
    adamw = optax.adamw(schedule(cfg, lr), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                        weight_decay=decay, mask=decay_mask)
    return optax.chain(clip, adamw)
