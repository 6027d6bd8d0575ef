"""Choosing the next id from logits: greedy, temperature, top-k and top-p, seeded.

The settings are checked on the host before anything compiles; `sample_logits` is the
traceable part and runs inside the decode loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gptjax.errors import GptjaxError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k/top_p None = no truncation; seed fixes the draws."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def check(self) -> "Sampling":
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise GptjaxError(f"temperature must be a finite number >= 0, got {t}")
        if self.top_k is not None and self.top_k < 1:
            raise GptjaxError(f"top_k must be >= 1, got {self.top_k}")
        p = self.top_p
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise GptjaxError(f"top_p must be in (0, 1], got {p}")
        return self


def check_max_new_tokens(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise GptjaxError(f"max_new_tokens must be an integer >= 0, got {n}")


def sample_logits(logits_bv, key, temperature, top_k: int | None, top_p, valid_vocab: int):
    """Next ids (batch,) from float logits. Ids >= valid_vocab are never chosen.

    `top_k` is static (None or < valid_vocab); `top_p` is None (off) or a traced scalar.
    Truncation order follows common practice: top-k, then temperature, then top-p.
    """
    vocab = logits_bv.shape[-1]
    if valid_vocab < vocab:  # padded vocabularies: the extra rows are not tokens
        logits_bv = jnp.where(jnp.arange(vocab) < valid_vocab, logits_bv, -jnp.inf)
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def draw(_):
        if top_k is not None:
            # lax.top_k returns sorted values, so top-p below sorts k entries, not the vocabulary.
            candidates_bk, ids_bk = jax.lax.top_k(logits_bv, top_k)
        else:
            candidates_bk, ids_bk = logits_bv, None
        scaled_bk = candidates_bk / temperature
        if top_p is not None:
            sorted_bk = scaled_bk if top_k is not None else -jnp.sort(-scaled_bk, axis=-1)
            probs_bk = jax.nn.softmax(sorted_bk, axis=-1)
            mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
            # The smallest logit whose preceding mass is below top_p; the top one always stays.
            kept_bk = (mass_before_bk < top_p) | (jnp.arange(sorted_bk.shape[-1]) == 0)
            threshold_b1 = jnp.min(jnp.where(kept_bk, sorted_bk, jnp.inf), axis=-1, keepdims=True)
            scaled_bk = jnp.where(scaled_bk < threshold_b1, -jnp.inf, scaled_bk)
        choice_b = jax.random.categorical(key, scaled_bk, axis=-1)
        if ids_bk is not None:
            choice_b = jnp.take_along_axis(ids_bk, choice_b[:, None], axis=-1)[:, 0]
        return choice_b.astype(jnp.int32)

    # A cond, not a select: greedy decoding skips the vocabulary-sized random draw entirely.
    return jax.lax.cond(temperature > 0, draw, lambda _: greedy_b, None)
