"""The device side of continuous batching: `slots` rows of one preallocated KV cache, each
holding one request, all advanced by one compiled decode step.

A new request is prefilled alone (its prompt right-padded to a power-of-two bucket, so a
handful of shapes cover every prompt) into a fresh one-row cache, which `insert` copies
into a free slot's rows. Every slot starts at column 0 and keeps its own next column (the
cache's per-row `index`), so requests of different lengths share every step, and a slot's
stale columns from an earlier request sit past its index where the causal mask hides them.
Every shape is fixed by (slots, max_len, bucket), so after `warm_up` nothing recompiles.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError
from gptjax.model.kv_cache import KVCache
from gptjax.serve.row_sampling import row_keys, sample_rows

MIN_BUCKET = 16


def prompt_buckets(context: int) -> list[int]:
    """The prompt lengths prefill compiles for: powers of two from 16, and the context."""
    out, b = [], MIN_BUCKET
    while b < context:
        out.append(b)
        b *= 2
    return out + [context]


def bucket_for(n: int, context: int) -> int:
    return next(b for b in prompt_buckets(context) if b >= n)


class Sampled(NamedTuple):
    ids: np.ndarray  # (rows,) int32
    logprobs: np.ndarray  # (rows,) float32: log p(id)
    top_ids: np.ndarray | None  # (rows, 5) the most likely ids and their log-probabilities
    top_logprobs: np.ndarray | None


class Settings(NamedTuple):
    """Per-row sampling settings, as arrays (rows,)."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    count: np.ndarray  # ids drawn so far: the key of the next draw


@partial(jax.jit, static_argnames="config")
def _prefill(params, tokens_1p, length, config):
    """The logits after a right-padded prompt's last real id, and its one-row cache."""
    p = tokens_1p.shape[1]
    cache = model.init_cache(config, 1, p)
    return model.apply_cached(params, tokens_1p, jnp.arange(p)[None], cache, config,
                              logits_at=length - 1)


@partial(jax.jit, static_argnames=("valid_vocab", "truncate", "top_logprobs"))
def _first(logits_1v, settings, valid_vocab, truncate, top_logprobs):
    """A prefilled request's first id: a program of its own, so prefill compiles once per
    bucket and not per sampling variant too."""
    return sample_rows(logits_1v, row_keys(settings.seed, settings.count), settings.temperature,
                       settings.top_k, settings.top_p, valid_vocab, truncate=truncate,
                       top_logprobs=top_logprobs)


@partial(jax.jit, static_argnames="heads", donate_argnames="slots")
def _insert(slots: KVCache, one: KVCache, slot, length, heads: int) -> KVCache:
    def put(whole, part):
        return jax.lax.dynamic_update_slice(whole, part.astype(whole.dtype), (slot * heads, 0, 0))
    return slots._replace(k=tuple(map(put, slots.k, one.k)), v=tuple(map(put, slots.v, one.v)),
                          index=slots.index.at[slot].set(length))


@partial(jax.jit, static_argnames=("config", "valid_vocab", "truncate", "top_logprobs"),
         donate_argnames="cache")
def _decode(params, cache: KVCache, last_s, active_s, settings, config, valid_vocab, truncate,
            top_logprobs):
    # The scheduler keeps every request inside max_len; the clip only keeps a free slot's
    # column in range, where a position past the table would be NaN.
    positions_s1 = jnp.minimum(cache.index, cache.valid.shape[1] - 1)[:, None]
    logits_sv, cache = model.apply_cached(params, last_s[:, None], positions_s1, cache, config)
    keys = row_keys(settings.seed, settings.count)
    sampled = sample_rows(logits_sv, keys, settings.temperature, settings.top_k, settings.top_p,
                          valid_vocab, truncate=truncate, top_logprobs=top_logprobs)
    # A free slot computes too (the shapes are fixed); its column stays at 0, in range.
    return sampled, cache._replace(index=jnp.where(active_s, cache.index, 0))


