"""How the model's matrix products are formed, where the plain product is not the fastest.

- `dense_dot`: the training layout's projections (flax `DenseGeneral`'s `dot_general`).
- `out_major_product`: the decode layout's products, output-major kernels (out, in), sent to
  gptjax's native CPU kernel (gptjax.native) for few rows.

Each keeps the values of the plain product; only the orientation XLA is asked for changes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gptjax import native
from gptjax.config import ModelConfig


# Most rows the native kernel takes, by weight dtype: beyond them XLA's products were as
# fast or faster (benchmarks/NOTES.md, decode change 12). XLA has no fast bfloat16 product,
# so bfloat16 weights stay on the kernel longer.
NATIVE_MAX_ROWS = {jnp.dtype(jnp.float32): 8, jnp.dtype(jnp.bfloat16): 32}


def uses_native(w_oi, rows: int, cfg: ModelConfig) -> bool:
    """Whether `out_major_product` sends this product to gptjax's native CPU kernel."""
    return (cfg.decode_matmul == "auto" and rows <= NATIVE_MAX_ROWS.get(jnp.dtype(w_oi.dtype), 0)
            and jax.default_backend() == "cpu" and native.available())


def out_major_product(w_oi, x_ri, cfg: ModelConfig, out_dtype) -> jax.Array:
    """(rows, out) = x (rows, in) times an output-major kernel (out, in): decoding's products.

    On CPU, few rows go to gptjax's native kernel (gptjax.native) when it is available.
    XLA's product is formed output-major, (out, rows), and transposed after a barrier (else
    XLA folds the transpose back in): for few rows XLA:CPU reads an (out, in) kernel that
    way at ~20-26 GB/s, against ~14-21 GB/s in training's (in, out) orientation.
    """
    if uses_native(w_oi, x_ri.shape[0], cfg):
        return native.skinny_matmul(x_ri, w_oi).astype(out_dtype)
    y_or = jnp.einsum("oi,ri->or", jnp.asarray(w_oi, x_ri.dtype), x_ri,
                      preferred_element_type=out_dtype)
    return jax.lax.optimization_barrier(y_or).T


def dense_dot(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for the projections' kernels (contracted axes leading), except on CPU
    when the kernel narrows (input size > output size: the MLP's "proj").

    There the product reads a transposed copy of the kernel behind an optimization barrier,
    so autodiff forms the weight gradient output-major, (out, in), and transposes it once.
    XLA:CPU's library ran that gradient formed (in, out) at about half its matmul rate (one
    core, baby config: 52 GFLOP/s, against 99-102 for the "fc" gradient of the same size
    formed (out, in)); without the barrier XLA folds the transpose back into the product.
    benchmarks/NOTES.md, train step entry 9, has the measurements. Paths that need no kernel
    gradient (evaluation, LoRA over a frozen base) still pay one kernel transpose per layer
    in each call: unmeasured, and small next to the layer's products.
    """
    (x_contract, k_contract), batch = dimension_numbers
    n_in = len(k_contract)
    narrows = math.prod(kernel.shape[:n_in]) > math.prod(kernel.shape[n_in:])
    if (jax.default_backend() != "cpu" or not narrows or batch != ((), ())
            or tuple(k_contract) != tuple(range(n_in))):
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    perm = (*range(n_in, kernel.ndim), *range(n_in))
    kernel_oi = jax.lax.optimization_barrier(kernel.transpose(perm))
    out_axes = kernel.ndim - n_in
    return jax.lax.dot_general(x, kernel_oi, ((x_contract, tuple(range(out_axes, kernel.ndim))),
                                              ((), ())),
                               precision=precision, preferred_element_type=preferred_element_type)
