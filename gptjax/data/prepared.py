"""Prepared data read back: the token files `gptjax prepare` wrote, memory-mapped, with
their meta.json checked (sizes, dtype, and token ids inside the vocabulary: an id past
the embedding table would give NaN activations silently)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptjax.data import tokenizer as tok
from gptjax.errors import GptjaxError

SCAN_TOKENS = 1 << 24


@dataclass(frozen=True)
class PreparedData:
    path: Path
    meta: dict
    train: np.ndarray  # memmap, uint16/uint32
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self, gpt2_ranks: str | None = None) -> tok.Tokenizer:
        return tok.from_spec(self.meta["tokenizer"], gpt2_ranks)


def load_prepared(path: str | Path, check_ids: bool = True) -> PreparedData:
    """Open a `gptjax prepare` folder; token ids are checked against the vocabulary."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise GptjaxError(f"{path} is not prepared data (no meta.json); run `gptjax prepare` first")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        counts = {name: int(meta[f"{name}_tokens"]) for name in ("train", "val")}
    except KeyError as e:
        raise GptjaxError(f"{meta_path} is malformed: it has no {e} field") from None
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise GptjaxError(f"{meta_path} is malformed: {e}") from None
    splits = {name: _open_tokens(path / f"{name}.bin", dtype, n) for name, n in counts.items()}
    data = PreparedData(path, meta, splits["train"], splits["val"])
    if check_ids:
        for name, tokens in splits.items():
            _check_ids(tokens, data.vocab_size, path / f"{name}.bin")
    return data


def _open_tokens(file: Path, dtype: np.dtype, expected: int) -> np.ndarray:
    if not file.is_file():
        raise GptjaxError(f"missing token file {file}")
    n = file.stat().st_size // dtype.itemsize
    if n != expected or file.stat().st_size % dtype.itemsize:
        raise GptjaxError(f"{file} holds {n} tokens but meta.json says {expected}")
    if n == 0:
        return np.zeros(0, dtype)
    return np.memmap(file, dtype=dtype, mode="r")


def _check_ids(tokens: np.ndarray, vocab_size: int, file: Path) -> None:
    # An id >= vocab would make the embedding lookup return NaN silently inside jit.
    for start in range(0, len(tokens), SCAN_TOKENS):
        top = int(tokens[start:start + SCAN_TOKENS].max())
        if top >= vocab_size:
            raise GptjaxError(f"{file} contains token id {top}, outside the vocabulary of {vocab_size}")
