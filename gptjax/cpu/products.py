"""How the model's matrix products are formed, where the plain product is not the fastest.

- `dense_dot`: the training layout's projections (flax `DenseGeneral`'s `dot_general`).
- `out_major_product`: the decode layout's products, output-major kernels (out, in), sent to
  gptjax's native CPU kernel (gptjax.cpu.native) for few rows; for one float32 row, only where
  this machine measured the kernel faster than XLA's dot (`kernel_wins_one_float32_row`).

Each keeps the values of the plain product; only the orientation XLA is asked for changes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig
from gptjax.cpu import machine, measured_choice, native

# Most rows the native kernel takes, by weight dtype: beyond them XLA's products were as
# fast or faster (benchmarks/NOTES.md, decode change 12). XLA has no fast bfloat16 product,
# so bfloat16 weights stay on the kernel longer.
NATIVE_MAX_ROWS = {jnp.dtype(jnp.float32): 8, jnp.dtype(jnp.bfloat16): 32}


def uses_native(w_oi, rows: int, cfg: ModelConfig) -> bool:
    """Whether `out_major_product` sends this product to gptjax's native CPU kernel."""
    dtype = jnp.dtype(w_oi.dtype)
    if (cfg.decode_matmul == "xla" or rows > NATIVE_MAX_ROWS.get(dtype, 0)
            or jax.default_backend() != "cpu" or not native.available()):
        return False
    if cfg.decode_matmul == "native" or rows > 1 or dtype != jnp.float32:
        return True
    return kernel_wins_one_float32_row()


def out_major_product(w_oi, x_ri, cfg: ModelConfig, out_dtype) -> jax.Array:
    """(rows, out) = x (rows, in) times an output-major kernel (out, in): decoding's products.

    On CPU, few rows go to gptjax's native kernel (gptjax.cpu.native) when it is available
    (`uses_native`)."""
    if uses_native(w_oi, x_ri.shape[0], cfg):
        return native.skinny_matmul(x_ri, w_oi).astype(out_dtype)
    return _xla_out_major_product(w_oi, x_ri, out_dtype)


def _xla_out_major_product(w_oi, x_ri, out_dtype) -> jax.Array:
    """XLA's product, formed output-major, (out, rows), and transposed after a barrier (else
    XLA folds the transpose back in): for few rows XLA:CPU reads an (out, in) kernel that
    way at ~20-26 GB/s, against ~14-21 GB/s in training's (in, out) orientation."""
    y_or = jnp.einsum("oi,ri->or", jnp.asarray(w_oi, x_ri.dtype), x_ri,
                      preferred_element_type=out_dtype)
    return jax.lax.optimization_barrier(y_or).T


# GPT-2 124M's products, output-major (out, in): one block's qkv, attention output, fc and
# proj kernels, and the tied head.
GPT2_BLOCK_SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072))
GPT2_HEAD_SHAPE = (50257, 768)


@functools.cache
def kernel_wins_one_float32_row() -> bool:
    """Whether gptjax's native kernel multiplies one float32 row faster than XLA's dot on
    this machine, with this many cores.

    The answer depends on the CPU: the kernel on the Zen 4 EPYCs it was tuned on (16.9
    against 18.8 ms a GPT-2 step), XLA's dot on a Zen 5 EPYC (benchmarks/NOTES.md, decode 12,
    15 and 16). So the first process on a machine to ask times both (about a second), on
    three of GPT-2 124M's blocks and its head chained as in a decode step, and records the
    answer in `kernels-<hash>.choices.json` beside the built kernels in gptjax's cache;
    delete that file to measure again. A near tie (within 3%) keeps the kernel. Needs
    `native.available()`."""
    record = native.library_path().with_suffix(".choices.json")
    # XLA:CPU's pool has a thread per usable core, and the gap moved with it (kernel/XLA
    # 1.4 on one core of the Zen 5 machine, 1.2 on two), so the record is per core count.
    key = f"one float32 row through a decode step's chain, {machine.usable_cores()} threads"
    return measured_choice.fastest(record, key, _one_row_candidates, prefer="native") == "native"


def _one_row_candidates() -> measured_choice.Candidates:
    """A decode step's products for one row, each fed by the last (the activations are
    kept bounded by tanh): three GPT-2 blocks and the head, 240 MB of float32, beyond a
    large CPU's per-complex L3 of 32-96 MiB, as a decode step's weights are (the head is
    30% of GPT-2 124M's step)."""
    blocks = [[jnp.full(shape, 0.01, jnp.float32) for shape in GPT2_BLOCK_SHAPES]
              for _ in range(3)]
    head = jnp.full(GPT2_HEAD_SHAPE, 0.01, jnp.float32)
    x = jnp.ones((1, GPT2_HEAD_SHAPE[1]), jnp.float32)

    def step(product):
        def chain(blocks, head, x):
            for qkv, out, fc, proj in blocks:
                x = jnp.tanh(x + product(out, product(qkv, x)[:, :x.shape[1]]))
                x = jnp.tanh(x + product(proj, jnp.tanh(product(fc, x))))
            return product(head, x)[:, :1]
        run = jax.jit(chain)
        return lambda: run(blocks, head, x)
    return {"native": step(lambda w, x: native.skinny_matmul(x, w)),
            "xla": step(lambda w, x: _xla_out_major_product(w, x, jnp.float32))}


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
