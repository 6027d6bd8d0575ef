"""Causal self-attention over a whole sequence (training and full forward passes).

Two formulations, chosen by `ModelConfig.attention_impl`:

- "blocked": queries in blocks of `QUERY_BLOCK`; block i attends only to keys
  0 .. end of block i, so the key blocks wholly above the causal diagonal are never
  multiplied, exponentiated or differentiated (at T = 256 in blocks of 64, 10 of 16 score
  tiles). Plain einsums that jax differentiates; exact up to float summation order.
- "xla" / "cudnn": `jax.nn.dot_product_attention` with that implementation.

"auto" (the default) is "blocked" on CPU, where it measured 12-15% faster for the whole
training step (benchmarks/NOTES.md), and jax.nn.dot_product_attention's own choice
elsewhere (its cuDNN kernel where that applies).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

QUERY_BLOCK = 64


def causal_attention(q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array,
                     impl: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(head_dim) + causal mask) v, all (batch, time, heads, head_dim)."""
    if impl == "auto":
        impl = "blocked" if jax.default_backend() == "cpu" else None
    if impl != "blocked":
        return jax.nn.dot_product_attention(q_bthd, k_bthd, v_bthd, is_causal=True,
                                            implementation=impl)
    return _blocked(q_bthd, k_bthd, v_bthd)


def _blocked(q_bthd, k_bthd, v_bthd, block: int = QUERY_BLOCK):
    t, head_dim = q_bthd.shape[1], q_bthd.shape[-1]
    # Heads-major, so every product below is a plain batched matmul over (batch, head).
    q_bhtd, k_bhtd, v_bhtd = (jnp.swapaxes(x, 1, 2) for x in (q_bthd, k_bthd, v_bthd))
    q_bhtd = q_bhtd * jnp.asarray(1 / math.sqrt(head_dim), q_bhtd.dtype)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q_bhtd[:, :, start:end], k_bhtd[:, :, :end],
                            preferred_element_type=jnp.float32)
        visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        scores = jnp.where(visible, scores, -jnp.inf)  # every row sees its own key: no NaN
        probs = jax.nn.softmax(scores, axis=-1).astype(v_bhtd.dtype)
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", probs, v_bhtd[:, :, :end]))
    return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)
