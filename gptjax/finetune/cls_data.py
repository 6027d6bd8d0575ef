"""Labelled texts for classification: reading CSV/TSV/JSONL, stratified splits, balancing.

Files are read whole (classification sets are megabytes, not gigabytes) and decoded as
strict UTF-8: a bad byte is reported with its line, never replaced, because a silently
altered text would train and evaluate on something the user never wrote.
TSV is split on tabs with no quoting at all; real TSV files such as the SMS Spam
Collection hold texts with unbalanced double quotes that a CSV reader would merge
across lines.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from gptjax.errors import GptjaxError

FORMATS = ("csv", "tsv", "jsonl")
SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
                  ".jsonl": "jsonl", ".ndjson": "jsonl"}
HEADERLESS_HINT = ("for a file without a header, give column numbers, "
                   "e.g. --label-column 0 --text-column 1")


@dataclass(frozen=True)
class LabeledTexts:
    texts: list[str]
    labels: np.ndarray          # int32 class index per text
    classes: tuple[str, ...]    # class names sorted as strings; label i means classes[i]


def read_labeled(path, *, text_column: str = "text", label_column: str = "label",
                 fmt: str | None = None) -> LabeledTexts:
    """Read (text, label) pairs from a CSV, TSV or JSONL file; classes sorted as strings.

    Columns are header names, or 0-based column numbers given as digit strings for files
    without a header. Numeric labels are kept as strings, so "10" sorts before "2".
    """
    path = Path(path)
    fmt = _format_of(path, fmt)
    text_col, label_col = str(text_column), str(label_column)
    by_index = _columns_by_index(text_col, label_col)
    if text_col == label_col:
        raise GptjaxError(f"the text and label columns are both {text_col!r}")
    if fmt == "jsonl" and by_index:
        raise GptjaxError(f"{path}: JSONL records have named fields; give field names, "
                          f"not column numbers")
    text = read_utf8(path)
    if fmt == "jsonl":
        pairs = _jsonl_pairs(path, text, text_col, label_col)
    else:
        rows = _tsv_rows(text) if fmt == "tsv" else _csv_rows(path, text)
        pairs = _table_pairs(path, rows, text_col, label_col, by_index, fmt)
    return _labeled(path, pairs)


def read_utf8(path: Path) -> str:
    """The file's text as strict UTF-8 (a leading BOM dropped); a bad byte's line is reported."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise GptjaxError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise GptjaxError(f"{path}: not UTF-8: byte 0x{raw[e.start]:02x} on line {line} "
                          f"(byte offset {e.start})") from None
    return text.removeprefix("\ufeff")


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise GptjaxError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    found = SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None:
        raise GptjaxError(f"cannot tell the format of {path} from its suffix; name it "
                          f"{', '.join(SUFFIX_FORMATS)} or give the format (csv, tsv or jsonl)")
    return found


def _columns_by_index(text_col: str, label_col: str) -> bool:
    """True for two column numbers, False for two names; a mix is ambiguous."""
    numeric = (text_col.isdigit(), label_col.isdigit())
    if numeric[0] != numeric[1]:
        raise GptjaxError(f"give both columns as names or both as numbers, not a mix "
                          f"(text column {text_col!r}, label column {label_col!r})")
    return numeric[0]


def _tsv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """(1-based line, fields) per line, split on every tab with no quoting."""
    # Splitting on "\n" only: str.splitlines would also break on form feeds and
    # U+2028 that can sit inside a text.
    for lineno, line in enumerate(text.split("\n"), 1):
        yield lineno, line.removesuffix("\r").split("\t")


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(1-based first line, fields) per CSV record; quoted fields may span lines."""
    # strict: an unclosed quote at the end is an error, not one giant final text.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise GptjaxError(f"{path}: malformed CSV in the record starting on line {start} "
                              f"({e}); an unclosed double quote is the usual cause") from None
        yield start, row


def _is_blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _table_pairs(path: Path, rows, text_col: str, label_col: str, by_index: bool,
                 fmt: str) -> Iterator[tuple[int, str, object]]:
    """(line, text, label) from CSV/TSV rows; every row must have the first row's field count."""
    rows = ((lineno, row) for lineno, row in rows if not _is_blank(row))
    first = next(rows, None)
    if first is None:
        return
    first_line, first_row = first
    width = len(first_row)
    if by_index:
        t, lab = int(text_col), int(label_col)
        if max(t, lab) >= width:
            raise GptjaxError(f"{path}: column {max(t, lab)} does not exist; line {first_line} "
                              f"has {width} field(s), numbered from 0")
        rows = _chain(first, rows)
    else:
        t, lab = (_header_position(path, first_row, name) for name in (text_col, label_col))
    for lineno, row in rows:
        if len(row) != width:
            hint = " (a tab inside a text?)" if fmt == "tsv" and len(row) > width else ""
            raise GptjaxError(f"{path}: line {lineno} has {len(row)} field(s), but line "
                              f"{first_line} has {width}{hint}")
        yield lineno, row[t], row[lab]


