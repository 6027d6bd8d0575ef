"""Instruction data (Alpaca-style records) for supervised fine-tuning: read, format, encode, batch.

The prompt layout is the one of "Build a Large Language Model (From Scratch)", ch. 7,
so models tuned here and there see the same text. Prompt and response are encoded
separately: the boundary between them is then an exact token position, which is what
prompt masking needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gptjax.errors import GptjaxError
from gptjax.finetune.cls_data import check_fractions, read_utf8

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
INSTRUCTION_MARKER = "\n\n### Instruction:\n"
INPUT_MARKER = "\n\n### Input:\n"
RESPONSE_MARKER = "\n\n### Response:\n"
JSONL_SUFFIXES = {".jsonl", ".ndjson"}


def read_records(path, answers: tuple[str, ...] = ("output",)) -> list[dict]:
    """Records {"instruction", "input", *answers} from a JSON array or a .jsonl/.ndjson
    file (preference records answer with "chosen" and "rejected").

    A missing "input" becomes ""; other keys are kept. Records are checked here so that
    a bad one is named by its 0-based index before any tokenizing starts.
    """
    path = Path(path)
    text = read_utf8(path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        raw, where = _jsonl_values(path, text)
    else:
        raw = _json_array(path, text)
        where = [""] * len(raw)
    if not raw:
        raise GptjaxError(f"{path} holds no records")
    return [_checked(path, i, record, where[i], answers) for i, record in enumerate(raw)]


def _json_array(path: Path, text: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data" and path.suffix.lower() not in JSONL_SUFFIXES:
            hint = "; for one record per line, name the file .jsonl"
        raise GptjaxError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} "
                          f"({e.msg}){hint}") from None
    if not isinstance(value, list):
        raise GptjaxError(f"{path}: expected a JSON array of records, found a "
                          f"{type(value).__name__}")
    return value


def _jsonl_values(path: Path, text: str) -> tuple[list, list[str]]:
    """The JSON value on each non-blank line, and ' (line N)' for each, for messages."""
    values, where = [], []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise GptjaxError(f"{path}: malformed JSON on line {lineno}, column {e.colno} "
                              f"({e.msg})") from None
        where.append(f" (line {lineno})")
    return values, where


def _checked(path: Path, index: int, record, where: str, answers: tuple[str, ...]) -> dict:
    name = f"{path}: record {index}{where}"
    if not isinstance(record, dict):
        raise GptjaxError(f"{name}: expected an object, found {type(record).__name__}")
    for key in ("instruction", *answers):
        if key not in record:
            raise GptjaxError(f"{name}: missing {key!r}")
    for key in ("instruction", "input", *answers):
        if key in record and not isinstance(record[key], str):
            raise GptjaxError(f"{name}: {key!r} must be a string, found "
                              f"{type(record[key]).__name__}")
    if not record["instruction"].strip():
        raise GptjaxError(f"{name}: empty instruction")
    return {**record, "input": record.get("input", "")}


def format_prompt(record: dict) -> str:
    """Preamble, instruction, input (only when non-empty), ending with RESPONSE_MARKER."""
    text = PREAMBLE + INSTRUCTION_MARKER + record["instruction"]
    if record.get("input"):
        text += INPUT_MARKER + record["input"]
    return text + RESPONSE_MARKER


def format_example(record: dict) -> tuple[str, str]:
    """(prompt ending in RESPONSE_MARKER, the reference response)."""
    return format_prompt(record), record["output"]


def split_records(n: int, fractions=(0.85, 0.05, 0.10),
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled (train, val, test) indices; train and test sizes are floored, val takes the rest."""
    train_f, _, test_f = check_fractions(fractions)
    n_train, n_test = int(n * train_f), int(n * test_f)
    n_val = n - n_train - n_test
    if min(n_train, n_val, n_test) < 1:
        raise GptjaxError(f"{n} records split by {fractions} leave an empty split "
                          f"(train {n_train}, val {n_val}, test {n_test})")
    order = np.random.default_rng(seed).permutation(n)
    # Train, then test, then val, as the book slices its list.
    return order[:n_train], order[n_train + n_test:], order[n_train:n_train + n_test]


@dataclass(frozen=True)
class EncodedExample:
    ids: np.ndarray        # int32: prompt ids + response ids + [eot]
    prompt_len: int        # number of prompt ids

    @property
    def response_len(self) -> int:
        """Response ids (with the end-of-text) left after the cut to the context."""
        return len(self.ids) - self.prompt_len


def encode_examples(records, encode: Callable[[str], list[int]], eot_id: int,
                    context_length: int) -> tuple[list[EncodedExample], int]:
    """Encode prompt + response + [eot] per record, cut to context_length + 1 ids.

    Returns the examples and how many of them were truncated.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be positive, got {context_length}")
    limit = context_length + 1  # inputs and targets are this sequence shifted by one
    examples, truncated = [], 0
    for record in records:
        prompt, response = format_example(record)
        prompt_ids = list(encode(prompt))
        ids = prompt_ids + list(encode(response)) + [eot_id]
        if len(ids) > limit:
            ids = ids[:limit]
            truncated += 1
        examples.append(EncodedExample(np.asarray(ids, dtype=np.int32),
                                       min(len(prompt_ids), len(ids))))
    return examples, truncated


def collate(examples: Sequence[EncodedExample], eot_id: int, length: int, *,
            mask_prompt: bool = False) -> dict[str, np.ndarray]:
    """Pad with eot_id and shift into inputs/targets (B, length) with per-target loss weights.

    Each example's ids x already end in their own end-of-text. A target has weight 1
    when it is a real token of x (positions 0..len(x)-2, the last being x's own
    end-of-text) and weight 0 at every padding position, so the model learns to stop
    once and padding never counts. With mask_prompt, targets that are prompt tokens
    (positions below prompt_len - 1) get weight 0 too; the first response token keeps 1.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    longest = max(len(e.ids) for e in examples)
    if length < longest - 1:
        raise ValueError(f"length {length} is too short for an example of {longest} ids "
                         f"(needs at least {longest - 1})")
    seq = np.full((len(examples), length + 1), eot_id, dtype=np.int32)
    weights = np.zeros((len(examples), length), dtype=np.float32)
    for row, example in enumerate(examples):
        n = len(example.ids)
        seq[row, :n] = example.ids
        weights[row, :max(n - 1, 0)] = 1.0
        if mask_prompt:
            weights[row, :max(example.prompt_len - 1, 0)] = 0.0
    return {"inputs": seq[:, :-1].copy(), "targets": seq[:, 1:].copy(), "weights": weights}
