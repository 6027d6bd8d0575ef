"""LoRA: low-rank adapters on the blocks' projections, kept apart from the base weights.

Adapters are their own tree (the model's "lora" collection: `blocks/attn/qkv_lora/{a,b}`,
stacked over layers like the blocks), so training differentiates only them and the base
weights are never written. `merge` folds them into a copy of the base kernels for
generation and export; the merged model computes x @ (W + s·a·b) instead of
x @ W + s·(x @ a) @ b, equal up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError
from gptjax.model.gpt import GPT, LORA_SUFFIX, PROJECTIONS

# Target names accepted on the command line: single projections and their groups.
TARGET_GROUPS = {"attn": ("qkv", "out"), "mlp": ("fc", "proj"), "all": PROJECTIONS}


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("qkv", "out")

    def check(self) -> "LoRAConfig":
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise GptjaxError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise GptjaxError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not self.targets:
            raise GptjaxError("LoRA needs at least one target layer")
        return self


def parse_targets(text: str) -> tuple[str, ...]:
    """'attn,mlp' or 'qkv,fc' -> projection names; a name matching no layer is an error."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in TARGET_GROUPS:
            names += TARGET_GROUPS[part]
        elif part in PROJECTIONS:
            names.append(part)
        else:
            raise GptjaxError(f"LoRA target {part!r} matches no layer; choose from "
                              f"{', '.join([*TARGET_GROUPS, *PROJECTIONS])}")
    if not names:
        raise GptjaxError("LoRA needs at least one target layer (e.g. --lora-targets attn)")
    return tuple(dict.fromkeys(names))


@partial(jax.jit, static_argnums=(0, 1))
def init_adapters(config: ModelConfig, lora: LoRAConfig, key: jax.Array) -> dict:
    """Fresh adapters (b = 0, so the adapted model equals the base at first)."""
    tokens = jnp.zeros((1, min(config.context_length, 8)), jnp.int32)
    # Only the "lora" collection is returned, so XLA drops the base initialisers.
    return GPT(config, lora=lora).init({"params": key}, tokens)["lora"]


def _adapted(adapters: dict, prefix=()):
    """(path of the adapted kernel's module, {"a", "b"}) for every adapter in the tree."""
    for name, sub in adapters.items():
        if set(sub) == {"a", "b"} and name.endswith(LORA_SUFFIX):
            yield (*prefix, name[: -len(LORA_SUFFIX)]), sub
        else:
            yield from _adapted(sub, (*prefix, name))


def delta(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale · a @ b in the kernel's shape; a is (*layers, *in, r), b is (*layers, r, *out)."""
    n_lead = a.ndim + b.ndim - 2 - kernel.ndim
    lead = a.shape[:n_lead]
    a_lir = a.reshape(*lead, -1, a.shape[-1])
    b_lro = b.reshape(*lead, b.shape[n_lead], -1)
    return (scale * jnp.matmul(a_lir, b_lro)).reshape(kernel.shape)


def merge(params: dict, adapters: dict, lora: LoRAConfig) -> dict:
    """A copy of `params` with every adapter folded into its kernel (params are unchanged)."""
    scale = lora.alpha / lora.rank
    merged = jax.tree.map(lambda x: x, params)  # new containers; leaves shared until replaced
    for path, ab in _adapted(adapters):
        node = merged
        for key in path:
            node[key] = dict(node[key])
            node = node[key]
        kernel = node["kernel"]
        node["kernel"] = (kernel.astype(jnp.float32) + delta(kernel, ab["a"], ab["b"], scale)
                          ).astype(kernel.dtype)
    return merged


def count(tree) -> int:
    """Number of scalars in a parameter tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
