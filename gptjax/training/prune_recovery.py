"""Recovery fine-tuning after pruning: a few AdamW steps on the training data with the
pruned weights held at zero (gptjax.model.prune.masked_gradients), so the kept weights
take over what the dropped ones did."""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import optax

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.model.prune import apply_masks, masked_gradients


def recover(params: dict, masks: dict, config: ModelConfig, batches: Iterator[dict], steps: int,
            lr: float = 3e-4, weight_decay: float = 0.1,
            on_step: Callable[[int, float], None] | None = None) -> dict:
    """`params` (already masked) after `steps` steps on `batches`, still masked."""
    tx = optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.1),
                     weight_decay=weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: model.loss(p, batch, config))(params)
        updates, opt_state = tx.update(masked_gradients(grads, masks), opt_state, params)
        # The update of a masked weight is zero already; the product only guards rounding.
        return apply_masks(optax.apply_updates(params, updates), masks), opt_state, loss

    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, next(batches))
        if on_step is not None:
            on_step(i + 1, float(loss))
    return params
