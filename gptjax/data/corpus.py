"""Reading corpora as streams of bounded text pieces, one document at a time.

Inputs are text files, folders of them and JSONL files with a text field; the embedded
default is the Python reference documentation shipped in the standard library. Bytes that
are not UTF-8 become U+FFFD and are counted. Long documents are cut only where GPT-2's
pre-tokenizer would split anyway (before " X" after a non-space), so chunked BPE gives
the same ids as encoding the whole document.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gptjax.errors import GptjaxError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
READ_BYTES = 1 << 20
PIECE_CHARS = 1 << 20  # text handed to the tokenizer at once (about 1M characters)

_replaced = [0]


def _count_and_replace(err: UnicodeDecodeError):
    _replaced[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("gptjax.count", _count_and_replace)


@dataclass
class Source:
    path: str
    sha256: str
    bytes: int
    documents: int = 0


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Expand folders (recursively, sorted) and check every file can be read."""
    if not inputs:
        raise GptjaxError("no input paths given")
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise GptjaxError(f"folder {p} holds no .txt/.md/.rst/.jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise GptjaxError(f"input not found: {p}")
    for f in files:
        try:
            with open(f, "rb"):
                pass
        except OSError as e:
            raise GptjaxError(f"cannot read {f}: {e.strerror}") from None
    return files


class Corpus:
    """Iterates (text_piece, ends_document) over its inputs and records their sources."""

    def __init__(self, files: list[Path], text_field: str = "text", piece_chars: int | None = None):
        self.files = files
        self.text_field = text_field
        self.piece_chars = piece_chars or PIECE_CHARS
        self.sources: list[Source] = []
        self.replaced_bytes = 0
        self.bytes_read = 0  # input bytes consumed so far, for progress bars

    def total_bytes(self) -> int:
        """What `bytes_read` reaches after a whole pass: a progress bar's total."""
        return sum(p.stat().st_size for p in self.files)

    def pieces(self) -> Iterator[tuple[str, bool]]:
        self.sources, self.replaced_bytes, self.bytes_read = [], 0, 0
        for path in self.files:
            src = Source(str(path), "", path.stat().st_size)
            self.sources.append(src)
            digest = hashlib.sha256()
            before = _replaced[0]
            if path.suffix.lower() in JSONL_SUFFIXES:
                docs = self._jsonl_documents(path, digest)
            else:
                docs = [self._text_chunks(path, digest)]
            for doc in docs:
                src.documents += 1
                yield from _with_document_end(_safe_pieces(doc, self.piece_chars))
            src.sha256 = digest.hexdigest()
            self.replaced_bytes += _replaced[0] - before

    def _text_chunks(self, path: Path, digest) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="gptjax.count")
        with open(path, "rb") as fh:
            while block := fh.read(READ_BYTES):
                digest.update(block)
                self.bytes_read += len(block)
                yield decoder.decode(block)
            yield decoder.decode(b"", final=True)

    def _jsonl_documents(self, path: Path, digest) -> Iterator[Iterator[str]]:
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                digest.update(line)
                self.bytes_read += len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8", errors="gptjax.count"))
                except json.JSONDecodeError as e:
                    raise GptjaxError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
                    raise GptjaxError(f"{path}:{lineno}: no string field {self.text_field!r}")
                yield iter([_without_lone_surrogates(record[self.text_field])])


class EmbeddedCorpus(Corpus):
    """The Python reference documentation topics from the standard library (~465K chars)."""

    def __init__(self):
        super().__init__([])

    def total_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in _topics().values())

    def pieces(self) -> Iterator[tuple[str, bool]]:
        topics = _topics()
        self.bytes_read = 0  # a second pass (char vocabulary, then tokens) counts afresh
        digest = hashlib.sha256()
        names = sorted(topics)
        for name in names:
            raw = topics[name].encode("utf-8")
            digest.update(raw)
            self.bytes_read += len(raw)
            yield from _with_document_end(_safe_pieces(iter([topics[name]]), self.piece_chars))
        version = ".".join(map(str, sys.version_info[:3]))
        size = sum(len(topics[n].encode("utf-8")) for n in names)
        self.sources = [Source(f"pydoc_data.topics (Python {version})", digest.hexdigest(),
                               size, len(names))]


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise GptjaxError("this Python has no pydoc_data module for the embedded corpus; "
                          "prepare your own with `gptjax prepare` and pass --data") from None
    return topics


def _without_lone_surrogates(text: str) -> str:
    """JSON may escape unpaired UTF-16 surrogates ("\\ud800"), which no encoder accepts."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        _replaced[0] += fixed.count("\ufffd") - text.count("\ufffd")
        return fixed


def _with_document_end(pieces: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Mark the last piece of a document; an empty document yields one empty end marker."""
    prev = None
    for piece in pieces:
        if prev is not None:
            yield prev, False
        prev = piece
    yield (prev or ""), True


def _safe_pieces(chunks: Iterator[str], piece_chars: int) -> Iterator[str]:
    """Re-cut a stream of text chunks into pieces of about piece_chars at safe boundaries."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        while len(buf) >= 2 * piece_chars:
            cut = _safe_cut(buf, piece_chars)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


_SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


def _safe_cut(text: str, target: int) -> int:
    """Index in [target/2, 2*target) just before a lone space or newline between non-spaces.

    GPT-2's pre-tokenizer starts a new piece at such a character whatever surrounds it,
    so cutting there keeps BPE ids identical. With no such place (over a million
    characters without a lone space or newline) we cut at `target`; ids near that one
    cut may then differ from whole-text encoding, and tiktoken is spared a pathological
    input.
    """
    lo, hi, width = target // 2, min(len(text), 2 * target), 4096
    while True:  # look in growing windows from the end: usually a few KiB suffice
        start = max(lo, hi - width)
        last = None
        for last in _SAFE_CUT.finditer(text, start, hi):
            pass
        if last:
            return last.start()
        if start == lo:
            return target
        width *= 16
