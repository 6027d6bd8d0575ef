"""Batched autoregressive generation with a KV cache, in jitted device loops.

A batch of prompts is left-padded to a shared length bucket (powers of two, so new prompt
lengths rarely recompile), with per-row positions and a padding mask. One jitted call
prefills the cache and samples the first token; a second runs a `lax.while_loop` of
one-token decode steps over the preallocated cache, for as many steps as asked, stopping
early when every row has finished (end-of-text). There is no per-token Python dispatch:
the host only sees tokens between chunks, which is how text streams and how stop strings
(checked on text, see `gptjax.generation.textgen`) end a row.

Learned positions end at the context length. When a row's next position would pass it,
generation goes on by sliding the window, as in the book: from that step on, each step
recomputes the last `context_length` tokens (no cache; slower, same loop). Until then
every step uses the cache.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError
from gptjax.generation.sampling import Sampling, check_max_new_tokens, sample_logits, top_k_cap
from gptjax.model.kv_cache import KVCache

MIN_BUCKET = 16


class _State(NamedTuple):
    tokens: jax.Array  # (batch, prompt bucket + capacity): left-padded prompts, then new ids
    lengths: jax.Array  # (batch,) new ids per row (stops growing once the row is done)
    done: jax.Array  # (batch,) bool
    n: jax.Array  # int32: decode steps taken (new ids written per unfinished row)
    cache: KVCache
    key: jax.Array


class _Static(NamedTuple):
    """Everything that shapes the compiled loop (hashable: a jit static argument)."""

    config: ModelConfig
    bucket: int  # prompt columns
    cache_len: int  # columns the cache holds: prompt bucket + new ids, at most bucket + ctx
    may_slide: bool  # some row may outgrow the context: compile the sliding-window step too
    top_k_cap: int | None  # candidates compiled for top-k; k itself is traced
    nucleus: bool
    valid_vocab: int
    eot_id: int  # -1: never stop on a token


def _bucket(n: int, limit: int) -> int:
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max(limit, n))


def _cached_logits(params, s: _Static, tokens_bn, pad_b, cache, end):
    """Logits after feeding column end-1 through the cache (which it is written to)."""
    last_b1 = jax.lax.dynamic_slice_in_dim(tokens_bn, end - 1, 1, axis=1)
    return model.apply_cached(params, last_b1, (end - 1 - pad_b)[:, None], cache, s.config)


def _window_logits(params, s: _Static, tokens_bn, pad_b, cache, end):
    """Logits after column end-1 from the last context_length columns, recomputed."""
    cfg = s.config
    ctx = cfg.context_length
    start = jnp.clip(end - ctx, 0, tokens_bn.shape[1] - ctx)
    window_bc = jax.lax.dynamic_slice_in_dim(tokens_bn, start, ctx, axis=1)
    col_c = start + jnp.arange(ctx)
    first_b1 = jnp.maximum(pad_b, end - ctx)[:, None]  # a row's oldest token inside the window
    positions_bc = jnp.clip(col_c[None, :] - first_b1, 0, ctx - 1)
    fresh = model.init_cache(cfg, tokens_bn.shape[0], ctx, col_c[None, :] >= first_b1)
    logits_bv, _ = model.apply_cached(params, window_bc, positions_bc, fresh, cfg,
                                      logits_at=end - 1 - start)
    return logits_bv, cache  # the cache is no longer written once the window slides


def _next_logits(params, s: _Static, tokens_bn, pad_b, cache, end):
    """Logits for the token after column end-1, through the cache while positions allow."""
    if not s.may_slide:
        return _cached_logits(params, s, tokens_bn, pad_b, cache, end)
    # Left padding puts the longest row (least padding) furthest ahead in positions.
    fits = end - 1 - jnp.min(pad_b) < s.config.context_length
    args = (params, s, tokens_bn, pad_b, cache, end)
    return jax.lax.cond(fits, lambda: _cached_logits(*args), lambda: _window_logits(*args))


def _emit(s: _Static, state: _State, logits_bv, temperature, top_k, top_p) -> _State:
    """Sample one id per row and append it to the rows that are still going."""
    key = jax.random.fold_in(state.key, state.n)
    nxt_b = sample_logits(logits_bv, key, temperature, top_k if s.top_k_cap else None,
                          top_p if s.nucleus else None, s.valid_vocab, cap=s.top_k_cap)
    col = s.bucket + state.n
    live_b = ~state.done
    old_b = jax.lax.dynamic_index_in_dim(state.tokens, col, axis=1, keepdims=False)
    tokens = jax.lax.dynamic_update_index_in_dim(state.tokens, jnp.where(live_b, nxt_b, old_b),
                                                 col, axis=1)
    done = state.done | (live_b & (nxt_b == s.eot_id))
    return state._replace(tokens=tokens, lengths=state.lengths + live_b, done=done, n=state.n + 1)


@partial(jax.jit, static_argnames="s")
def _start(params, tokens_bn, pad_b, key, temperature, top_k, top_p, s: _Static) -> _State:
    """Prefill the cache with the prompts and sample each row's first new id."""
    batch = tokens_bn.shape[0]
    col_s = jnp.arange(s.cache_len)
    cache = model.init_cache(s.config, batch, s.cache_len, col_s[None, :] >= pad_b[:, None])
    positions_bp = jnp.maximum(col_s[None, :s.bucket] - pad_b[:, None], 0)
    logits_bv, cache = model.apply_cached(params, tokens_bn[:, :s.bucket], positions_bp, cache,
                                          s.config)
    state = _State(tokens_bn, jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool),
                   jnp.zeros((), jnp.int32), cache, key)
    return _emit(s, state, logits_bv, temperature, top_k, top_p)


