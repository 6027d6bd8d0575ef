"""The pure fine-tuning step over (trainable, frozen) parameters.

`step(state, frozen, batch) -> (state, metrics)`: the loss sees join(trainable, frozen),
gradients are taken for the trainable part only, and the frozen part is an input that is
never donated or returned, so the base weights stay bitwise what was loaded.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gptjax.model.parts import join

# loss_sum(params, batch, rng) -> (summed loss, summed weight): exact averages over batches.
LossSum = Callable[[dict, dict, jax.Array], tuple[jax.Array, jax.Array]]


class FinetuneState(NamedTuple):
    step: jax.Array  # int32 scalar
    trainable: Any
    opt_state: Any
    rng: jax.Array  # per-step dropout keys are folded from it


def init_state(trainable: dict, tx: optax.GradientTransformation, seed: int) -> FinetuneState:
    return FinetuneState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable),
                         jax.random.PRNGKey(seed))


def make_step(loss_sum: LossSum, tx: optax.GradientTransformation):
    """step(state, frozen, batch) -> (state, {"loss", "grad_norm"}); jit it donating state."""
    def step(state: FinetuneState, frozen: dict, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)

        def objective(trainable):
            return loss_sum(join(trainable, frozen), batch, key)
        (total, count), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        count = jnp.maximum(count, 1e-9)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads)}
        return FinetuneState(state.step + 1, trainable, opt_state, state.rng), metrics

    return step


def make_eval(loss_sum: LossSum):
    """eval(params, batch) -> (summed loss, summed weight), deterministic."""
    def evaluate(params: dict, batch: dict):
        return loss_sum(params, batch, None)
    return evaluate
