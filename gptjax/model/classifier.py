"""A GPT with a classification head in place of its language-model head.

The head reads one vector per text: the final hidden state of the last real token
("last": under causal attention the only position that has seen the whole text), or the
mean over the real tokens ("mean"). Texts are right-padded; `lengths` says where each
ends, so padding never reaches the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gptjax.config import ModelConfig
from gptjax.model import gpt as model

POOLINGS = ("last", "mean")
LOSSES = ("ce", "focal")


def init_head(key: jax.Array, d_model: int, n_classes: int) -> dict:
    return {"kernel": model.INIT_STD * jax.random.normal(key, (d_model, n_classes)),
            "bias": jnp.zeros((n_classes,))}


def pool(h_btd: jax.Array, lengths_b: jax.Array, how: str) -> jax.Array:
    if how == "last":
        return jnp.take_along_axis(h_btd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    real_bt = jnp.arange(h_btd.shape[1])[None, :] < lengths_b[:, None]
    summed_bd = jnp.einsum("btd,bt->bd", h_btd.astype(jnp.float32), real_bt.astype(jnp.float32))
    return summed_bd / jnp.maximum(lengths_b, 1)[:, None]


def logits(params: dict, tokens_bt: jax.Array, lengths_b: jax.Array, config: ModelConfig, *,
           pooling: str = "last", lora=None, deterministic: bool = True, rng=None) -> jax.Array:
    """Float32 class logits (batch, classes) of params {"gpt", "head", ["lora"]}."""
    h_btd = model.apply(params["gpt"], tokens_bt, config, deterministic=deterministic, rng=rng,
                        lora=lora, adapters=params.get("lora"), features=True)
    x_bd = pool(h_btd, lengths_b, pooling).astype(jnp.float32)
    return x_bd @ params["head"]["kernel"] + params["head"]["bias"]


def focal(z_bc: jax.Array, labels_b: jax.Array, gamma: float) -> jax.Array:
    """Per-row focal loss -(1 - p_t)^gamma log p_t (Lin et al. 2017), softmax over the
    classes; gamma = 0 is cross-entropy. Well-classified rows (p_t near 1) count less."""
    logp_t = jnp.take_along_axis(jax.nn.log_softmax(z_bc), labels_b[:, None], axis=1)[:, 0]
    if gamma == 0:
        return -logp_t
    # 1 - p_t underflows to 0 on a confident row; x**gamma has an infinite slope at 0 for
    # gamma < 1, and 0 * inf would make the whole step NaN.
    return -(jnp.maximum(-jnp.expm1(logp_t), 1e-12) ** gamma) * logp_t


def make_loss_sum(config: ModelConfig, pooling: str, lora=None, *, loss: str = "ce",
                  focal_gamma: float = 2.0):
    """loss_sum(params, batch, rng) over batch {"tokens", "lengths", "labels", "weights"}:
    weights carry class weights and zero for padding rows. `loss` is "ce" or "focal"."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    deterministic = config.dropout == 0.0

    def loss_sum(params, batch, rng):
        z_bc = logits(params, batch["tokens"], batch["lengths"], config, pooling=pooling,
                      lora=lora, deterministic=deterministic or rng is None, rng=rng)
        if loss == "focal":
            per_row = focal(z_bc, batch["labels"], focal_gamma)
        else:
            per_row = optax.softmax_cross_entropy_with_integer_labels(z_bc, batch["labels"])
        return (per_row * batch["weights"]).sum(), batch["weights"].sum()

    return loss_sum


def make_predict(config: ModelConfig, pooling: str, lora=None):
    """predict(params, tokens, lengths) -> class probabilities (batch, classes)."""
    def predict(params, tokens_bt, lengths_b):
        return jax.nn.softmax(logits(params, tokens_bt, lengths_b, config, pooling=pooling, lora=lora))
    return predict
