"""The KV cache of incremental decoding, and attention against it.

Pure functions of arrays; the model (gptjax.model.gpt) calls `cached_attention` from its
attention module when it is given a cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig


class KVCache(NamedTuple):
    """Keys and values of every layer for `length` columns, shared by a batch of rows.

    One array per layer (not one stacked array), so a decode step reads each layer's cache
    where it lies and writes only the new column, in place. Keys and values are stored
    (batch * head, length, head_dim), the layout both attention contractions read as is
    (measured: (batch, length, head, head_dim) made XLA transpose every layer's cache on
    every step, and two batch axes made it copy). Rows are left-padded, so every row
    writes its next token at the same column `index`; `valid` is False on padding.

    A serving cache (gptjax.serve) holds unrelated requests in its rows instead, each
    started at column 0: there `index` is per row, (batch,), each row's next column.
    """

    k: tuple  # per layer: (batch * head, length, head_dim)
    v: tuple  # per layer: (batch * head, length, head_dim)
    index: jax.Array  # int32: the column the next token is written to, shared () or per row (batch,)
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


def cached_attention(q_bthd, k_bthd, v_bthd, cache: KVCache, layer: int):
    """Write this layer's new keys/values at cache.index, then attend over the whole cache."""
    b, t, h, hd = q_bthd.shape

    def rows(x_bthd):  # (batch * head, time, head_dim): one batch axis, as XLA's dot wants
        return x_bthd.transpose(0, 2, 1, 3).reshape(b * h, t, hd)

    per_row = cache.index.ndim == 1
    k_rsd, v_rsd = (_write(c[layer], rows(x).astype(c[layer].dtype), cache.index, h)
                    for c, x in ((cache.k, k_bthd), (cache.v, v_bthd)))
    s = k_rsd.shape[1]
    index_b1 = cache.index[:, None] if per_row else jnp.broadcast_to(cache.index, (b, 1))
    query_col_bt = index_b1 + jnp.arange(t)[None, :]
    key_col_s = jnp.arange(s)
    causal_bts = key_col_s[None, None, :] <= query_col_bt[:, :, None]
    # A padding query may see itself only, so no softmax row is empty (its output is unused).
    visible_bts = (cache.valid[:, None, :] | (key_col_s == query_col_bt[:, :, None])) & causal_bts
    scores_rts = jnp.einsum("rtd,rsd->rts", rows(q_bthd), k_rsd.astype(q_bthd.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores_bhts = jnp.where(visible_bts[:, None], scores_rts.reshape(b, h, t, s), -jnp.inf)
    probs_rts = jax.nn.softmax(scores_bhts, axis=-1).astype(q_bthd.dtype).reshape(b * h, t, s)
    y_rtd = jnp.einsum("rts,rsd->rtd", probs_rts, v_rsd.astype(q_bthd.dtype))
    y_bthd = y_rtd.reshape(b, h, t, hd).transpose(0, 2, 1, 3)
    k = cache.k[:layer] + (k_rsd,) + cache.k[layer + 1:]
    v = cache.v[:layer] + (v_rsd,) + cache.v[layer + 1:]
    return y_bthd, cache._replace(k=k, v=v)


def _write(cache_rsd, new_rtd, index, heads: int):
    """The cache with `new_rtd` written from column `index`: one column for all rows (a
    shared index, a slice update in place), or each row's own (a per-row index)."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache_rsd, new_rtd, (0, index, 0))
    index_r = jnp.repeat(index, heads)  # rows are (batch, head) flattened, batch-major
    return jax.vmap(lambda c_sd, x_td, i: jax.lax.dynamic_update_slice(c_sd, x_td, (i, 0)))(
        cache_rsd, new_rtd, index_r)
