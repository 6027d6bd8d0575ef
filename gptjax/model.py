"""The GPT as Flax (Linen) modules, with a pure functional surface.

Blocks are applied with `nn.scan`, so their parameters are stacked along a leading
layer axis (one parameter layout whether the loop is rolled or unrolled, and compile
time that does not grow with depth). Attention projections keep an explicit head axis,
(d, 3, heads, head_dim) and (heads, head_dim, d), so tensor parallelism can shard
heads without reshapes. The output head is tied to the token embedding.

Public functions: `init(config, key)`, `apply(params, tokens, config, ...)`,
`apply_cached(params, tokens, positions, cache, config, ...)` (incremental decoding),
`init_cache(config, batch, length, ...)`, `loss(params, batch, config, ...)`,
`param_count(config)`.

Incremental decoding runs the layers as a Python loop over per-layer parameters (see
`unstack_layers`) and keeps keys and values in a preallocated `KVCache` of per-layer
arrays: each layer writes only the new tokens' columns in place, so a decode step reads
each weight and each cache entry once and copies neither.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gptjax.config import ModelConfig

INIT_STD = 0.02


class KVCache(NamedTuple):
    """Keys and values of every layer for `length` columns, shared by a batch of rows.

    One array per layer (not one stacked array), so a decode step reads each layer's cache
    where it lies and writes only the new column, in place. Layouts are the ones the two
    attention contractions read without transposing: keys (batch, head, length, head_dim),
    values (batch, head, head_dim, length). Rows are left-padded, so every row writes its
    next token at the same column `index`; `valid` is False on padding columns.
    """

    k: tuple  # per layer: (batch * head, length, head_dim)
    v: tuple  # per layer: (batch * head, length, head_dim)
    index: jax.Array  # int32 scalar: the column the next token is written to
    valid: jax.Array  # (batch, length) bool


def init_cache(config: ModelConfig, batch: int, length: int, valid_bs=None, dtype=None) -> KVCache:
    """An empty cache; `valid_bs` (batch, length) marks padding columns False (default: none)."""
    c, dtype = config, dtype or config.dtype
    if valid_bs is None:
        valid_bs = jnp.ones((batch, length), bool)
    shape = (batch * c.n_head, length, c.head_dim)
    k = tuple(jnp.zeros(shape, dtype) for _ in range(c.n_layer))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(c.n_layer))
    return KVCache(k, v, jnp.zeros((), jnp.int32), jnp.asarray(valid_bs, bool))


def _cached_attention(q_bthd, k_bthd, v_bthd, cache: KVCache, layer: int):
    """Write this layer's new keys/values at cache.index, then attend over the whole cache."""
    b, t, h, hd = q_bthd.shape

    def rows(x_bthd):  # (batch * head, time, head_dim): one batch axis, as XLA's dot wants
        return x_bthd.transpose(0, 2, 1, 3).reshape(b * h, t, hd)

    k_rsd = jax.lax.dynamic_update_slice(cache.k[layer], rows(k_bthd).astype(cache.k[layer].dtype),
                                         (0, cache.index, 0))
    v_rsd = jax.lax.dynamic_update_slice(cache.v[layer], rows(v_bthd).astype(cache.v[layer].dtype),
                                         (0, cache.index, 0))
    s = k_rsd.shape[1]
    query_col_t = cache.index + jnp.arange(t)
    key_col_s = jnp.arange(s)
    causal_ts = key_col_s[None, :] <= query_col_t[:, None]
    # A padding query may see itself only, so no softmax row is empty (its output is unused).
    visible_bts = (cache.valid[:, None, :] | (key_col_s == query_col_t[:, None])[None]) & causal_ts
    scores_rts = jnp.einsum("rtd,rsd->rts", rows(q_bthd), k_rsd.astype(q_bthd.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores_bhts = jnp.where(visible_bts[:, None], scores_rts.reshape(b, h, t, s), -jnp.inf)
    probs_rts = jax.nn.softmax(scores_bhts, axis=-1).astype(q_bthd.dtype).reshape(b * h, t, s)
    y_rtd = jnp.einsum("rts,rsd->rtd", probs_rts, v_rsd.astype(q_bthd.dtype))
    y_bthd = y_rtd.reshape(b, h, t, hd).transpose(0, 2, 1, 3)
    k = cache.k[:layer] + (k_rsd,) + cache.k[layer + 1:]
    v = cache.v[:layer] + (v_rsd,) + cache.v[layer + 1:]
    return y_bthd, cache._replace(k=k, v=v)


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, deterministic: bool, cache: KVCache | None = None, layer=None):
        c = self.cfg
        dense = partial(nn.DenseGeneral, use_bias=c.bias, dtype=c.dtype, param_dtype=c.param_dtype)
        qkv_btkhd = dense((3, c.n_head, c.head_dim), kernel_init=nn.initializers.normal(INIT_STD),
                          name="qkv")(x_btd)
        q_bthd, k_bthd, v_bthd = (qkv_btkhd[:, :, i] for i in range(3))
        if cache is None:
            impl = None if c.attention_impl == "auto" else c.attention_impl
            y_bthd = jax.nn.dot_product_attention(q_bthd, k_bthd, v_bthd, is_causal=True,
                                                  implementation=impl)
        else:
            y_bthd, cache = _cached_attention(q_bthd, k_bthd, v_bthd, cache, layer)
        # GPT-2's scaled init for projections that write into the residual stream.
        proj_init = nn.initializers.normal(INIT_STD / math.sqrt(2 * c.n_layer))
        return dense(c.d_model, axis=(-2, -1), kernel_init=proj_init, name="out")(y_bthd), cache


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
    """Pre-LN transformer block. Returns (activations, cache): the carry and output of a
    layer scan (cache None), or of one layer in a decoding loop (cache updated)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, deterministic: bool, cache: KVCache | None = None, layer: int = 0):
        c = self.cfg
        norm = partial(nn.LayerNorm, epsilon=c.layer_norm_eps, use_bias=c.bias, dtype=c.dtype,
                       param_dtype=c.param_dtype)
        drop = nn.Dropout(c.dropout)
        h, cache = CausalSelfAttention(c, name="attn")(norm(name="ln1")(x_btd), deterministic,
                                                       cache, layer)
        x_btd = x_btd + drop(h, deterministic=deterministic)
        h = MLP(c, name="mlp")(norm(name="ln2")(x_btd))
        x_btd = x_btd + drop(h, deterministic=deterministic)
        return x_btd, cache


class GPT(nn.Module):
    cfg: ModelConfig
    # False: one Block per layer, params {"blocks_0": ..., ...} (see `unstack_layers`). Decoding
    # uses this: XLA:CPU copies each layer's weights out of a stacked array inside a scan,
    # which triples the memory traffic of a bandwidth-bound decode step (measured: 47 vs
    # 25 ms per GPT-2 124M step).
    scan_layers: bool = True

    @nn.compact
    def __call__(self, tokens_bt, positions_bt=None, deterministic: bool = True,
                 cache: KVCache | None = None, logits_at=None):
        """Logits (batch, time, vocab); with a cache, (logits at column `logits_at`, cache)."""
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
        if self.scan_layers:
            if cache is not None:
                raise ValueError("decoding with a KV cache needs unstack_layers(params)")
            blocks = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=c.n_layer,
                unroll=min(c.scan_unroll, c.n_layer),
            )
            x_btd, _ = blocks(c, name="blocks")(x_btd, deterministic)
        else:
            for i in range(c.n_layer):
                x_btd, cache = Block(c, name=f"blocks_{i}")(x_btd, deterministic, cache, i)
        if cache is not None:
            # Decoding needs one position's logits; skip the (time x vocab) head for the rest.
            x_btd = jax.lax.dynamic_slice_in_dim(x_btd, logits_at, 1, axis=1)
        x_btd = nn.LayerNorm(epsilon=c.layer_norm_eps, use_bias=c.bias, dtype=c.dtype,
                             param_dtype=c.param_dtype, name="ln_f")(x_btd)
        if cache is None:
            return wte.attend(x_btd).astype(jnp.float32)
        return _decode_head(x_btd[:, 0], wte), cache._replace(index=cache.index + tokens_bt.shape[1])


def _decode_head(x_bd, wte: nn.Embed) -> jax.Array:
    """Logits (batch, vocab) of one position per row.

    For several rows the product is formed vocabulary-major, (vocab, batch), and only then
    transposed: XLA:CPU's skinny matrix product reads the embedding at 14 GB/s that way
    against 8 GB/s batch-major, for 8 rows of GPT-2 (the barrier keeps XLA from folding
    the transpose back into the product). One row is a matrix-vector product either way.
    """
    if x_bd.shape[0] == 1:
        return wte.attend(x_bd).astype(jnp.float32)
    table_vd = jnp.asarray(wte.embedding, x_bd.dtype)
    logits_vb = jnp.einsum("vd,bd->vb", table_vd, x_bd, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(logits_vb).T


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


def unstack_layers(params: dict) -> dict:
    """The same parameters with the layer axis split into "blocks_0", "blocks_1", ...

    Inside jit, before a decode loop, this slices each layer's weights out once per call
    rather than once per step.
    """
    out = {k: v for k, v in params.items() if k != "blocks"}
    n_layer = jax.tree.leaves(params["blocks"])[0].shape[0]
    for i in range(n_layer):
        out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    return out


def apply_cached(params: dict, tokens_bt: jax.Array, positions_bt: jax.Array, cache: KVCache,
                 config: ModelConfig, *, logits_at=-1) -> tuple[jax.Array, KVCache]:
    """Run `tokens_bt` (written at columns cache.index...) against the cache.

    Returns the float32 logits (batch, vocab) at column `logits_at` of `tokens_bt` (default:
    the last) and the cache advanced by the tokens' length. Prefill and one-token decode
    steps are both this call. `params` may be layer-stacked (sliced here, per call) or
    already `unstack_layers(params)` (what a decode loop passes).
    """
    logits_at = logits_at % tokens_bt.shape[1] if isinstance(logits_at, int) else logits_at
    if "blocks" in params:
        params = unstack_layers(params)
    return GPT(config, scan_layers=False).apply(
        {"params": params}, tokens_bt, positions_bt, cache=cache, logits_at=logits_at)


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


def cast(params: dict, config: ModelConfig, dtype: str) -> tuple[dict, ModelConfig]:
    """Parameters stored and computed in `dtype` (e.g. bfloat16 weights for decoding)."""
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    return params, dataclasses.replace(config, dtype=dtype, param_dtype=dtype)


def param_count(config: ModelConfig, *, exclude_position: bool = False) -> int:
    """Exact number of parameters (computed from shapes; nothing is allocated)."""
    shapes = jax.eval_shape(lambda: init(config, jax.random.PRNGKey(0)))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    if exclude_position:
        total -= config.context_length * config.d_model
    return total
