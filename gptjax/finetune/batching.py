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
    return min(context, max(MIN_BUCKET, 1 << max(int(length) - 1, 0).bit_length()))


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


def by_length(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches: every row once, shortest first, so each batch pads little."""
    idx = np.argsort(lengths, kind="stable")
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def grouped_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  group: int = 32) -> list[np.ndarray]:
    """Training batches of rows with similar lengths, in random order.

    Rows are shuffled, cut into groups of `group` batches, sorted by length within each
    group and then batched, and the batches shuffled: still a fresh random partition every
    epoch, but most batches pad to a short bucket instead of the longest text's (on the
    SMS spam set, half the padded tokens of plain shuffling). The last partial batch
    is dropped.
    """
    idx = rng.permutation(len(lengths))
    idx = idx[:len(idx) - len(idx) % batch_size]
    span = group * batch_size
    for start in range(0, len(idx), span):
        part = idx[start:start + span]
        idx[start:start + span] = part[np.argsort(lengths[part], kind="stable")]
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_rows(seqs: Sequence[np.ndarray], rows: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 (rows, length), lengths int32 (rows,)); missing rows get length 1."""
    tokens = np.full((rows, length), pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, seq in enumerate(seqs):
        tokens[r, :len(seq)] = seq
        lengths[r] = len(seq)
    return tokens, lengths
