"""N copies of one model trained by one compiled step: the members' states are stacked on
a leading axis and the train step is vmapped over it, with each member's learning rate,
weight decay and seed as data rather than as constants.

Pure pieces, composable from research code:

    members = grid(run_cfg, lrs=[1e-3, 3e-4], seeds=[0, 1])
    state = init_states(model_cfg, train_cfg, members)       # leaves shaped (N, ...)
    step = make_sweep_step(model_cfg, train_cfg)              # (state, batch, hparams)
    state, metrics = jax.jit(step)(state, batches, hparams(members))  # metrics shaped (N,)

Batches are stacked too, (N, batch, context): a member draws the windows its own seed
draws in a single run, so each member's losses are its own `gptjax train` run's.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import ModelConfig, RunConfig, TrainConfig, validate
from gptjax.errors import GptjaxError
from gptjax.training import optim
from gptjax.training.step import TrainState, init_state, make_eval_step, make_train_step

SWEPT = ("lr", "weight_decay", "seed")  # the TrainConfig fields a member may change


def grid(cfg: RunConfig, *, lrs=(), weight_decays=(), seeds=()) -> list[TrainConfig]:
    """Every combination of the given values (an empty list keeps cfg.train's value), as
    one TrainConfig per member, learning rate varying slowest; each member's run config is
    validated as a single run's would be."""
    train_cfg = cfg.train
    values = {"lr": list(lrs) or [train_cfg.lr],
              "weight_decay": list(weight_decays) or [train_cfg.weight_decay],
              "seed": list(seeds) or [train_cfg.seed]}
    for name, vals in values.items():
        if len(set(vals)) < len(vals):
            raise GptjaxError(f"the swept {name} values repeat: {vals}")
    members = [dataclasses.replace(train_cfg, lr=lr, weight_decay=wd, seed=seed)
               for lr, wd, seed in itertools.product(*values.values())]
    validate(dataclasses.replace(cfg, train=members[0]))  # what all share: no member named
    for m in members:
        try:
            validate(dataclasses.replace(cfg, train=m))
        except GptjaxError as e:
            raise GptjaxError(f"sweep member {describe(m)}: {e}") from None
    return members


def describe(member_cfg: TrainConfig) -> str:
    return f"lr={member_cfg.lr:g}, weight_decay={member_cfg.weight_decay:g}, seed={member_cfg.seed}"


def hparams(members: list[TrainConfig]) -> dict:
    """The members' per-member optimizer values, shaped (N,), for make_sweep_step."""
    return {"lr": jnp.array([m.lr for m in members], jnp.float32),
            "weight_decay": jnp.array([m.weight_decay for m in members], jnp.float32)}


def init_states(model_cfg: ModelConfig, train_cfg: TrainConfig,
                members: list[TrainConfig]) -> TrainState:
    """The members' initial states stacked on a leading axis: member i is init_state of
    its seed (the same values a single run starts from)."""
    tx = optim.optimizer(train_cfg)  # the state's structure; values come per member
    seeds = jnp.array([m.seed for m in members], jnp.uint32)
    return jax.vmap(lambda s: init_state(model_cfg, train_cfg, tx, seed=s))(seeds)


def make_sweep_step(model_cfg: ModelConfig, train_cfg: TrainConfig):
    """step(states, batches, hparams) -> (states, metrics): the train step of every member
    at once, each with its own learning rate and weight decay. Everything else (schedule
    shape, clipping, accumulation, the non-finite policy) is train_cfg's, for all."""
    def member_step(state: TrainState, batch: dict, hp: dict):
        return make_train_step(model_cfg, train_cfg, hparams=hp)(state, batch)
    return jax.vmap(member_step)


def make_sweep_eval(model_cfg: ModelConfig):
    """eval(params, batch) -> (loss sums, token counts), each (N,): every member's
    validation loss on the same batch."""
    return jax.vmap(make_eval_step(model_cfg), in_axes=(0, None))


def stack_batches(batches: list[dict]) -> dict:
    """Member batches (dicts of (B, T) arrays) as one dict of (N, B, T) arrays."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def member(state: TrainState, i: int) -> TrainState:
    """Member i's state alone, as a single run holds it."""
    return jax.tree.map(lambda x: x[i], state)
