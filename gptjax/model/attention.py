"""Causal self-attention over a whole sequence (training and full forward passes).

Three formulations, chosen by `ModelConfig.attention_impl`:

- "native": gptjax's fused CPU kernel (gptjax/cpu/native/causal_attention.cc), float32, forward
  and backward. The (batch, head) pairs are tasks shared out between the calling thread
  and XLA's pool; the forward keeps two numbers a row (the largest score, 1 / the sum of exponentials) and the
  backward recomputes the probabilities from them.
- "blocked": queries in blocks of `QUERY_BLOCK`; block i attends only to keys 0 .. end of
  block i, so the key tiles wholly above the causal diagonal are never multiplied,
  exponentiated or differentiated (at T = 256 in blocks of 64, 10 of the 16 score tiles
  are computed). Plain einsums that jax differentiates; exact up to float summation order.
- "xla" / "cudnn": `jax.nn.dot_product_attention` with that implementation.

"auto" (the default) is "native" on CPU where the kernel can run (`native_unusable`),
else "blocked" on CPU; "cudnn" on one NVIDIA GPU (compute capability 8.0 or newer) for
bfloat16/float16 inputs it takes (`cudnn_unchosen`; XLA's if cuDNN refuses while tracing),
else "xla". On the 2-core CPU the kernel made the baby config's training step 1.14x and
the 10M config's 1.10x faster than "blocked", which had made the 10M step 1.16x faster
than "xla" (benchmarks/NOTES.md, train step entries 3 and 10). On an H100, cuDNN's made
GPT-2 124M's bfloat16 step 2.19x faster than XLA's (GPU entry 1).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.extend.backend
import jax.numpy as jnp

from gptjax.cpu import native
from gptjax.errors import GptjaxError

QUERY_BLOCK = 64
# Longest sequence the native kernel takes: each pool thread keeps two (time x time)
# float32 score matrices for the process's life (32 MiB at 2048).
NATIVE_MAX_TIME = 2048


def native_unusable(x: jax.Array) -> str | None:
    """Why the native kernel cannot compute attention over `x` (q, or q, k, v packed; time
    on axis 1), or None when it can."""
    if jax.default_backend() != "cpu":
        return "it runs on CPU only"
    if x.dtype != jnp.float32:
        return f"it takes float32 inputs, not {x.dtype}"
    if x.shape[1] > NATIVE_MAX_TIME:
        return (f"it takes sequences of up to {NATIVE_MAX_TIME} positions, not {x.shape[1]} "
                f"(its per-thread scratch grows with the square)")
    if jax.device_count() > 1:
        # The partitioner would gather a sharded batch onto every device to call it. This
        # also turns it off for a one-device mesh in a process that sees several devices.
        return "it is used only in a process that sees one device"
    if not native.available():
        return "it is not built on this machine (gptjax.cpu.native.available())"
    return None


def cudnn_unusable(x: jax.Array) -> str | None:
    """Why cuDNN's attention cannot run `x` here (q, or q, k, v packed; head_dim last), or
    None when it can. If cuDNN still refuses while tracing, "auto" warns and takes XLA's."""
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        return f"it takes bfloat16 or float16 inputs, not {x.dtype}"
    if x.shape[-1] % 8 or x.shape[-1] > 128:
        return f"it takes head dims that are multiples of 8 up to 128, not {x.shape[-1]}"
    if jax.default_backend() != "gpu" or "cuda" not in jax.extend.backend.get_backend().platform_version:
        return "it needs an NVIDIA GPU"
    capability = jax.devices()[0].compute_capability
    if tuple(int(p) for p in capability.split(".")) < (8, 0):
        # Older cards pass jax's checks while tracing, then fail to compile.
        return f"its flash attention needs compute capability 8.0 or newer, not {capability}"
    return None


def cudnn_unchosen(x: jax.Array) -> str | None:
    """Why "auto" does not take cuDNN's attention for `x`: cudnn_unusable's reasons, or
    several GPUs, where it is unmeasured."""
    why_not = cudnn_unusable(x)
    if why_not is None and jax.device_count() > 1:
        return "auto takes it only in a process that sees one GPU (not yet measured on several)"
    return why_not


def resolve_impl(impl: str, backend: str, native_ok: bool = False, cudnn_ok: bool = False) -> str:
    """The implementation `impl` means on `backend` ("auto" resolved; others as given);
    `native_ok` / `cudnn_ok`: whether the native kernel / cuDNN's can run this attention."""
    if impl == "auto":
        if backend == "cpu":
            return "native" if native_ok else "blocked"
        return "cudnn" if backend == "gpu" and cudnn_ok else "xla"
    return impl


