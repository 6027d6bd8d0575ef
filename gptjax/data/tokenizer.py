"""Tokenizers behind one small interface: GPT-2 BPE (tiktoken), characters, bytes.

Each tokenizer encodes text as *ordinary* text: a literal "<|endoftext|>" in a corpus is
just characters. The end-of-text id is only ever inserted explicitly, between documents.
A tokenizer is described by a JSON-able `spec` stored with prepared data and runs, so
that data and model can be checked for agreement and the tokenizer rebuilt.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Protocol

import numpy as np

from gptjax.config import TOKENIZER_KINDS
from gptjax.errors import GptjaxError

EOT_TEXT = "<|endoftext|>"
GPT2_RANKS_ENV = "GPTJAX_GPT2_RANKS"
# sha256 of OpenAI's r50k_base / GPT-2 ranks file, the hash tiktoken itself checks.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT_ID = 50256
KINDS = TOKENIZER_KINDS


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def spec(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus an end-of-text id 256."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": self.kind}


class CharTokenizer:
    """One id per distinct character of the corpus (sorted), then end-of-text."""

    kind = "char"

    def __init__(self, chars: str):
        if not chars:
            raise GptjaxError("a character tokenizer needs a non-empty vocabulary")
        self.chars = "".join(sorted(set(chars)))
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self.vocab_size = len(self.chars) + 1
        self.eot_id = len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, cps)
        known = ids < len(self._codepoints)
        known[known] = self._codepoints[ids[known]] == cps[known]
        if not known.all():
            missing = sorted({chr(c) for c in cps[~known]})[:10]
            raise GptjaxError(f"characters not in the vocabulary: {missing!r}")
        return ids.astype(np.int32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if 0 <= i < n)

    def spec(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2 BPE through tiktoken (ids identical to tiktoken's "gpt2" encoding)."""

    kind = "gpt2"
    vocab_size = 50257
    eot_id = GPT2_EOT_ID

    def __init__(self, ranks_path: str | os.PathLike | None = None):
        self._enc = _load_gpt2_encoding(ranks_path)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([i for i in ids if 0 <= i < self.vocab_size])

    def spec(self) -> dict:
        return {"kind": self.kind}

    def token_bytes(self) -> list[bytes]:
        """The bytes of every BPE id below eot_id, in id (= merge rank) order."""
        return [self._enc.decode_single_token_bytes(i) for i in range(self.eot_id)]


def _load_gpt2_encoding(ranks_path):
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str

    path = ranks_path or os.environ.get(GPT2_RANKS_ENV)
    if path:
        if not os.path.isfile(path):
            raise GptjaxError(f"GPT-2 ranks file not found: {path}")
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        if digest != GPT2_RANKS_SHA256:
            raise GptjaxError(f"{path} is not the GPT-2 ranks file (sha256 {digest[:12]}..., "
                              f"expected {GPT2_RANKS_SHA256[:12]}...)")
        ranks = tiktoken.load.load_tiktoken_bpe(str(path))
        return tiktoken.Encoding(
            name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: GPT2_EOT_ID}, explicit_n_vocab=50257,
        )
    try:
        # r50k_base is GPT-2's vocabulary as one hash-checked file; tiktoken caches it.
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # requests/urllib errors vary by version; all mean "unavailable"
        raise GptjaxError(
            "GPT-2 BPE ranks are unavailable (no network?): pass --gpt2-ranks FILE or set "
            f"{GPT2_RANKS_ENV}=FILE to tiktoken's r50k_base/gpt2 ranks file "
            f"(sha256 {GPT2_RANKS_SHA256[:12]}...) [{type(e).__name__}]"
        ) from None


def from_spec(spec: dict, gpt2_ranks: str | None = None) -> Tokenizer:
    """Rebuild a tokenizer from its stored spec."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer(gpt2_ranks)
    raise GptjaxError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")
