"""Preference data for DPO: {instruction, input, chosen, rejected} records, encoded as two
instruction examples that share their prompt, and batched in pairs.

Each answer is formatted and cut exactly as finetune-sft does (gptjax.finetune.sft_data),
so a model instruction-tuned there sees the same text here. What DPO compares is the
log-probability of each answer's tokens given the prompt: the prompt's tokens carry no
weight, and an answer the context cuts away entirely cannot be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gptjax.errors import GptjaxError
from gptjax.finetune import batching, sft_data


@dataclass(frozen=True)
class Pair:
    chosen: sft_data.EncodedExample
    rejected: sft_data.EncodedExample


def read_preferences(path, drop_identical: bool = False) -> tuple[list[dict], int]:
    """Records with string "chosen" and "rejected" answers, checked by index, and how many
    were left out. Identical answers teach nothing: refused, naming them, unless
    `drop_identical` (the book's set has 6 such records of 1,100)."""
    records = sft_data.read_records(path, answers=("chosen", "rejected"))
    same = [i for i, r in enumerate(records) if r["chosen"] == r["rejected"]]
    if same and not drop_identical:
        more = f" (and {len(same) - 1} more: {', '.join(map(str, same[1:6]))}" \
               f"{', ...' if len(same) > 6 else ''})" if len(same) > 1 else ""
        raise GptjaxError(f"{path}: record {same[0]}{more}: chosen and rejected are the same "
                          "text, so there is no preference to learn; fix them, or pass "
                          "--drop-identical to leave them out")
    kept = [r for i, r in enumerate(records) if i not in set(same)]
    return kept, len(same)


def encode_pairs(records, encode, eot_id: int, context_length: int) -> tuple[list[Pair], int]:
    """Both answers of each record, as finetune-sft encodes an answer; also how many of the
    answers were cut to the context."""
    encoded, cut = {}, 0
    for which in ("chosen", "rejected"):
        answered = [{**r, "output": r[which]} for r in records]
        encoded[which], truncated = sft_data.encode_examples(answered, encode, eot_id, context_length)
        cut += truncated
    return [Pair(c, r) for c, r in zip(encoded["chosen"], encoded["rejected"])], cut


def comparable(pairs: list[Pair]) -> np.ndarray:
    """Whether each pair keeps at least one token of both answers within the context, and
    the cut left them different."""
    return np.array([p.chosen.response_len > 0 and p.rejected.response_len > 0
                     and not np.array_equal(p.chosen.ids, p.rejected.ids) for p in pairs])


def pair_batch(pairs: list[Pair], eot: int, rows: int, context: int) -> dict:
    """{"chosen", "rejected"}: collated answers (weights on answer tokens only), padded to
    `rows` pairs; "pair_weight" is 1 for the real pairs."""
    length = batching.bucket(max(max(len(p.chosen.ids), len(p.rejected.ids)) for p in pairs) - 1,
                             context)
    out = {}
    for which in ("chosen", "rejected"):
        b = sft_data.collate([getattr(p, which) for p in pairs], eot, length, mask_prompt=True)
        missing = rows - len(pairs)
        if missing:
            b = {k: np.concatenate([v, np.zeros((missing, length), v.dtype)]) for k, v in b.items()}
        out[which] = b
    out["pair_weight"] = (np.arange(rows) < len(pairs)).astype(np.float32)
    return out