def choose_impl(qkv_btkhd, impl: str = "auto") -> str:
    """The formulation `causal_attention_packed` takes for q, k, v packed like `qkv_btkhd`
    (an array or a jax.ShapeDtypeStruct) on this process's backend: "auto" resolved, and
    "native" or "cudnn" refused with the reason where it cannot run. (If cuDNN's attention then
    refuses while tracing, "auto" warns and takes XLA's.)"""
    why_not = native_unusable(qkv_btkhd) if impl in ("auto", "native") else None
    if impl == "native" and why_not:
        raise GptjaxError(f"attention_impl=native cannot run here: {why_not}")
    if impl == "cudnn" and (no_cudnn := cudnn_unusable(qkv_btkhd)):
        raise GptjaxError(f"attention_impl=cudnn cannot run here: {no_cudnn}")
    return resolve_impl(impl, jax.default_backend(), native_ok=why_not is None,
                        cudnn_ok=impl == "auto" and cudnn_unchosen(qkv_btkhd) is None)


def causal_attention(q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array,
                     impl: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(head_dim) + causal mask) v, all (batch, time, heads, head_dim).
    The model calls `causal_attention_packed` on its qkv projection directly; this packs q,
    k and v for it (XLA folds the packing away where they are taken apart again)."""
    return causal_attention_packed(jnp.stack([q_bthd, k_bthd, v_bthd], axis=2), impl)


def causal_attention_packed(qkv_btkhd: jax.Array, impl: str = "auto") -> jax.Array:
    """`causal_attention` of q, k, v packed as the qkv projection makes them, (batch, time,
    3, heads, head_dim). The native kernel reads them in place and returns their gradient
    packed; the other formulations take the three apart."""
    chosen = choose_impl(qkv_btkhd, impl)
    if chosen == "native":
        return _native(qkv_btkhd)
    q_bthd, k_bthd, v_bthd = (qkv_btkhd[:, :, i] for i in range(3))
    if chosen == "blocked":
        return _blocked(q_bthd, k_bthd, v_bthd)
    if chosen == "cudnn" and impl == "auto":
        try:  # cuDNN checks its version and the shapes while tracing
            return jax.nn.dot_product_attention(q_bthd, k_bthd, v_bthd, is_causal=True,
                                                implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError) as e:
            warnings.warn(f"attention_impl=auto: cuDNN's attention refused ({e}); using XLA's")
            chosen = "xla"
    return jax.nn.dot_product_attention(q_bthd, k_bthd, v_bthd, is_causal=True,
                                        implementation=chosen)


@jax.custom_vjp
def _native(qkv_btkhd):
    return native.attention_forward(qkv_btkhd)[0]


def _native_forward(qkv_btkhd):
    out, stats = native.attention_forward(qkv_btkhd)
    return out, (qkv_btkhd, stats)


def _native_backward(saved, d_out):
    return (native.attention_backward(*saved, d_out),)


_native.defvjp(_native_forward, _native_backward)


def _scores(q, k):
    """float32 (or float64) q k^T. For half-precision inputs the dot algorithm is pinned (as jax's own
    attention does, jax issue #24047) so the backward products stay half x half -> f32
    instead of mixing a float32 cotangent with half-precision operands."""
    presets = {jnp.bfloat16: jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.float16: jax.lax.DotAlgorithmPreset.F16_F16_F32}
    precision = presets.get(jnp.dtype(q.dtype).type)
    wide = jnp.promote_types(q.dtype, jnp.float32)  # float64 inputs stay float64
    try:
        return jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision, preferred_element_type=wide)
    except Exception:  # a backend without that algorithm: its default precision
        return jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=wide)


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


def attention_probs(qkv_tkhd: jax.Array) -> jax.Array:
    """The causal attention weights of one sequence, (heads, query, key) in float32, from q,
    k, v packed as (time, 3, heads, head_dim): the explicit softmax every formulation above
    computes (or, natively, recomputes in its backward). Outside the gradient: it is for
    looking at, not training through."""
    qkv = jax.lax.stop_gradient(qkv_tkhd).astype(jnp.float32)
    q_htd, k_htd = jnp.swapaxes(qkv[:, 0], 0, 1), jnp.swapaxes(qkv[:, 1], 0, 1)
    t = q_htd.shape[1]
    scores = jnp.einsum("hqd,hkd->hqk", q_htd, k_htd) / math.sqrt(q_htd.shape[-1])
    visible = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    return jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
