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

Incremental decoding uses a decode layout of the same parameters (`decode_params`: one
Block per layer, output-major kernels) and keeps keys and values in a preallocated
`KVCache` (gptjax.model.kv_cache) of per-layer arrays written in place, so a decode step reads
each weight and each cache entry once and copies neither.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gptjax.config import FULL_UNROLL_MAX_LAYERS, ModelConfig
from gptjax.cpu.products import dense_dot, out_major_product
from gptjax.model.attention import attention_probs, causal_attention_packed
from gptjax.model.kv_cache import KVCache, cached_attention, init_cache
from gptjax.model.quantize import (
    KERNEL_INPUT_AXES,
    dequantize_rows,
    quantize_decode_params,
    quantized_product,
)
from gptjax.parallel.mesh import constrain_rows

__all__ = ["GPT", "KVCache", "LoRA", "apply", "apply_cached", "apply_observed", "cast", "ce_sum",
           "decode_params", "init", "init_cache", "loss", "loss_sum", "param_count"]

INIT_STD = 0.02
LORA_SUFFIX = "_lora"  # adapter of projection "qkv" is module "qkv_lora" in the "lora" collection
PROJECTIONS = ("qkv", "out", "fc", "proj")  # the block's linear layers (attention, MLP)


class OutMajorDense(nn.Module):
    """A projection whose kernel is stored output-major, (out..., in...): the decode layout,
    multiplied by `out_major_product`."""

    cfg: ModelConfig
    out_shape: tuple[int, ...]
    in_ndim: int

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        in_shape = x.shape[x.ndim - self.in_ndim:]
        # Values come from decode_params(); the initialiser only fixes the shape.
        n_out, n_in = math.prod(self.out_shape), math.prod(in_shape)
        x_ri = x.reshape(-1, n_in).astype(c.dtype)
        if c.quantize == "none":
            kernel = self.param("kernel", nn.initializers.zeros, (*self.out_shape, *in_shape),
                                c.param_dtype)
            y = out_major_product(kernel.reshape(n_out, -1), x_ri, c, c.dtype)
        else:  # gptjax.model.quantize's layout: (out, in) rows, flattened
            q, scale = _quantized_param(self, "kernel", n_out, n_in, c)
            y = quantized_product(q, scale, x_ri, c, c.dtype)
        y = y.reshape(*x.shape[:x.ndim - self.in_ndim], *self.out_shape)
        if c.bias:
            y = y + self.param("bias", nn.initializers.zeros, self.out_shape,
                               c.param_dtype).astype(c.dtype)
        return y


