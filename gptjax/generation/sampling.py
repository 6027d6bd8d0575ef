"""Choosing the next id from logits: greedy, temperature, top-k and top-p, seeded.

The settings are checked on the host before anything compiles; `sample_logits` is the
traceable part and runs inside the decode loop.
"""

from __future__ import annotations

import math
import numbers
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
        t, k, p = self.temperature, self.top_k, self.top_p
        if not _real(t) or not math.isfinite(t) or t < 0:
            raise GptjaxError(f"temperature must be a finite number >= 0, got {t}")
        if k is not None and (not _integer(k) or k < 1):
            raise GptjaxError(f"top_k must be an integer >= 1, got {k}")
        if p is not None and not (_real(p) and 0 < p <= 1):
            raise GptjaxError(f"top_p must be in (0, 1], got {p}")
        if not _integer(self.seed) or not 0 <= self.seed < 2**32:
            # PRNGKey keeps 32 bits of a seed: larger ones would silently repeat smaller ones.
            raise GptjaxError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        return self


MAX_NEW_TOKENS = 1_000_000  # the token buffer is preallocated on the device


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_max_new_tokens(n: int) -> None:
    if not _integer(n) or not 0 <= n <= MAX_NEW_TOKENS:
        raise GptjaxError(f"max_new_tokens must be an integer in [0, {MAX_NEW_TOKENS:,}], got {n}")


def top_k_cap(top_k: int | None, valid_vocab: int) -> int | None:
    """The static candidate count compiled for `top_k`: the next power of two, at most the
    vocabulary; None when top-k truncates nothing.

    The decode loop takes k itself as a traced value below this cap, so a new k recompiles
    only when it crosses a power of two (at most 17 caps for GPT-2's 50,257 ids). The
    random draw is over the cap's candidates, so a seed's samples differ from those of
    gptjax versions that compiled exactly k.
    """
    if top_k is None or top_k >= valid_vocab:
        return None
    return min(1 << (int(top_k) - 1).bit_length(), valid_vocab)


def sample_logits(logits_bv, key, temperature, top_k, top_p, valid_vocab: int, *,
                  cap: int | None = None):
    """Next ids (batch,) from float logits. Ids >= valid_vocab are never chosen.

    `top_k` is None (off) or k < valid_vocab: a Python int, or a traced integer when `cap`
    (static, >= k) says how many candidates to compile for. `top_p` is None (off) or a
    traced scalar. Truncation order follows common practice: top-k, then temperature, then
    top-p.
    """
    if cap is not None and isinstance(top_k, numbers.Integral) and top_k > cap:
        raise ValueError(f"top_k {top_k} is above the candidates compiled for it ({cap})")
    vocab = logits_bv.shape[-1]
    if valid_vocab < vocab:  # padded vocabularies: the extra rows are not tokens
        logits_bv = jnp.where(jnp.arange(vocab) < valid_vocab, logits_bv, -jnp.inf)
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def draw(_):
        if top_k is not None:
            # lax.top_k returns sorted values, so top-p below sorts k entries, not the vocabulary.
            # It puts the lower id first among equal logits, so the first k of the cap's
            # candidates are exactly lax.top_k(logits, k).
            candidates_bk, ids_bk = jax.lax.top_k(logits_bv, top_k if cap is None else cap)
            if cap is not None:
                candidates_bk = jnp.where(jnp.arange(cap) < top_k, candidates_bk, -jnp.inf)
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
