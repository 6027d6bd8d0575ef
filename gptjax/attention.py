"""Causal self-attention over a whole sequence (training and full forward passes).

Two formulations, chosen by `ModelConfig.attention_impl`:

- "blocked": queries in blocks of `QUERY_BLOCK`; block i attends only to keys 0 .. end of
  block i, so the key tiles wholly above the causal diagonal are never multiplied,
  exponentiated or differentiated (at T = 256 in blocks of 64, 10 of the 16 score tiles
  are computed). Plain einsums that jax differentiates; exact up to float summation order.
- "xla" / "cudnn": `jax.nn.dot_product_attention` with that implementation.

"auto" (the default) is "blocked" on CPU, where it made the 10M config's training step
1.16x faster (benchmarks/NOTES.md), and "xla" elsewhere: jax 0.10's own default, since
the blocked form is unmeasured on accelerators. cuDNN is opt-in ("cudnn"): it needs a GPU
and half-precision inputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

QUERY_BLOCK = 64


def resolve_impl(impl: str, backend: str) -> str:
    """The implementation `impl` means on `backend` ("auto" resolved; others as given)."""
    if impl == "auto":
        return "blocked" if backend == "cpu" else "xla"
    return impl


def causal_attention(q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array,
                     impl: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(head_dim) + causal mask) v, all (batch, time, heads, head_dim)."""
    impl = resolve_impl(impl, jax.default_backend())
    if impl != "blocked":
        return jax.nn.dot_product_attention(q_bthd, k_bthd, v_bthd, is_causal=True,
                                            implementation=impl)
    return _blocked(q_bthd, k_bthd, v_bthd)


def _scores(q, k):
    """float32 q k^T. For half-precision inputs the dot algorithm is pinned (as jax's own
    attention does, jax issue #24047) so the backward products stay half x half -> f32
    instead of mixing a float32 cotangent with half-precision operands."""
    presets = {jnp.bfloat16: jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.float16: jax.lax.DotAlgorithmPreset.F16_F16_F32}
    precision = presets.get(jnp.dtype(q.dtype).type)
    try:
        return jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision,
                          preferred_element_type=jnp.float32)
    except Exception:  # a backend without that algorithm: its default precision
        return jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)


def _blocked(q_bthd, k_bthd, v_bthd, block: int = QUERY_BLOCK):
    t, head_dim = q_bthd.shape[1], q_bthd.shape[-1]
    if t == 0:
        return jnp.zeros_like(q_bthd)
    # Heads-major, so every product below is a plain batched matmul over (batch, head).
    q_bhtd, k_bhtd, v_bhtd = (jnp.swapaxes(x, 1, 2) for x in (q_bthd, k_bthd, v_bthd))
    scale = 1 / math.sqrt(head_dim)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        scores = _scores(q_bhtd[:, :, start:end], k_bhtd[:, :, :end]) * scale  # in float32
        visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        scores = jnp.where(visible, scores, -jnp.inf)  # every row sees its own key: no NaN
        probs = jax.nn.softmax(scores, axis=-1).astype(v_bhtd.dtype)
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", probs, v_bhtd[:, :, :end]))
    return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)
