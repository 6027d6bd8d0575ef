"""The fine-tuning optimizer: AdamW with separate learning rates for new parameters (task
head, adapters) and pretrained ones, via optax.multi_transform.

Pretrained weights usually want a learning rate several times lower than a freshly
initialised head. With `--train last-N` the stacked block weights are one array per kind,
so the first layers are held still by zeroing their rows of the update after AdamW
(decoupled weight decay included), not by a per-leaf label.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gptjax.model.parts import NEW_PARTS
from gptjax.training.optim import decay_mask


def schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `peak`, cosine decay to a tenth of it at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1),
                                              peak / 10)


def train_last_layers(n_train: int, n_layer: int) -> optax.GradientTransformation:
    """Zero all but the last `n_train` layers of the stacked pretrained block weights
    ({"gpt": {"blocks": ...}}) in whatever passes through: gradients or updates."""
    if n_train >= n_layer:
        return optax.identity()
    keep = jnp.arange(n_layer) >= n_layer - n_train

    def update(updates, state, params=None):
        def mask(path, u):
            # Pretrained block weights only: adapters are stacked over layers too.
            if getattr(path[0], "key", None) == "gpt" and any(getattr(k, "key", None) == "blocks" for k in path):
                return u * keep.reshape(-1, *[1] * (u.ndim - 1)).astype(u.dtype)
            return u
        return jax.tree_util.tree_map_with_path(mask, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(trainable: dict, *, lr: float, base_lr: float, warmup_steps: int, total_steps: int,
              weight_decay: float, grad_clip: float, blocks_trained: int, n_layer: int
              ) -> optax.GradientTransformation:
    """Clip, then AdamW at `lr` for new parts and at `base_lr` for pretrained weights."""
    def adamw(peak):
        return optax.adamw(schedule(peak, warmup_steps, total_steps), b1=0.9, b2=0.999,
                           weight_decay=weight_decay, mask=decay_mask)
    labels = {key: jax.tree.map(lambda _, k=key: "new" if k in NEW_PARTS else "base", sub)
              for key, sub in trainable.items()}
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    # Layers that do not train are masked twice: their gradients before clipping (so they do
    # not count in the global norm), and their updates after AdamW (its weight decay).
    frozen_rows = train_last_layers(blocks_trained, n_layer)
    return optax.chain(frozen_rows, clip, optax.multi_transform(
        {"new": adamw(lr),
         "base": optax.chain(adamw(base_lr), train_last_layers(blocks_trained, n_layer))},
        labels))