class Engine:
    """`slots` requests' KV caches, advanced together. Not thread-safe: one caller (the
    scheduler's thread) drives it."""

    def __init__(self, params, config: ModelConfig, slots: int, valid_vocab: int,
                 max_len: int | None = None):
        """`max_len` (default: the context) is the most tokens a request may hold, prompt
        and answer: every step attends over that many columns of every slot, so a server
        whose requests are short runs faster with a shorter one."""
        if max_len is not None and not 1 < max_len <= config.context_length:
            raise GptjaxError(f"a served length of {max_len} must be in 2..{config.context_length} "
                              "(the model's context)")
        self.params = model.decode_params(params, config)
        self.config, self.slots, self.valid_vocab = config, slots, valid_vocab
        self.max_len = max_len or config.context_length
        self.cache = model.init_cache(config, slots, self.max_len)._replace(
            index=jnp.zeros(slots, jnp.int32))
        self.last = np.zeros(slots, np.int32)  # the id each slot feeds next
        self.active = np.zeros(slots, bool)
        self.lengths = np.zeros(slots, np.int32)  # columns each slot has written
        self.settings = Settings(np.zeros(slots, np.float32), np.zeros(slots, np.int32),
                                 np.ones(slots, np.float32), np.zeros(slots, np.uint32),
                                 np.zeros(slots, np.int32))

    @staticmethod
    def _variant(settings: Settings, active, logprobs: bool) -> dict:
        truncating = (settings.top_k[active] > 0) | (settings.top_p[active] < 1)
        return {"truncate": bool(truncating.any()), "top_logprobs": logprobs}

    def start(self, slot: int, prompt: list[int], temperature: float, top_k: int, top_p: float,
              seed: int, logprobs: bool = False) -> Sampled:
        """Prefill `prompt` into `slot` and draw its first id."""
        n = len(prompt)
        tokens = np.zeros((1, bucket_for(n, self.max_len)), np.int32)
        tokens[0, :n] = prompt
        one = Settings(*(np.asarray([v], a.dtype) for v, a in
                         zip((temperature, top_k, top_p, seed, 0), self.settings)))
        logits, cache = _prefill(self.params, tokens, np.int32(n), config=self.config)
        sampled = _first(logits, one, valid_vocab=self.valid_vocab,
                         **self._variant(one, np.ones(1, bool), logprobs))
        self.cache = _insert(self.cache, cache, np.int32(slot), np.int32(n),
                             heads=self.config.n_head)
        for field, v in zip(Settings._fields, (temperature, top_k, top_p, seed, 1)):
            getattr(self.settings, field)[slot] = v
        self.active[slot], self.lengths[slot] = True, n
        out = _host(sampled)
        self.last[slot] = out.ids[0]
        return out

    def step(self, logprobs: bool = False) -> Sampled:
        """One decode step for every slot (free slots' ids are meaningless)."""
        sampled, self.cache = _decode(self.params, self.cache, self.last, self.active, self.settings,
                                      config=self.config, valid_vocab=self.valid_vocab,
                                      **self._variant(self.settings, self.active, logprobs))
        out = _host(sampled)
        self.last = np.where(self.active, out.ids, 0).astype(np.int32)
        self.lengths += self.active
        self.settings.count[self.active] += 1
        return out

    def free(self, slot: int) -> None:
        self.active[slot] = False
        self.lengths[slot] = 0

    def warm_up(self) -> None:
        """Compile every prefill bucket and sampling variant now, so that no request waits
        for a compile."""
        for b in prompt_buckets(self.max_len):
            self.start(0, [0] * b, 1.0, 0, 1.0, 0)
        for top_k, logprobs in ((0, False), (1, False), (0, True), (1, True)):
            self.start(0, [0], 1.0, top_k, 1.0, 0, logprobs)
            self.step(logprobs)
        self.free(0)
        self.settings.top_k[:] = 0


def _host(sampled) -> Sampled:
    ids, logprobs, top = sampled
    top_lp, top_ids = (np.asarray(top[0]), np.asarray(top[1])) if top is not None else (None, None)
    return Sampled(np.asarray(ids), np.asarray(logprobs), top_ids, top_lp)