def _quantized_param(module: nn.Module, name: str, n_out: int, n_in: int, c: ModelConfig):
    """The (q, scale) pair gptjax.model.quantize stores for an (n_out, n_in) matrix."""
    if c.quantize == "int8":
        q = module.param(name, nn.initializers.zeros, (n_out, n_in), jnp.int8)
        return q, module.param("scale", nn.initializers.zeros, (n_out,), jnp.float32)
    q = module.param(name, nn.initializers.zeros, (n_out, n_in // 2), jnp.uint8)
    return q, module.param("scale", nn.initializers.zeros, (n_out, n_in // c.quant_group),
                           jnp.float32)


class QuantizedEmbed(nn.Module):
    """The tied token embedding of the quantized decode layout: vocabulary rows quantized
    like kernels' output channels, dequantized per looked-up row, and read as the head."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.q, self.scale = _quantized_param(self, "embedding", c.vocab_size, c.d_model, c)

    def __call__(self, ids):
        c = self.cfg
        rows = dequantize_rows(self.q[ids.reshape(-1)], self.scale[ids.reshape(-1)], c.quantize,
                               c.quant_group, c.dtype)
        return rows.reshape(*ids.shape, c.d_model)

    def head(self, x_bd):
        return quantized_product(self.q, self.scale, x_bd.astype(self.cfg.dtype), self.cfg,
                                 jnp.float32)


class LoRA(nn.Module):
    """The low-rank update scale * (x @ a) @ b of one projection (Hu et al., 2021).

    Its variables live in the "lora" collection, beside the projection's "params", so the
    base weights stay one tree that adapters never touch. `a` starts Gaussian and `b` at
    zero: a fresh adapter changes nothing.
    """

    out_shape: tuple[int, ...]
    in_ndim: int
    rank: int
    scale: float
    dtype: str

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.in_ndim:]
        fan_in = math.prod(in_shape)
        a = self.variable("lora", "a", lambda: jax.random.normal(
            self.make_rng("params"), (*in_shape, self.rank)) / math.sqrt(fan_in)).value
        b = self.variable("lora", "b", lambda: jnp.zeros((self.rank, *self.out_shape))).value
        x_ri = x.reshape(-1, fan_in).astype(self.dtype)
        y_ro = (x_ri @ a.reshape(fan_in, self.rank).astype(self.dtype)) @ b.reshape(
            self.rank, -1).astype(self.dtype)
        return (self.scale * y_ro).reshape(*x.shape[:x.ndim - self.in_ndim], *self.out_shape)


def _projection(cfg: ModelConfig, out_major: bool, out_shape: tuple[int, ...], in_ndim: int,
                init, name: str, lora=None):
    """The projection `name` as a function of its input: dense, plus an adapter when `lora`
    (a gptjax.finetune.LoRAConfig) targets it."""
    if out_major:
        if lora is not None:
            raise ValueError("the decode layout has no adapters: merge them first (finetune.lora.merge)")
        return OutMajorDense(cfg, out_shape, in_ndim, name=name)
    dense = nn.DenseGeneral(out_shape, axis=tuple(range(-in_ndim, 0)), use_bias=cfg.bias,
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=init,
                            dot_general=dense_dot, name=name)
    adapter = None
    if lora is not None and name in lora.targets:
        adapter = LoRA(out_shape, in_ndim, lora.rank, lora.alpha / lora.rank, cfg.dtype,
                       name=f"{name}{LORA_SUFFIX}")

    def project(x):
        # Batch and time merged into one rows axis: the weight gradient then contracts one
        # axis, which XLA:CPU runs at its matmul rate; contracting (batch, time) it fell to
        # ~2/3 of that (the whole train step: 1.06-1.09x, benchmarks/NOTES.md). Under a
        # mesh, rows stay split as the batch was.
        lead, in_shape = x.shape[:x.ndim - in_ndim], x.shape[x.ndim - in_ndim:]
        x_r = x.reshape(-1, *in_shape)
        y_r = dense(x_r) if adapter is None else dense(x_r) + adapter(x_r)
        return y_r.reshape(*lead, *out_shape)
    return project


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig
    out_major: bool = False  # the decode layout (see OutMajorDense)
    lora: Any = None  # a LoRAConfig: adapters on the projections it targets
    observe: bool = False  # sow the first row's attention weights (see apply_observed)

    @nn.compact
    def __call__(self, x_btd, deterministic: bool, cache: KVCache | None = None, layer=None):
        c = self.cfg
        qkv_btkhd = _projection(c, self.out_major, (3, c.n_head, c.head_dim), 1,
                                nn.initializers.normal(INIT_STD), "qkv", self.lora)(x_btd)
        if cache is None:
            y_bthd = causal_attention_packed(qkv_btkhd, c.attention_impl)
            if self.observe:
                self.sow("intermediates", "attn_probs", attention_probs(qkv_btkhd[0]))
        else:
            q_bthd, k_bthd, v_bthd = (qkv_btkhd[:, :, i] for i in range(3))
            y_bthd, cache = cached_attention(q_bthd, k_bthd, v_bthd, cache, layer)
        # GPT-2's scaled init for projections that write into the residual stream.
        proj_init = nn.initializers.normal(INIT_STD / math.sqrt(2 * c.n_layer))
        out = _projection(c, self.out_major, (c.d_model,), 2, proj_init, "out", self.lora)
        return out(y_bthd), cache


class MLP(nn.Module):
    cfg: ModelConfig
    out_major: bool = False
    lora: Any = None

    @nn.compact
    def __call__(self, x_btd):
        c = self.cfg
        h_btf = _projection(c, self.out_major, (c.d_mlp,), 1, nn.initializers.normal(INIT_STD),
                            "fc", self.lora)(x_btd)
        h_btf = nn.gelu(h_btf, approximate=True)  # GPT-2's tanh approximation
        proj_init = nn.initializers.normal(INIT_STD / math.sqrt(2 * c.n_layer))
        return _projection(c, self.out_major, (c.d_model,), 1, proj_init, "proj", self.lora)(h_btf)


class Block(nn.Module):
    """Pre-LN transformer block. Returns (activations, cache): the carry and output of a
    layer scan (cache None), or of one layer in a decoding loop (cache updated)."""

    cfg: ModelConfig
    out_major: bool = False
    lora: Any = None
    observe: bool = False  # sow attention weights and the residual stream's RMS

    @nn.compact
    def __call__(self, x_btd, deterministic: bool, cache: KVCache | None = None, layer: int = 0):
        c = self.cfg
        norm = partial(nn.LayerNorm, epsilon=c.layer_norm_eps, use_bias=c.bias, dtype=c.dtype,
                       param_dtype=c.param_dtype)
        drop = nn.Dropout(c.dropout)
        attn = CausalSelfAttention(c, self.out_major, self.lora, self.observe, name="attn")
        h, cache = attn(norm(name="ln1")(x_btd), deterministic, cache, layer)
        x_btd = constrain_rows(x_btd + drop(h, deterministic=deterministic))
        h = MLP(c, self.out_major, self.lora, name="mlp")(norm(name="ln2")(x_btd))
        x_btd = constrain_rows(x_btd + drop(h, deterministic=deterministic))
        if self.observe:
            rms = jnp.sqrt(jnp.mean(jnp.square(jax.lax.stop_gradient(x_btd).astype(jnp.float32))))
            self.sow("intermediates", "resid_rms", rms)
        return x_btd, cache


class GPT(nn.Module):
    """decode_layout=False: training's layout, blocks under `nn.scan` with parameters stacked
    on a layer axis. True: the decode layout of `decode_params` (one Block per layer, kernels
    output-major), which `apply_cached` uses: inside a scan XLA:CPU copies each layer's
    weights out of the stacked arrays on every step, tripling a decode step's memory
    traffic (measured: 47 vs 25 ms per GPT-2 124M step)."""

    cfg: ModelConfig
    decode_layout: bool = False
    lora: Any = None  # a LoRAConfig: low-rank adapters (the "lora" collection) on its targets
    observe: bool = False  # blocks sow what `apply_observed` returns

    @nn.compact
    def __call__(self, tokens_bt, positions_bt=None, deterministic: bool = True,
                 cache: KVCache | None = None, logits_at=None, features: bool = False):
        """Logits (batch, time, vocab); with a cache, (logits at column `logits_at`, cache);
        with `features`, the final LayerNorm's output (batch, time, d_model) instead of logits
        (what a classification head reads)."""
        c = self.cfg
        if c.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (resolve it from the tokenizer)")
        if tokens_bt.shape[1] > c.context_length:  # position lookup would silently give NaN
            raise ValueError(f"{tokens_bt.shape[1]} tokens exceed context_length {c.context_length}")
        embed = partial(nn.Embed, features=c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
                        embedding_init=nn.initializers.normal(INIT_STD))
        wte = (QuantizedEmbed(c, name="wte") if self.decode_layout and c.quantize != "none"
               else embed(c.vocab_size, name="wte"))
        if positions_bt is None:
            positions_bt = jnp.arange(tokens_bt.shape[1])[None, :]
        x_btd = wte(tokens_bt) + embed(c.context_length, name="wpe")(positions_bt)
        x_btd = constrain_rows(nn.Dropout(c.dropout)(x_btd, deterministic=deterministic))
        if not self.decode_layout:
            if cache is not None:
                raise ValueError("decoding with a KV cache needs decode_params(params)")
            blocks = nn.scan(
                _remat(Block, c),
                variable_axes={"params": 0, "lora": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=c.n_layer,
                unroll=layers_per_scan_step(c),
            )
            x_btd, _ = blocks(c, lora=self.lora, observe=self.observe, name="blocks")(
                x_btd, deterministic)
        else:
            for i in range(c.n_layer):
                block = Block(c, out_major=True, name=f"blocks_{i}")
                x_btd, cache = block(x_btd, deterministic, cache, i)
        if cache is not None:
            # Decoding needs one position's logits; skip the (time x vocab) head for the rest.
            x_btd = jax.lax.dynamic_slice_in_dim(x_btd, logits_at, 1, axis=1)
        x_btd = nn.LayerNorm(epsilon=c.layer_norm_eps, use_bias=c.bias, dtype=c.dtype,
                             param_dtype=c.param_dtype, name="ln_f")(x_btd)
        if features:
            return x_btd
        if cache is None:
            # float32 logits at least (a float64 model, as gradcheck runs it, keeps float64)
            return constrain_rows(wte.attend(x_btd).astype(jnp.promote_types(c.dtype, jnp.float32)))
        return _decode_head(x_btd[:, 0], wte, c), cache._replace(index=cache.index + tokens_bt.shape[1])


# What a rematerialised block keeps from its forward pass (jax.checkpoint policies).
REMAT_POLICIES = {
    "full": None,  # nothing: the whole block is recomputed from its input
    "dots": jax.checkpoint_policies.dots_saveable,
    # Products without dot batch dimensions: the linear layers, not attention's
    # per-(batch, head) products, which are cheap to redo and large to keep.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layers_per_scan_step(cfg: ModelConfig) -> int:
    """The `unroll` of the layer scan: `scan_unroll`, with 0 = all layers up to
    FULL_UNROLL_MAX_LAYERS, else 1; always 1 (rolled) when blocks are rematerialised, since
    fully unrolled XLA:CPU planned no saving from remat, with or without CSE barriers
    (measured on 2-4 layers)."""
    if cfg.remat != "none":
        return 1
    if cfg.scan_unroll == 0:
        return cfg.n_layer if cfg.n_layer <= FULL_UNROLL_MAX_LAYERS else 1
    return min(cfg.scan_unroll, cfg.n_layer)


def _remat(block_cls, cfg: ModelConfig):
    if cfg.remat == "none":
        return block_cls
    # The scan is rolled (layers_per_scan_step), so the backward loop is apart from the
    # forward one and CSE barriers are not needed (flax's advice for remat under scan).
    # Argument 2 (counting self) is `deterministic`, a Python bool.
    return nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False,
                    static_argnums=(2,))


def _decode_head(x_bd, wte: nn.Embed, cfg: ModelConfig) -> jax.Array:
    """Logits (batch, vocab) of one position per row: the tied embedding, read as an
    output-major (vocab, d_model) kernel, for one row too: in the prefill, `wte.attend`'s
    plain product made XLA copy the whole table transposed, and GPT-2 124M's first token
    took 41 ms instead of 28-31 with XLA's products; per token the two forms ran alike
    (benchmarks/NOTES.md, decode 16)."""
    if isinstance(wte, QuantizedEmbed):
        return wte.head(x_bd)
    return out_major_product(wte.embedding, x_bd, cfg, jnp.float32)


@partial(jax.jit, static_argnums=0)
def init(config: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters (a plain nested dict of arrays), initialised in one compiled call."""
    tokens = jnp.zeros((1, min(config.context_length, 8)), jnp.int32)
    return GPT(config).init({"params": key}, tokens)["params"]


def apply(params: dict, tokens_bt: jax.Array, config: ModelConfig, *, positions_bt=None,
          deterministic: bool = True, rng: jax.Array | None = None, lora=None,
          adapters: dict | None = None, features: bool = False) -> jax.Array:
    """Float32 logits (batch, time, vocab). `rng` is needed only when dropout is active.

    With `lora` (a LoRAConfig) and its `adapters` (gptjax.model.lora.init_adapters), the
    targeted projections add their low-rank updates; `features` returns the final hidden
    states (batch, time, d_model) instead of logits.
    """
    return _apply(params, tokens_bt, config, positions_bt, deterministic, rng, lora, adapters,
                  features, observe=False)


def apply_observed(params: dict, tokens_bt: jax.Array, config: ModelConfig, *,
                   positions_bt=None, deterministic: bool = True, rng: jax.Array | None = None,
                   lora=None, adapters: dict | None = None) -> tuple[jax.Array, dict]:
    """`apply`'s logits and what the blocks saw on the way: "attn_probs", the attention
    weights of the batch's first row (layer, head, query, key), and "resid_rms", the
    residual stream's root-mean-square after each block (layer,). Both float32 and outside
    the gradient. The weights are recomputed from q and k whatever `attention_impl` runs,
    which costs one (head, time, time) array a layer: meant for inspection and for the
    occasional statistics step, not every step."""
    logits, state = _apply(params, tokens_bt, config, positions_bt, deterministic, rng, lora,
                           adapters, False, observe=True)
    sown = state["intermediates"]["blocks"]
    return logits, {"attn_probs": sown["attn"]["attn_probs"][0], "resid_rms": sown["resid_rms"][0]}


def _apply(params, tokens_bt, config, positions_bt, deterministic, rng, lora, adapters, features,
           observe):
    rngs = {"dropout": rng} if rng is not None else None
    variables = {"params": params}
    if lora is not None:
        if adapters is None:
            raise ValueError("apply with lora needs its adapters")
        variables["lora"] = adapters
    return GPT(config, lora=lora, observe=observe).apply(
        variables, tokens_bt, positions_bt, deterministic=deterministic, rngs=rngs,
        features=features, mutable=["intermediates"] if observe else False)


# Kernels of each block and how many of their leading axes are inputs.
_KERNEL_INPUT_AXES = KERNEL_INPUT_AXES


def decode_params(params: dict, config: ModelConfig | None = None) -> dict:
    """Parameters in the decode layout: "blocks_0", "blocks_1", ... with output-major kernels,
    quantized too when `config.quantize` asks for it (gptjax.model.quantize).

    A copy of the weights (one-off; on CPU ~0.2 s for GPT-2 124M). Decoding from stacked
    parameters converts them on every call instead, so callers that decode repeatedly
    convert once and keep the result.
    """
    if config is not None and config.quantize != "none" and "scale" not in params["wte"]:
        return quantize_decode_params(decode_params(params), config)
    if "blocks" not in params:
        return params  # already converted
    out = {k: v for k, v in params.items() if k != "blocks"}
    n_layer = jax.tree.leaves(params["blocks"])[0].shape[0]
    for i in range(n_layer):
        layer = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
        for (module, name), n_in in _KERNEL_INPUT_AXES.items():
            kernel = layer[module][name]["kernel"]
            axes = tuple(range(n_in, kernel.ndim)) + tuple(range(n_in))
            layer[module][name] = {**layer[module][name], "kernel": jnp.transpose(kernel, axes)}
        out[f"blocks_{i}"] = layer
    return out


def apply_cached(params: dict, tokens_bt: jax.Array, positions_bt: jax.Array, cache: KVCache,
                 config: ModelConfig, *, logits_at=-1) -> tuple[jax.Array, KVCache]:
    """Run `tokens_bt` (written at columns cache.index...) against the cache.

    Returns the float32 logits (batch, vocab) at column `logits_at` of `tokens_bt` (default:
    the last) and the cache advanced by the tokens' length. Prefill and one-token decode
    steps are both this call. `params` are as trained (converted here, per call) or
    already `decode_params(params)` (what a decode loop passes).
    """
    logits_at = logits_at % tokens_bt.shape[1] if isinstance(logits_at, int) else logits_at
    return GPT(config, decode_layout=True).apply(
        {"params": decode_params(params, config)}, tokens_bt, positions_bt, cache=cache,
        logits_at=logits_at)


def loss_sum(params, batch: dict, config: ModelConfig, *, deterministic=True, rng=None,
             lora=None, adapters=None):
    """(sum of token cross-entropies, number of weighted tokens) for exact averaging."""
    logits_btv = apply(params, batch["inputs"], config, deterministic=deterministic, rng=rng,
                       lora=lora, adapters=adapters)
    return ce_sum(logits_btv, batch)


def ce_sum(logits_btv: jax.Array, batch: dict):
    """(sum of token cross-entropies, weighted token count) of logits against batch["targets"]."""
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
    weights_bt = batch.get("weights")
    if weights_bt is None:
        return ce_bt.sum(), jnp.asarray(ce_bt.size, ce_bt.dtype)
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
