"""Partition specs for parameters, optimizer state and batches, and the sharded train step.

Rules follow the parameter names, so Adam's moments (which mirror the parameter tree
inside optax's state) get the same layout as their parameters:

- FSDP shards every kernel and embedding along its model-width (d_model) axis;
- tensor parallelism splits attention heads and the MLP hidden width, Megatron-style:
  qkv and fc are split on their output side, out and proj on their input side, so each
  block needs one all-reduce after attention and one after the MLP;
- the layer axis of the stacked blocks, LayerNorms and biases on d_model are replicated;
- batches are split by rows over ("data", "fsdp").

jit with these shardings gives GSPMD (pjit semantics) the whole layout; XLA inserts the
collectives. On a mesh of one device every spec is trivially satisfied.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError
from gptjax.parallel.mesh import BATCH_AXES, batch_shards

F, T = "fsdp", "tensor"
# (module, parameter) -> spec of one layer's array (the stacked layer axis is prepended).
BLOCK_RULES = {
    ("qkv", "kernel"): (F, None, T, None),  # (d, 3, heads, head_dim)
    ("qkv", "bias"): (None, T, None),  # (3, heads, head_dim)
    ("out", "kernel"): (T, None, F),  # (heads, head_dim, d)
    ("fc", "kernel"): (F, T),  # (d, d_mlp)
    ("fc", "bias"): (T,),
    ("proj", "kernel"): (T, F),  # (d_mlp, d)
}
TOP_RULES = {("wte", "embedding"): (None, F), ("wpe", "embedding"): (None, F)}


def check_divisible(cfg: ModelConfig, mesh: Mesh) -> None:
    """Tensor parallelism needs whole heads and whole MLP slices per device."""
    t = mesh.shape[T]
    problems = [f"{name} {value}" for name, value in
                (("n_head", cfg.n_head), ("MLP width", cfg.d_mlp)) if value % t]
    if problems:
        raise GptjaxError(f"tensor={t} does not divide {' and '.join(problems)}")


def spec_for(path, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of a parameter-shaped leaf (or P() for anything else)."""
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    if len(keys) < 2:
        return P()
    rule = TOP_RULES.get(keys[-2:])
    if "blocks" in keys:
        layer_rule = BLOCK_RULES.get(keys[-2:])
        rule = None if layer_rule is None else (None, *layer_rule)
    if rule is None or len(rule) != len(shape):
        return P()
    # FSDP falls back to replication on an axis it does not divide (small models on many
    # devices); tensor divisibility is checked up front, since it changes the math layout.
    axes = [a if a is None or a == T or shape[i] % mesh.shape[a] == 0 else None
            for i, a in enumerate(rule)]
    return P(*axes)


def shardings(tree, mesh: Mesh):
    """NamedShardings for a parameter or train-state pytree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path, x.shape, mesh)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(batch_rows: int, mesh: Mesh, grad_accum: int = 1) -> None:
    """Every micro-batch must split evenly over the data-sharding axes."""
    shards = batch_shards(mesh)
    if batch_rows % (shards * grad_accum):
        raise GptjaxError(f"batch_size {batch_rows} is not divisible by data x fsdp = {shards}"
                          + (f" times grad_accum {grad_accum}" if grad_accum > 1 else "")
                          + " (--batch-size, --mesh)")


def make_sharded_train_step(step_fn, abstract_state, mesh: Mesh):
    """jit(step_fn) with the state laid out by the rules, donated, and batches by rows."""
    state_sh = shardings(abstract_state, mesh)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sharding(mesh)),
                     out_shardings=(state_sh, replicated), donate_argnums=0)

    def step(state, batch):
        with jax.set_mesh(mesh):  # traced under the mesh: activations stay row-split
            return jitted(state, batch)
    return step, state_sh
