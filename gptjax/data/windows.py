"""Window sampling as pure functions of (seed, step).

A batch is fully determined by the sampler settings and the step, so a resumed run sees
exactly the batches an uninterrupted one would, and each host of a multi-host job can
build just its rows of the global batch. Offsets are Python/numpy 64-bit integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gptjax.errors import GptjaxError


@dataclass(frozen=True)
class WindowSampler:
    """Windows of `context` inputs and next-token targets from one token array.

    kind="random": nanoGPT-style uniform offsets drawn from a generator seeded by
    (seed, step). kind="sliding": the book's windows at 0, stride, 2*stride, ...; the
    stream of windows is cut into batches and, with shuffle, each epoch visits them in a
    seeded pseudo-random permutation (a Feistel network: no memory per window).
    """

    n_tokens: int
    context: int
    batch_size: int
    kind: str = "random"
    stride: int = 0
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        check_window(self.n_tokens, self.context)
        if self.kind not in ("random", "sliding"):
            raise GptjaxError(f"unknown sampler {self.kind!r}; choose random or sliding")

    @property
    def step_stride(self) -> int:
        return self.stride or self.context

    @property
    def n_windows(self) -> int:
        """Sliding windows whose target still fits: starts 0, s, 2s, ... < n_tokens - context."""
        return (self.n_tokens - self.context - 1) // self.step_stride + 1

    def starts(self, step: int) -> np.ndarray:
        """Start offsets (int64) of the batch_size windows used at `step`."""
        if self.kind == "random":
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, self.n_tokens - self.context, size=self.batch_size, dtype=np.int64)
        n = self.n_windows
        g = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epoch, index = np.divmod(g, n)
        if self.shuffle:
            for e in np.unique(epoch):
                rows = epoch == e
                index[rows] = permute(index[rows], n, (self.seed, int(e)))
        return index * self.step_stride


def check_window(n_tokens: int, context: int) -> None:
    if n_tokens < context + 1:
        raise GptjaxError(f"{n_tokens} tokens are fewer than one window of "
                          f"context_length + 1 = {context + 1}")


def window_count(n_tokens: int, context: int) -> int:
    """How many non-overlapping windows (inputs and shifted targets) the tokens hold."""
    check_window(n_tokens, context)
    return (n_tokens - context - 1) // context + 1


def permute(index: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """A seeded pseudo-random permutation of range(n), applied to `index`.

    Four Feistel rounds over the smallest even number of bits covering n form a
    permutation of that power-of-two domain; values that land at or beyond n are sent
    through again ("cycle walking"), which keeps the result a permutation of range(n).
    """
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng([*key, 0x5EED]).integers(0, 2**half, size=4, dtype=np.uint64)

    def rounds(x):
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            h = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
            left, right = right, left ^ (h & mask)
        return (left << np.uint64(half)) | right

    out = rounds(index.astype(np.uint64))
    while (far := out >= n).any():
        out[far] = rounds(out[far])
    return out.astype(np.int64)


def gather(tokens: np.ndarray, starts: np.ndarray, context: int) -> dict[str, np.ndarray]:
    """Inputs tokens[s:s+T] and targets tokens[s+1:s+T+1] for each start, as int32."""
    rows = np.stack([np.asarray(tokens[s:s + context + 1]) for s in starts]).astype(np.int32)
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def eval_batches(tokens: np.ndarray, context: int, batch_size: int, max_batches: int) -> list[dict]:
    """Fixed validation batches of consecutive non-overlapping windows.

    The last batch is padded with zero-weight rows so every batch has the same shape.
    """
    n_rows = min(max_batches * batch_size, window_count(len(tokens), context))
    starts = np.arange(n_rows, dtype=np.int64) * context
    batches = []
    for lo in range(0, n_rows, batch_size):
        chunk = starts[lo:lo + batch_size]
        real = len(chunk)
        batch = gather(tokens, np.concatenate([chunk, np.zeros(batch_size - real, np.int64)]), context)
        batch["weights"] = np.zeros((batch_size, context), np.float32)
        batch["weights"][:real] = 1.0
        batches.append(batch)
    return batches
