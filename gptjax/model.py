"""The GPT as Flax (Linen) modules, with a pure functional surface.

Blocks are applied with `nn.scan`, so their parameters are stacked along a leading
layer axis (one parameter layout whether the loop is rolled or unrolled, and compile
time that does not grow with depth). Attention projections keep an explicit head axis,
(d, 3, heads, head_dim) and (heads, head_dim, d), so tensor parallelism can shard
heads without reshapes. The output head is tied to the token embedding.

Public functions: `init(config, key)`, `apply(params, tokens, config, ...)`,
`loss(params, batch, config, ...)`, `param_count(config)`.
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gptjax.config import ModelConfig

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, deterministic: bool):
        c = self.cfg
        dense = partial(nn.DenseGeneral, use_bias=c.bias, dtype=c.dtype, param_dtype=c.param_dtype)
        qkv_btkhd = dense((3, c.n_head, c.head_dim), kernel_init=nn.initializers.normal(INIT_STD),
                          name="qkv")(x_btd)
        q_bthd, k_bthd, v_bthd = (qkv_btkhd[:, :, i] for i in range(3))
        impl = None if c.attention_impl == "auto" else c.attention_impl
        y_bthd = jax.nn.dot_product_attention(q_bthd, k_bthd, v_bthd, is_causal=True,
                                              implementation=impl)
        # GPT-2's scaled init for projections that write into the residual stream.
        proj_init = nn.initializers.normal(INIT_STD / math.sqrt(2 * c.n_layer))
        return dense(c.d_model, axis=(-2, -1), kernel_init=proj_init, name="out")(y_bthd)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        c = self.cfg
        dense = partial(nn.Dense, use_bias=c.bias, dtype=c.dtype, param_dtype=c.param_dtype)
        h_btf = dense(c.d_mlp, kernel_init=nn.initializers.normal(INIT_STD), name="fc")(x_btd)
        h_btf = nn.gelu(h_btf, approximate=True)  # GPT-2's tanh approximation
        proj_init = nn.initializers.normal(INIT_STD / math.sqrt(2 * c.n_layer))
        return dense(c.d_model, kernel_init=proj_init, name="proj")(h_btf)


class Block(nn.Module):
    """Pre-LN transformer block; called as a scan body, so it takes and returns a carry."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, deterministic: bool):
        c = self.cfg
        norm = partial(nn.LayerNorm, epsilon=c.layer_norm_eps, use_bias=c.bias, dtype=c.dtype,
                       param_dtype=c.param_dtype)
        drop = nn.Dropout(c.dropout)
        h = CausalSelfAttention(c, name="attn")(norm(name="ln1")(x_btd), deterministic)
        x_btd = x_btd + drop(h, deterministic=deterministic)
        h = MLP(c, name="mlp")(norm(name="ln2")(x_btd))
        x_btd = x_btd + drop(h, deterministic=deterministic)
        return x_btd, None


class GPT(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_bt, positions_bt=None, deterministic: bool = True):
        c = self.cfg
        if c.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (resolve it from the tokenizer)")
        if tokens_bt.shape[1] > c.context_length:  # position lookup would silently give NaN
            raise ValueError(f"{tokens_bt.shape[1]} tokens exceed context_length {c.context_length}")
        embed = partial(nn.Embed, features=c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
                        embedding_init=nn.initializers.normal(INIT_STD))
        wte = embed(c.vocab_size, name="wte")
        if positions_bt is None:
            positions_bt = jnp.arange(tokens_bt.shape[1])[None, :]
        x_btd = wte(tokens_bt) + embed(c.context_length, name="wpe")(positions_bt)
        x_btd = nn.Dropout(c.dropout)(x_btd, deterministic=deterministic)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=c.n_layer,
            unroll=min(c.scan_unroll, c.n_layer),
        )
        x_btd, _ = blocks(c, name="blocks")(x_btd, deterministic)
        x_btd = nn.LayerNorm(epsilon=c.layer_norm_eps, use_bias=c.bias, dtype=c.dtype,
                             param_dtype=c.param_dtype, name="ln_f")(x_btd)
        return wte.attend(x_btd).astype(jnp.float32)


@partial(jax.jit, static_argnums=0)
def init(config: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters (a plain nested dict of arrays), initialised in one compiled call."""
    tokens = jnp.zeros((1, min(config.context_length, 8)), jnp.int32)
    return GPT(config).init({"params": key}, tokens)["params"]


def apply(params: dict, tokens_bt: jax.Array, config: ModelConfig, *, positions_bt=None,
          deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
    """Float32 logits (batch, time, vocab). `rng` is needed only when dropout is active."""
    rngs = {"dropout": rng} if rng is not None else None
    return GPT(config).apply({"params": params}, tokens_bt, positions_bt,
                             deterministic=deterministic, rngs=rngs)


def loss_sum(params, batch: dict, config: ModelConfig, *, deterministic=True, rng=None):
    """(sum of token cross-entropies, number of weighted tokens) for exact averaging."""
    logits_btv = apply(params, batch["inputs"], config, deterministic=deterministic, rng=rng)
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
    weights_bt = batch.get("weights")
    if weights_bt is None:
        return ce_bt.sum(), jnp.asarray(ce_bt.size, jnp.float32)
    return (ce_bt * weights_bt).sum(), weights_bt.sum()


def loss(params, batch: dict, config: ModelConfig, *, deterministic=True, rng=None) -> jax.Array:
    """Mean next-token cross-entropy over the batch (weighted if batch has "weights")."""
    total, count = loss_sum(params, batch, config, deterministic=deterministic, rng=rng)
    return total / jnp.maximum(count, 1.0)


def param_count(config: ModelConfig, *, exclude_position: bool = False) -> int:
    """Exact number of parameters (computed from shapes; nothing is allocated)."""
    shapes = jax.eval_shape(lambda: init(config, jax.random.PRNGKey(0)))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    if exclude_position:
        total -= config.context_length * config.d_model
    return total
