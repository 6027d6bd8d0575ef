"""Pure training and evaluation steps over a plain pytree state.

`train_step(state, batch) -> (state, metrics)` is a pure function: jit it (with the state
donated), give it shardings, or call it inside shard_map/pmap with `axis_name` set so
gradients and loss are summed across that axis. Gradient accumulation runs as a scan over
micro-batches inside the same jit and sums token losses before dividing, so the update
equals the one for the whole global batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gptjax import model
from gptjax.config import ModelConfig, TrainConfig
from gptjax.parallel.distributed import host
from gptjax.training import layer_stats, optim


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # base PRNG key (raw uint32[2]); per-step keys are folded from it


def init_state(model_cfg: ModelConfig, train_cfg: TrainConfig,
               tx: optax.GradientTransformation | None = None, params=None,
               seed=None) -> TrainState:
    """Initial state from the seed (or from given params, e.g. pretrained weights); `seed`
    replaces train_cfg.seed and may be traced (vmapped over a sweep's seeds)."""
    key = jax.random.PRNGKey(train_cfg.seed if seed is None else seed)
    init_key, dropout_key = jax.random.split(key)
    if params is None:
        params = model.init(model_cfg, init_key)
    tx = tx or optim.optimizer(train_cfg)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), dropout_key)


def _split_micro(batch: dict, n_micro: int) -> dict:
    # Row r goes to micro-batch r % n_micro: every micro-batch takes rows from every
    # data shard, so a batch sharded along rows stays evenly sharded per micro-step.
    def split(x):
        return x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def make_step_parts(model_cfg: ModelConfig, train_cfg: TrainConfig,
                    tx: optax.GradientTransformation | None = None, *, axis_name=None,
                    stats: bool = False, hparams: dict | None = None):
    """The train step's two halves: gradients(state, batch) -> (grads, loss sum, token
    count, observed), and update(state, grads, total, count, observed) -> (state, metrics).
    make_train_step composes them in one function (one jit). Apart, code can act between
    them (inspect or change the gradients), and benchmarks/train_step_ab.py jits them apart
    to measure what fusing the optimizer into the step is worth.

    With `stats`, the forward pass also observes activations and attention weights, and
    the metrics gain "stats" (gptjax.training.layer_stats); without it, `observed` is None
    and the step is the plain one.

    `hparams` ({"lr": ..., "weight_decay": ...}, traced or not) replace train_cfg's values
    in the optimizer and the reported learning rate: gptjax.training.sweep vmaps the step
    over its members' values."""
    hparams = hparams or {}
    tx = tx or optim.optimizer(train_cfg, **hparams)
    lr_at = optim.schedule(train_cfg, hparams.get("lr"))
    n_micro = train_cfg.grad_accum
    skip_nonfinite = train_cfg.on_nonfinite == "skip"
    deterministic = model_cfg.dropout == 0.0

    def observed_loss_sum(params, micro, key):
        logits, seen = model.apply_observed(params, micro["inputs"], model_cfg,
                                            deterministic=deterministic, rng=key)
        total, count = model.ce_sum(logits, micro)
        return total, (count, layer_stats.summarize_observed(seen))

    def micro_grads(params, micro, key):
        if stats:
            (total, (count, seen)), grads = jax.value_and_grad(observed_loss_sum, has_aux=True)(
                params, micro, key)
            return total, count, grads, seen
        (total, count), grads = jax.value_and_grad(model.loss_sum, has_aux=True)(
            params, micro, model_cfg, deterministic=deterministic, rng=key)
        return total, count, grads, None

    def gradients(state: TrainState, batch: dict):
        step_key = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:  # each shard of the batch draws its own dropout masks
            step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
        if n_micro == 1:
            total, count, grads, seen = micro_grads(state.params, batch, step_key)
        else:
            def body(carry, xs):
                i, micro = xs
                t, c, g, o = micro_grads(state.params, micro, jax.random.fold_in(step_key, i))
                acc_t, acc_c, acc_g = carry
                return (acc_t + t, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), o
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (total, count, grads), seen = jax.lax.scan(
                body, (jnp.zeros(()), jnp.zeros(()), zeros),
                (jnp.arange(n_micro), _split_micro(batch, n_micro)))
            seen = jax.tree.map(lambda x: x.mean(0), seen)  # the micro-batches' mean
        if axis_name is not None:
            total, count, grads = jax.lax.psum((total, count, grads), axis_name)
            seen = jax.lax.pmean(seen, axis_name)
        return grads, total, count, seen

    def update(state: TrainState, grads, total, count, seen=None):
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads),
                   "lr": lr_at(state.step)}
        if skip_nonfinite:
            # Like optax.apply_if_finite, but the optimizer state keeps its structure, so a
            # run may switch policy on resume: the step (and the data) move on, nothing else.
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            metrics["skipped"] = ~ok
        if seen is not None:
            metrics["stats"] = layer_stats.step_stats(grads, updates, state.params, seen)
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return gradients, update


def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig,
                    tx: optax.GradientTransformation | None = None, *, axis_name=None,
                    stats: bool = False, hparams: dict | None = None):
    """Build train_step(state, batch) -> (state, metrics) for these configs; with `stats`,
    the metrics carry the per-layer statistics, and `hparams` replace train_cfg's learning
    rate and weight decay (see make_step_parts)."""
    gradients, update = make_step_parts(model_cfg, train_cfg, tx, axis_name=axis_name,
                                        stats=stats, hparams=hparams)

    def train_step(state: TrainState, batch: dict):
        return update(state, *gradients(state, batch))

    return train_step


def mean_loss(eval_step, params, batches: list[dict]) -> float:
    """Token-weighted mean loss of eval_step over batches (one device sync at the end, or
    one per batch in a multi-process job)."""
    parts = []
    for b in batches:
        parts.append(eval_step(params, b))
        if jax.process_count() > 1:
            # Independent steps whose collectives are in flight at once deadlocked two CPU
            # processes (gloo); one step at a time keeps every process in the same order.
            jax.block_until_ready(parts[-1])
    summed = jax.tree.map(lambda *x: sum(x), *parts)
    total, count = jax.tree.map(host, summed)  # replicated: each process reads its own copy
    return float(total / count)


def make_eval_step(model_cfg: ModelConfig):
    """eval_step(params, batch) -> (sum of token losses, token count); divide to average."""
    def eval_step(params, batch: dict):
        return model.loss_sum(params, batch, model_cfg)
    return eval_step