@partial(jax.jit, static_argnames="s", donate_argnames="state")
def _advance(params, state: _State, pad_b, stop_at, temperature, top_k, top_p,
             s: _Static) -> _State:
    """Decode until `stop_at` steps have been taken or every row is done."""

    def running(st):
        return (st.n < stop_at) & ~jnp.all(st.done)

    def step(st):
        logits_bv, cache = _next_logits(params, s, st.tokens, pad_b, st.cache, s.bucket + st.n)
        return _emit(s, st._replace(cache=cache), logits_bv, temperature, top_k, top_p)

    return jax.lax.while_loop(running, step, state)


class Decoder:
    """A batch of prompts being continued; `advance(k)` runs up to k steps in one device call.

    `params` are as trained (converted to the decode layout here, once) or already
    `model.decode_params(params)`, which saves that copy when a model decodes many times.

    Prompts longer than the context keep their last context_length ids (with a warning);
    an empty prompt starts from `eot_id`. Rows stop at `eot_id` when `stop_at_eot`.
    """

    def __init__(self, params, config: ModelConfig, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int, sampling: Sampling = Sampling(), *,
                 valid_vocab: int | None = None, eot_id: int | None = None,
                 stop_at_eot: bool = True):
        sampling.check()
        check_max_new_tokens(max_new_tokens)
        ctx, vocab = config.context_length, config.vocab_size
        valid_vocab = min(valid_vocab or vocab, vocab)
        rows = [self._prompt(list(p), ctx, valid_vocab, eot_id) for p in prompts]
        if not rows:
            raise GptjaxError("no prompts to continue")
        longest = max(map(len, rows))
        bucket = _bucket(longest, ctx)
        capacity = _bucket(max(max_new_tokens, 1), 1 << 30)
        # The last new id is never fed back, so positions reach longest + max_new - 2.
        may_slide = longest + max_new_tokens - 1 > ctx
        width = max(bucket + capacity, ctx)  # the sliding window reads ctx columns
        tokens = np.zeros((len(rows), width), np.int32)
        pad = np.array([bucket - len(r) for r in rows], np.int32)
        for i, r in enumerate(rows):
            tokens[i, pad[i]:bucket] = r
        nucleus = sampling.top_p is not None and sampling.top_p < 1
        self._static = _Static(config, bucket, bucket + min(capacity, ctx), may_slide,
                               top_k_cap(sampling.top_k, valid_vocab), nucleus, valid_vocab,
                               eot_id if stop_at_eot and eot_id is not None else -1)
        top_k = min(sampling.top_k or 0, valid_vocab)  # unused (0) when top-k is off
        self._dynamic = (jnp.float32(sampling.temperature), jnp.int32(top_k),
                         jnp.float32(sampling.top_p or 1.0))
        self._pad = jnp.asarray(pad)
        self.max_new_tokens = max_new_tokens
        self._seen = np.zeros(len(rows), np.int64)
        self._state = None
        params = model.decode_params(params, config)  # once, not in every chunk's call
        if max_new_tokens:
            self._state = _start(params, jnp.asarray(tokens), self._pad,
                                 jax.random.PRNGKey(sampling.seed), *self._dynamic, s=self._static)
        self._params = params

    @staticmethod
    def _prompt(ids: list[int], ctx: int, valid_vocab: int, eot_id: int | None) -> list[int]:
        if not ids:
            if eot_id is None:
                raise GptjaxError("empty prompt and no end-of-text id to start from")
            ids = [eot_id]
        bad = [i for i in ids if not 0 <= i < valid_vocab]
        if bad:
            raise GptjaxError(f"prompt ids outside the vocabulary of {valid_vocab}: {bad[:5]}")
        if len(ids) > ctx:
            warnings.warn(f"prompt of {len(ids)} tokens is longer than the context; keeping its "
                          f"last {ctx}", stacklevel=3)
        return ids[-ctx:]

    @property
    def finished(self) -> bool:
        return self._state is None or bool(int(self._state.n) >= self.max_new_tokens
                                           or np.all(np.asarray(self._state.done)))

    def advance(self, steps: int | None = None) -> list[list[int]]:
        """Ids not yet returned, after up to `steps` more decode steps (None: to the end).

        Finished rows get []. The first call also returns the id sampled by the prefill.
        """
        if steps != 0 and not self.finished:
            n = int(self._state.n)
            stop_at = self.max_new_tokens if steps is None else min(n + steps, self.max_new_tokens)
            self._state = _advance(self._params, self._state, self._pad, jnp.int32(stop_at),
                                   *self._dynamic, s=self._static)
        return self._take()

    def _take(self) -> list[list[int]]:
        if self._state is None:
            return [[] for _ in self._seen]
        tokens = np.asarray(self._state.tokens)
        lengths = np.asarray(self._state.lengths)
        start = self._static.bucket
        new = [tokens[i, start + self._seen[i]:start + lengths[i]].tolist()
               for i in range(len(lengths))]
        self._seen = lengths.astype(np.int64)
        return new

    def stop_rows(self, rows: Sequence[int]) -> None:
        """End these rows now (a stop string was found on the host)."""
        if self._state is not None and len(rows):
            done = self._state.done.at[jnp.asarray(list(rows))].set(True)
            self._state = self._state._replace(done=done)


def generate_batch(params, config: ModelConfig, prompts: Sequence[Sequence[int]],
                   max_new_tokens: int, sampling: Sampling = Sampling(), *,
                   valid_vocab: int | None = None, eot_id: int | None = None,
                   stop_at_eot: bool = True) -> list[list[int]]:
    """New ids for each prompt (prompts not included), in one prefill and one decode call."""
    decoder = Decoder(params, config, prompts, max_new_tokens, sampling, valid_vocab=valid_vocab,
                      eot_id=eot_id, stop_at_eot=stop_at_eot)
    return decoder.advance()


def generate(params, config: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int, *,
             seed: int = 0, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, valid_vocab: int | None = None,
             eot_id: int | None = None, stop_at_eot: bool = True) -> list[int]:
    """Continue one prompt by up to max_new_tokens ids (prompt not included).

    Ends after the first end-of-text (included) unless stop_at_eot=False, which runs the
    full count (a sample may then span documents).
    """
    sampling = Sampling(temperature, top_k, top_p, seed)
    return generate_batch(params, config, [prompt_ids], max_new_tokens, sampling,
                          valid_vocab=valid_vocab, eot_id=eot_id, stop_at_eot=stop_at_eot)[0]
