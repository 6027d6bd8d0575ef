"""Padded batches of variable-length token sequences, in a few bucketed lengths.

Each batch is padded to the next power of two above its longest row (at least 16, at
most the context), so a run compiles a handful of shapes rather than one per length, and
short texts do not pay for the longest one. Batches keep a fixed number of rows; rows
that only fill out the last batch have weight 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gptjax.errors import GptjaxError

MIN_BUCKET = 16


def bucket(length: int, context: int) -> int:
    """The padded length for a longest row of `length` tokens."""
    return min(context, max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()))


def encode_all(texts: Sequence[str], tokenizer, limit: int, what: str = "text") -> tuple[list[np.ndarray], int]:
    """Token ids of each text, cut to `limit` ids; also how many were cut."""
    out, cut = [], 0
    for i, text in enumerate(texts):
        try:
            ids = tokenizer.encode(text)
        except GptjaxError as e:
            raise GptjaxError(f"{what} {i}: {e}; the starting model's {tokenizer.spec()['kind']} "
                              "tokenizer cannot encode it") from None
        if len(ids) > limit:
            ids, cut = ids[:limit], cut + 1
        if not ids:
            raise GptjaxError(f"{what} {i} encodes to no tokens")
        out.append(np.asarray(ids, np.int32))
    return out, cut


def order(n: int, batch_size: int, rng: np.random.Generator | None, drop_last: bool) -> list[np.ndarray]:
    """Row indices of each batch: shuffled when `rng` is given; the last partial batch is
    dropped for training (`drop_last`) and kept for evaluation."""
    idx = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [idx[i:i + batch_size] for i in range(0, stop, batch_size)]


def pad_rows(seqs: Sequence[np.ndarray], rows: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 (rows, length), lengths int32 (rows,)); missing rows get length 1."""
    tokens = np.full((rows, length), pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, seq in enumerate(seqs):
        tokens[r, :len(seq)] = seq
        lengths[r] = len(seq)
    return tokens, lengths
