"""Autoregressive sampling: greedy, temperature and top-k, seeded, in one jitted loop.

This path recomputes the window at each step (no KV cache yet): the whole loop is a
`lax.fori_loop` over a fixed-size token buffer, so there is no per-token Python dispatch,
and prompt lengths are bucketed to powers of two so new prompts rarely recompile.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError

MIN_BUCKET = 16


def check_sampling(temperature: float, top_k: int | None, max_new_tokens: int) -> None:
    """Reject sampling settings that would silently misbehave, before compiling."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GptjaxError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GptjaxError(f"top_k must be >= 1, got {top_k}")
    if max_new_tokens < 0:
        raise GptjaxError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def sample_logits(logits_bv, key, temperature, top_k: int | None, valid_vocab: int):
    """Next ids from logits; temperature 0 means greedy. Ids >= valid_vocab never appear."""
    vocab = logits_bv.shape[-1]
    logits_bv = jnp.where(jnp.arange(vocab) < valid_vocab, logits_bv, -jnp.inf)
    if top_k is not None and top_k < valid_vocab:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    greedy = jnp.argmax(logits_bv, axis=-1)
    scaled = logits_bv / jnp.maximum(temperature, 1e-6)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "top_k", "valid_vocab"))
def _generate_jit(params, buf_bl, prompt_len, key, temperature, *, config: ModelConfig,
                  max_new_tokens: int, top_k, valid_vocab: int):
    ctx = config.context_length
    length = buf_bl.shape[1]

    def body(i, carry):
        buf, key = carry
        cur = prompt_len + i  # tokens known so far
        # Causality makes the tokens after `cur` in the window irrelevant to position cur-1.
        start = jnp.clip(cur - ctx, 0, length - ctx)
        window = jax.lax.dynamic_slice_in_dim(buf, start, ctx, axis=1)
        logits_btv = model.apply(params, window, config)
        last = jax.lax.dynamic_index_in_dim(logits_btv, cur - 1 - start, axis=1, keepdims=False)
        key, sub = jax.random.split(key)
        nxt = sample_logits(last, sub, temperature, top_k, valid_vocab)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt[:, None], cur, axis=1), key

    buf, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf_bl, key))
    return buf


def generate(params, config: ModelConfig, prompt_ids: list[int], max_new_tokens: int, *,
             seed: int = 0, temperature: float = 1.0, top_k: int | None = None,
             valid_vocab: int | None = None, eot_id: int | None = None) -> list[int]:
    """Continue `prompt_ids` by max_new_tokens ids (prompt not included in the result).

    An empty prompt starts from `eot_id`. Prompts longer than the context keep only their
    last context_length tokens as conditioning (the window slides anyway).
    """
    check_sampling(temperature, top_k, max_new_tokens)
    vocab = config.vocab_size
    valid_vocab = min(valid_vocab or vocab, vocab)
    if not prompt_ids:
        if eot_id is None:
            raise GptjaxError("empty prompt and no end-of-text id to start from")
        prompt_ids = [eot_id]
    prompt_ids = list(prompt_ids)[-config.context_length:]
    bad = [i for i in prompt_ids if not 0 <= i < valid_vocab]
    if bad:
        raise GptjaxError(f"prompt ids outside the vocabulary of {valid_vocab}: {bad[:5]}")
    if max_new_tokens == 0:
        return []
    bucket = max(MIN_BUCKET, 1 << (len(prompt_ids) - 1).bit_length())
    length = max(config.context_length, bucket + max_new_tokens)
    buf = jnp.zeros((1, length), jnp.int32).at[0, :len(prompt_ids)].set(jnp.array(prompt_ids))
    top_k = None if top_k is None or top_k >= valid_vocab else int(top_k)
    out = _generate_jit(params, buf, len(prompt_ids), jax.random.PRNGKey(seed),
                        jnp.float32(temperature), config=config, max_new_tokens=max_new_tokens,
                        top_k=top_k, valid_vocab=valid_vocab)
    n = len(prompt_ids)
    return out[0, n:n + max_new_tokens].tolist()
