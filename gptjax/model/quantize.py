"""Weight-only quantization for decoding: int8 with one scale per output channel, and int4
with one scale per group of `quant_group` inputs, both symmetric (zero stays zero).

The decode layout's kernels are output-major (out, in), so a row of a kernel is one
output channel: int8 keeps q = round(w / s) with s = max|row| / 127; int4 packs two
values in [-7, 7] per byte, low nibble first, with s = max|group| / 7. The tied token
embedding is quantized the same way by vocabulary row, which serves both its lookups and
the output head. Position embeddings, LayerNorms and biases stay float.

`quantize_decode_params` gives what the quantized decode layout (ModelConfig.quantize)
reads. `fake_quantize` rounds the training layout's weights through the same grid and
back, for evaluating the loss a quantized model would have (`gptjax eval --quantize`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig, check_quantize

KERNEL_INPUT_AXES = {("attn", "qkv"): 1, ("attn", "out"): 2, ("mlp", "fc"): 1, ("mlp", "proj"): 1}
LEVELS = {"int8": 127, "int4": 7}


def quantize_rows(w_oi, mode: str, group: int = 64):
    """(q, scale) of a float (out, in) matrix: int8 q (out, in) and scale (out,), or int4
    q packed (out, in / 2) uint8 and scale (out, in / group)."""
    w = jnp.asarray(w_oi, jnp.float32)
    levels = LEVELS[mode]
    if mode == "int8":
        scale = jnp.max(jnp.abs(w), axis=1) / levels
        q = jnp.round(w / jnp.where(scale > 0, scale, 1)[:, None])
        return q.astype(jnp.int8), scale
    o, i = w.shape
    grouped = w.reshape(o, i // group, group)
    scale = jnp.max(jnp.abs(grouped), axis=2) / levels
    q = jnp.round(grouped / jnp.where(scale > 0, scale, 1)[..., None]).astype(jnp.int8).reshape(o, i)
    nibbles = (q & 0xF).astype(jnp.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale


def unpack_int4(packed):
    """int8 values (..., 2 * n) from packed nibbles (..., n)."""
    low, high = (packed & 0xF).astype(jnp.int8), (packed >> 4).astype(jnp.int8)
    both = jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)
    return (both ^ 8) - 8  # sign-extend the 4-bit two's complement


def dequantize_rows(q, scale, mode: str, group: int = 64, dtype=jnp.float32):
    """The float (out, in) matrix a (q, scale) pair stands for."""
    if mode == "int8":
        return (q.astype(jnp.float32) * scale[:, None]).astype(dtype)
    values = unpack_int4(q).astype(jnp.float32)
    o, i = values.shape
    return (values.reshape(o, i // group, group) * scale[..., None]).reshape(o, i).astype(dtype)


def quantized_config(config: ModelConfig, mode: str, group: int | None = None) -> ModelConfig:
    cfg = dataclasses.replace(config, quantize=mode,
                              quant_group=config.quant_group if group is None else group)
    check_quantize(cfg)
    return cfg


def quantize_decode_params(params: dict, config: ModelConfig) -> dict:
    """Decode-layout parameters (model.decode_params) with every block kernel and the token
    embedding quantized as `config.quantize` says: the tree the quantized decode layout reads."""
    mode, group = config.quantize, config.quant_group
    out = dict(params)
    for name, layer in params.items():
        if not name.startswith("blocks_"):
            continue
        layer = {k: dict(v) for k, v in layer.items()}
        for (module, proj), _ in KERNEL_INPUT_AXES.items():
            kernel = layer[module][proj]["kernel"]
            out_size = _out_size(module, proj, config)
            q, scale = quantize_rows(kernel.reshape(out_size, -1), mode, group)
            layer[module][proj] = {**layer[module][proj], "kernel": q, "scale": scale}
        out[name] = layer
    q, scale = quantize_rows(params["wte"]["embedding"], mode, group)
    out["wte"] = {"embedding": q, "scale": scale}
    return out


def fake_quantize(params: dict, config: ModelConfig) -> dict:
    """Training-layout parameters whose block kernels and token embedding went through the
    quantization grid and back (float again): the weights a quantized decode computes with."""
    mode, group = config.quantize, config.quant_group

    def through(w_oi):
        return dequantize_rows(*quantize_rows(w_oi, mode, group), mode, group, w_oi.dtype)

    blocks = {k: dict(v) for k, v in params["blocks"].items()}
    for (module, proj), n_in in KERNEL_INPUT_AXES.items():
        kernel = blocks[module][proj]["kernel"]  # (layers, in..., out...)
        layers, in_shape = kernel.shape[0], kernel.shape[1:1 + n_in]
        out_shape = kernel.shape[1 + n_in:]
        # (layers, in..., out...) -> (layers, out, in) rows, and back
        axes = (0, *range(1 + n_in, kernel.ndim), *range(1, 1 + n_in))
        rows = jnp.transpose(kernel, axes).reshape(layers, -1, math.prod(in_shape))
        done = jax.vmap(through)(rows).reshape(layers, *out_shape, *in_shape)
        back = (0, *range(1 + len(out_shape), done.ndim), *range(1, 1 + len(out_shape)))
        blocks[module][proj] = {**blocks[module][proj], "kernel": jnp.transpose(done, back)}
    wte = {**params["wte"], "embedding": through(params["wte"]["embedding"])}
    return {**params, "blocks": blocks, "wte": wte}


def _out_size(module: str, proj: str, c: ModelConfig) -> int:
    return {("attn", "qkv"): 3 * c.d_model, ("attn", "out"): c.d_model,
            ("mlp", "fc"): c.d_mlp, ("mlp", "proj"): c.d_model}[(module, proj)]


def quantized_product(q, scale, x_ri, cfg: ModelConfig, out_dtype):
    """(rows, out) = x (rows, in) times the quantized output-major kernel (q, scale).

    int8 on CPU goes to gptjax's native kernel, which widens the bytes in registers (XLA
    converts the whole matrix to float first, ~5x slower than its float32 product here);
    int4, and int8 elsewhere, are dequantized and multiplied by XLA."""
    from gptjax.cpu import native
    from gptjax.cpu.products import NATIVE_MAX_ROWS, out_major_product

    if (cfg.quantize == "int8" and cfg.decode_matmul != "xla" and jax.default_backend() == "cpu"
            and x_ri.shape[0] <= NATIVE_MAX_ROWS[jnp.dtype(jnp.bfloat16)] and native.available()):
        return native.skinny_matmul_int8(x_ri, q, scale).astype(out_dtype)
    w_oi = dequantize_rows(q, scale, cfg.quantize, cfg.quant_group, x_ri.dtype)
    return out_major_product(w_oi, x_ri, dataclasses.replace(cfg, decode_matmul="xla"), out_dtype)


def weight_bytes(params: dict) -> int:
    """Bytes of every array in a parameter tree, as stored."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