def _chain(first, rest):
    yield first
    yield from rest


def _header_position(path: Path, header: list[str], name: str) -> int:
    names = [h.strip() for h in header]
    if names.count(name) > 1:
        raise GptjaxError(f"{path}: column {name!r} appears more than once in the header")
    if name not in names:
        shown = ", ".join(names)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        hint = f" ({HEADERLESS_HINT})" if _looks_like_data(names) else ""
        raise GptjaxError(f"{path} has no column {name!r}; its header is: {shown}{hint}")
    return names.index(name)


def _looks_like_data(header: list[str]) -> bool:
    """Two columns (the usual label+text shape) or a field unlike a column name."""
    return len(header) == 2 or any(not h or len(h) > 40 for h in header)


def _jsonl_pairs(path: Path, text: str, text_col: str,
                 label_col: str) -> Iterator[tuple[int, str, object]]:
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptjaxError(f"{path}: malformed JSON on line {lineno} ({e.msg})") from None
        if not isinstance(record, dict):
            raise GptjaxError(f"{path}: line {lineno} is not a JSON object")
        for field in (text_col, label_col):
            if field not in record:
                raise GptjaxError(f"{path}: line {lineno} has no field {field!r}")
        if not isinstance(record[text_col], str):
            raise GptjaxError(f"{path}: field {text_col!r} on line {lineno} is not a string")
        label = record[label_col]
        # bool is an int subclass, but true/false as a class name is more likely a mistake.
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise GptjaxError(f"{path}: field {label_col!r} on line {lineno} must be a string "
                              f"or an integer")
        yield lineno, record[text_col], str(label)


def _labeled(path: Path, pairs) -> LabeledTexts:
    texts, names = [], []
    for lineno, text, label in pairs:
        if not text.strip():
            raise GptjaxError(f"{path}: empty text on line {lineno}")
        label = label.strip()
        if not label:
            raise GptjaxError(f"{path}: empty label on line {lineno}")
        texts.append(text)
        names.append(label)
    if not texts:
        raise GptjaxError(f"{path} holds no examples")
    classes = tuple(sorted(set(names)))
    if len(classes) < 2:
        raise GptjaxError(f"{path}: classification needs at least two classes, "
                          f"found only {classes[0]!r}")
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[n] for n in names], dtype=np.int32)
    return LabeledTexts(texts, labels, classes)


def check_fractions(fractions, count: int = 3) -> tuple[float, ...]:
    """`count` positive split fractions summing to 1 (within 1e-9), else GptjaxError."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != count:
        raise GptjaxError(f"give {count} split fractions (train, val, test), got {len(fractions)}")
    if any(not f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        shown = ", ".join(f"{f:g}" for f in fractions)
        raise GptjaxError(f"split fractions must be positive and sum to 1, got {shown}")
    return fractions


def stratified_split(labels: np.ndarray, fractions=(0.7, 0.1, 0.2),
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled (train, val, test) indices keeping each class's share in every split."""
    fractions = check_fractions(fractions)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise GptjaxError("stratified_split needs a non-empty 1-D array of labels")
    rng = np.random.default_rng(seed)  # PCG64
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) < 3:
            raise GptjaxError(f"class {cls} has {len(members)} example(s); every class needs at "
                              f"least 3 so that train, val and test each get one")
        sizes = _apportion(len(members), fractions)
        for part, piece in zip(parts, np.split(members, np.cumsum(sizes)[:-1])):
            part.append(piece)
    train, val, test = (rng.permutation(np.concatenate(p)) for p in parts)
    return train, val, test


def _apportion(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split n into integer sizes near n*f (largest remainders), each at least 1 (n >= len)."""
    exact = [n * f for f in fractions]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])
    for i in by_remainder[:n - sum(sizes)]:
        sizes[i] += 1
    for i in range(len(sizes)):
        if sizes[i] == 0:  # a tiny class: take one from the largest split
            sizes[max(range(len(sizes)), key=sizes.__getitem__)] -= 1
            sizes[i] = 1
    return sizes


def balance(indices: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Undersample every class among `indices` to the smallest one's size; shuffled result."""
    indices = np.asarray(indices)
    if len(indices) == 0:
        return indices.copy()
    rng = np.random.default_rng(seed)
    of_index = np.asarray(labels)[indices]
    classes, counts = np.unique(of_index, return_counts=True)
    keep = [rng.choice(indices[of_index == cls], size=counts.min(), replace=False)
            for cls in classes]
    return rng.permutation(np.concatenate(keep))
