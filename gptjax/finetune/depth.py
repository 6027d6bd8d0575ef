"""Per-depth control of the pretrained weights: which layers train when, and how fast.

A GPT's parameters sit at depths 0..L+1: the embeddings (wte, wpe) at 0, block i at i
(1-based; the stacked block arrays hold one row per block), the final norm at L+1. A
vector of L+2 factors, one per depth, multiplies whatever passes through the
transformation (gradients or updates). Three settings make those factors:

- `--train last-N` opens only the top N blocks and the final norm (a constant 0/1 mask);
- `--unfreeze gradual:E` opens one more depth every E epochs: the final norm (with the
  task head, which is never held) first, then the blocks from the top, the embeddings last;
- `--layer-lr-decay g` scales block i's updates by g^(L-i), the embeddings' by g^L.

Scaling AdamW's update is scaling its learning rate (decoupled weight decay included),
so the decay is exactly a per-layer learning rate. New parameters (head, adapters) are
not the GPT's and pass untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.model.parts import Trainable


@dataclass(frozen=True)
class DepthPlan:
    """The factors per depth for a model of `n_layer` blocks."""

    n_layer: int
    trainable: Trainable
    stage_steps: int = 0  # steps per unfreezing stage; 0 = no gradual unfreezing
    lr_decay: float = 1.0

    @property
    def stages(self) -> int:
        """Stages until everything `trainable` allows is open (stage 0 included)."""
        return self.n_layer + 2 if self.trainable.embeddings else self.trainable.blocks + 1

    def open_at(self, stage) -> np.ndarray | jax.Array:
        """0/1 per depth: what trains at `stage` (an int, or a traced count's stage)."""
        L, t = self.n_layer, self.trainable
        depth = np.arange(L + 2)
        allowed = np.where(depth == 0, t.embeddings, depth > L - t.blocks).astype(np.float32)
        if not self.stage_steps:
            return allowed
        return allowed * (stage >= L + 1 - depth)

    def lr_factors(self) -> np.ndarray:
        """g^(L-i) for block i, g^L for the embeddings, 1 for the final norm."""
        L = self.n_layer
        exponent = np.concatenate([[L], L - np.arange(1, L + 1), [0]])
        return (np.float64(self.lr_decay) ** exponent).astype(np.float32)

    @property
    def is_constant(self) -> bool:
        return not self.stage_steps

    def describe(self, total_steps: int, *, head: bool) -> list[str]:
        """Console lines on the schedules; `head`: the task has a head of its own."""
        lines = []
        if self.lr_decay != 1.0:
            f = self.lr_factors()
            embeddings = f", embeddings x{f[0]:.3g}" if self.trainable.embeddings else ""
            lines.append(f"layer-wise learning rates: block i at {self.lr_decay:g}^({self.n_layer}-i) of the "
                         f"top one (block 1 x{f[1]:.3g}{embeddings})")
        if self.stage_steps:
            top = "the head and final norm" if head else "the final norm"
            reached = min(self.stages - 1, (max(total_steps, 1) - 1) // self.stage_steps)
            lines.append(f"gradual unfreezing: one more layer every {self.stage_steps} steps, {top} "
                         f"first; this run reaches stage {reached} of {self.stages - 1} "
                         f"({_stage_name(reached, self.n_layer, top)})")
        return lines


def _stage_name(stage: int, n_layer: int, top: str) -> str:
    if stage == 0:
        return f"{top} only"
    if stage <= n_layer:
        return f"the top {stage} block(s) open"
    return "everything open"


class DepthState(NamedTuple):
    count: jax.Array  # updates seen: the step, for the unfreezing stage


def scale_by_depth(plan: DepthPlan, *, with_lr: bool) -> optax.GradientTransformation:
    """Multiply the GPT's leaves ({"gpt": ...}) by their depth's factor: the open mask,
    times the layer-wise learning rates when `with_lr`."""
    lr = plan.lr_factors() if with_lr else np.ones(plan.n_layer + 2, np.float32)
    if plan.is_constant and np.all(plan.open_at(0) * lr == 1.0):
        return optax.identity()

    def factors(count):
        stage = count // plan.stage_steps if plan.stage_steps else 0
        return jnp.asarray(plan.open_at(stage), jnp.float32) * lr

    def update(updates, state, params=None):
        f = factors(state.count)
        scaled = jax.tree_util.tree_map_with_path(lambda path, u: _scale_leaf(path, u, f, plan.n_layer),
                                                  updates)
        return scaled, DepthState(state.count + 1)

    return optax.GradientTransformation(lambda params: DepthState(jnp.zeros((), jnp.int32)), update)


def _scale_leaf(path, u, f, n_layer: int):
    keys = [getattr(k, "key", None) for k in path]
    if keys[0] != "gpt":
        return u  # a task head or adapters: new, never held or decayed
    part = keys[1]
    if part in ("wte", "wpe"):
        factor = f[0]
    elif part == "blocks":  # stacked: one row per block
        factor = f[1:n_layer + 1].reshape(-1, *[1] * (u.ndim - 1))
    elif part == "ln_f":
        factor = f[n_layer + 1]
    else:
        raise ValueError(f"no depth known for GPT parameter {'/'.join(map(str, keys))}")
    return u * factor.astype(u.dtype)
