"""Decode timing for `gptjax bench --decode`: time to first token and ms per later token
of gptjax's KV-cache Decoder, under the same protocol as the train-step bench (warm-up,
median of repeats, no compiles while the clock runs)."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from gptjax import model
from gptjax.bench.train_step import median_min_max, no_compiles
from gptjax.config import ModelConfig


def decode_lengths(context: int, prompt_len: int | None = None, new_tokens: int | None = None):
    """Default prompt and generation lengths that stay inside the context (no sliding)."""
    prompt = prompt_len or max(1, min(32, context // 4))
    new = new_tokens or max(2, min(128, context - prompt))
    return prompt, new


def run_decode_bench(model_cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                     repeats: int, seed: int = 0, params=None) -> dict:
    """Time to first token and ms per later token of gptjax's Decoder (greedy, exactly
    `new_tokens` ids per row), median of `repeats` after a warm-up call. `params`: any
    weights of this config (speed does not depend on the values); default: freshly
    initialised."""
    from gptjax.generation.decoder import Decoder
    from gptjax.generation.sampling import Sampling

    if new_tokens < 2:
        raise ValueError("decode timing needs at least 2 new tokens")
    if params is None:
        params = model.init(model_cfg, jax.random.PRNGKey(seed))
    params = model.decode_params(params, model_cfg)  # the decode layout once, as callers do
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, model_cfg.vocab_size, (batch, prompt_len)).tolist()

    def once():
        t0 = time.perf_counter()
        decoder = Decoder(params, model_cfg, prompts, new_tokens, Sampling(temperature=0.0))
        first = decoder.advance(0)  # fetching the ids waits for prefill + first sample
        t1 = time.perf_counter()
        rest = decoder.advance()
        t2 = time.perf_counter()
        if any(len(a) + len(b) != new_tokens for a, b in zip(first, rest)):
            raise RuntimeError("the decoder stopped early")
        return t1 - t0, t2 - t1

    t0 = time.perf_counter()
    once()  # compiles prefill and the decode loop
    warm = time.perf_counter() - t0
    runs = []
    with no_compiles("the timed decode calls") as guard:
        for _ in range(repeats):
            runs.append(once())
    ttft = [1000 * a for a, _ in runs]
    per_token = [1000 * b / (new_tokens - 1) for _, b in runs]
    total = statistics.median(a + b for a, b in runs)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "repeats": repeats, "first_call_seconds": warm,
            "ttft_ms": median_min_max(ttft), "ms_per_token": median_min_max(per_token),
            "tokens_per_s": batch * new_tokens / total, "no_recompile_guard": guard.summary()}
