"""Sampling one next id per row where every row has its own settings (a serving batch
holds unrelated requests): temperature, top-k and top-p are arrays, not constants.

Truncation follows `gptjax.generation.sampling`: top-k, then temperature, then top-p. It
sorts the vocabulary, so the decode step compiles it only when some row truncates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOP_LOGPROBS = 5  # alternatives the completions API may ask for per token (OpenAI's limit)
MIN_TEMPERATURE = 1e-4


def sample_rows(logits_sv, keys_s, temperature_s, top_k_s, top_p_s, valid_vocab: int, *,
                truncate: bool, top_logprobs: bool):
    """(ids (rows,), their log-probabilities, top ids and log-probabilities (rows, 5) or None).

    temperature 0 (or below MIN_TEMPERATURE) is greedy; top_k 0 and top_p 1 truncate
    nothing. Log-probabilities are the model's own (before temperature and truncation), as
    OpenAI reports them.
    """
    vocab = logits_sv.shape[-1]
    if valid_vocab < vocab:  # padded vocabularies: the extra rows are not tokens
        logits_sv = jnp.where(jnp.arange(vocab) < valid_vocab, logits_sv, -jnp.inf)
    logprobs_sv = jax.nn.log_softmax(logits_sv, axis=-1)
    greedy_s = jnp.argmax(logits_sv, axis=-1).astype(jnp.int32)
    # Below MIN_TEMPERATURE a division would push logits to infinity: that is greedy anyway.
    hot = temperature_s >= MIN_TEMPERATURE
    scaled_sv = logits_sv / jnp.where(hot, temperature_s, 1.0)[:, None]
    if truncate:
        sorted_sv = -jnp.sort(-scaled_sv, axis=-1)
        k_s = jnp.clip(top_k_s, 1, valid_vocab)
        kth_s1 = jnp.take_along_axis(sorted_sv, (k_s - 1)[:, None], axis=-1)
        kth_s1 = jnp.where(top_k_s[:, None] > 0, kth_s1, -jnp.inf)
        # top-p over what top-k kept: the mass of the sorted candidates above the k-th
        kept_sorted_sv = jnp.where(sorted_sv >= kth_s1, sorted_sv, -jnp.inf)
        probs_sv = jax.nn.softmax(kept_sorted_sv, axis=-1)
        mass_before_sv = jnp.cumsum(probs_sv, axis=-1) - probs_sv
        inside_sv = (mass_before_sv < top_p_s[:, None]) | (jnp.arange(vocab) == 0)
        nucleus_s1 = jnp.min(jnp.where(inside_sv, kept_sorted_sv, jnp.inf), axis=-1, keepdims=True)
        scaled_sv = jnp.where(scaled_sv < jnp.maximum(kth_s1, nucleus_s1), -jnp.inf, scaled_sv)
    drawn_s = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys_s, scaled_sv)
    ids_s = jnp.where(hot, drawn_s.astype(jnp.int32), greedy_s)
    chosen_s = jnp.take_along_axis(logprobs_sv, ids_s[:, None], axis=-1)[:, 0]
    top = jax.lax.top_k(logprobs_sv, TOP_LOGPROBS) if top_logprobs else None
    return ids_s, chosen_s, top


def row_keys(seeds_s, counts_s):
    """Each row's key for its `count`-th id: a request's draws depend on its own seed only."""
    return jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.PRNGKey(seed), n))(seeds_s, counts_s)
