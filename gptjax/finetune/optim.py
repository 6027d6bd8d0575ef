"""The fine-tuning optimizer: AdamW with separate learning rates for new parameters (task
head, adapters) and pretrained ones, via optax.multi_transform.

Pretrained weights usually want a learning rate several times lower than a freshly
initialised head. The stacked block weights are one array per kind, so which layers train
(`--train last-N`, `--unfreeze`) and at what rate (`--layer-lr-decay`) are per-row factors
on those arrays (`depth.scale_by_depth`), not per-leaf labels.
"""

from __future__ import annotations

import jax
import optax

from gptjax.finetune.depth import DepthPlan, scale_by_depth
from gptjax.model.parts import NEW_PARTS
from gptjax.training.optim import decay_mask


def schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `peak`, cosine decay to a tenth of it at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1),
                                              peak / 10)


def optimizer(trainable: dict, plan: DepthPlan, *, lr: float, base_lr: float, warmup_steps: int,
              total_steps: int, weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
    """Clip, then AdamW at `lr` for new parts and at `base_lr` (times the plan's layer
    factors) for pretrained weights."""
    def adamw(peak):
        return optax.adamw(schedule(peak, warmup_steps, total_steps), b1=0.9, b2=0.999,
                           weight_decay=weight_decay, mask=decay_mask)
    labels = {key: jax.tree.map(lambda _, k=key: "new" if k in NEW_PARTS else "base", sub)
              for key, sub in trainable.items()}
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    # Layers that do not train are masked twice: their gradients before clipping (so they
    # do not count in the global norm or reach AdamW's moments), and their updates after
    # AdamW (its weight decay), where the layer-wise learning rates apply too.
    return optax.chain(scale_by_depth(plan, with_lr=False), clip, optax.multi_transform(
        {"new": adamw(lr), "base": optax.chain(adamw(base_lr), scale_by_depth(plan, with_lr=True))},
        labels))
