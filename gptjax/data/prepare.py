"""`gptjax prepare`: stream a corpus into train/val token files plus meta.json.

Memory stays bounded: text is read in pieces of about 1M characters, encoded in order by
a pool of worker processes (tiktoken holds the GIL on a standard CPython, so threads do not
scale), and tokens are appended to one file that is split at the end (the last
`val_fraction` of tokens become validation, as in nanoGPT). Small corpora are encoded in
this process, where starting workers would cost more than it saves.
Everything is written into a temporary sibling folder that is renamed into place only
when complete, so a failed prepare leaves nothing behind and overwrites nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptjax import config as C
from gptjax.data import tokenizer as tok
from gptjax.data.corpus import Corpus, EmbeddedCorpus, resolve_inputs
from gptjax.data.prepared import PreparedData, load_prepared
from gptjax.errors import GptjaxError

FORMAT_VERSION = 1
COPY_TOKENS = 1 << 24
PARALLEL_MIN_BYTES = 4 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare(inputs: list[str] | None, out_dir: str | os.PathLike, tokenizer: str = "gpt2", *,
            val_fraction: float = 0.1, gpt2_ranks: str | None = None, text_field: str = "text",
            workers: int = 1, progress: bool = True) -> dict:
    """Tokenize `inputs` (None = the embedded corpus) into `out_dir`; returns meta.

    workers > 1 encodes corpora over 4 MiB in that many spawned processes; as with any
    multiprocessing, a script that calls this must guard its entry point with
    `if __name__ == "__main__":`.
    """
    out = Path(out_dir)
    if tokenizer not in tok.KINDS:
        raise GptjaxError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(tok.KINDS)}")
    if not 0.0 < val_fraction < 1.0:
        raise GptjaxError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if workers < 1:
        raise GptjaxError(f"workers must be at least 1, got {workers}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptjaxError(f"output {out} already exists and is not an empty folder")
    corpus = EmbeddedCorpus() if inputs is None else Corpus(resolve_inputs(inputs), text_field)
    total = corpus.total_bytes()

    if tokenizer == "char":
        chars = set()
        with _bytes_bar(total, "reading vocabulary", progress) as bar:
            for piece, _ in corpus.pieces():
                chars.update(piece)
                bar.update(corpus.bytes_read - bar.n)
        _check_not_blank("".join(chars), corpus)
        enc = tok.CharTokenizer("".join(chars))
    else:
        enc = tok.from_spec({"kind": tokenizer}, gpt2_ranks)

    made = _first_missing(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    done = False
    try:
        dtype = token_dtype(enc.vocab_size)
        pool = (_worker_pool(enc, gpt2_ranks, workers)
                if workers > 1 and (total or 0) >= PARALLEL_MIN_BYTES else None)
        n_tokens, saw_text = _encode_stream(corpus, enc, tmp / "all.bin", dtype, pool, workers,
                                            total, progress)
        if not saw_text:
            _check_not_blank("", corpus)
        n_val = max(1, int(round(n_tokens * val_fraction)))
        _split_tail(tmp / "all.bin", tmp / "train.bin", tmp / "val.bin", n_tokens - n_val, dtype)
        meta = {
            "format": FORMAT_VERSION,
            "tokenizer": enc.spec(),
            "vocab_size": enc.vocab_size,
            "eot_id": enc.eot_id,
            "dtype": dtype.name,
            "train_tokens": n_tokens - n_val,
            "val_tokens": n_val,
            "val_fraction": val_fraction,
            "replaced_invalid_utf8_bytes": corpus.replaced_bytes,
            "sources": [vars(s) for s in corpus.sources],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
        done = True
    except BrokenProcessPool as e:
        raise GptjaxError(f"a tokenizer worker process failed ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None and not done:
            shutil.rmtree(made, ignore_errors=True)  # folders we created for the output
    return meta


def prepare_embedded(data_cfg: C.DataConfig, out_dir: Path, progress: bool = True) -> PreparedData:
    """The embedded default corpus prepared into `out_dir` with the config's tokenizer
    (char unless set), read back."""
    prepare(None, out_dir, data_cfg.tokenizer or "char", val_fraction=data_cfg.val_fraction,
            gpt2_ranks=data_cfg.gpt2_ranks or None, progress=progress)
    return load_prepared(out_dir)


def _first_missing(path: Path) -> Path | None:
    """The outermost ancestor-or-self of `path` that does not exist yet."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _check_not_blank(text: str, corpus: Corpus) -> None:
    if not text.strip():
        names = ", ".join(s.path for s in corpus.sources) or "the corpus"
        raise GptjaxError(f"corpus is empty or whitespace only: {names}")


_worker_tokenizer = None


def _init_worker(spec: dict, gpt2_ranks) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tok.from_spec(spec, gpt2_ranks)


def _encode_in_worker(text: str) -> np.ndarray:
    return _worker_tokenizer.encode_array(text)


def _worker_pool(enc, gpt2_ranks, workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the parent may already run JAX's threads, which fork would break.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(enc.spec(), gpt2_ranks))


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


def _bytes_bar(total, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress)


def _encode_stream(corpus, enc, path: Path, dtype, pool, workers: int, total,
                   progress) -> tuple[int, bool]:
    """Encode pieces (in `pool` when given, order kept) and append them, EOT after each document."""
    n_tokens, saw_text = 0, False
    eot = np.array([enc.eot_id], dtype=dtype)
    pending: deque = deque()

    def drain(fh, keep: int):
        nonlocal n_tokens
        while len(pending) > keep:
            future, ends_doc, read = pending.popleft()
            ids = future.result().astype(dtype, copy=False)
            fh.write(ids.tobytes())
            n_tokens += len(ids)
            if ends_doc:
                fh.write(eot.tobytes())
                n_tokens += 1
            bar.update(read - bar.n)

    with open(path, "wb") as fh, pool or nullcontext(), _bytes_bar(total, "tokenizing", progress) as bar:
        for piece, ends_doc in corpus.pieces():
            saw_text = saw_text or bool(piece.strip())
            future = pool.submit(_encode_in_worker, piece) if pool else _done(enc.encode_array(piece))
            pending.append((future, ends_doc, corpus.bytes_read))
            drain(fh, 2 * workers)
        drain(fh, 0)
    return n_tokens, saw_text


def _split_tail(all_path: Path, train_path: Path, val_path: Path, n_train: int, dtype) -> None:
    """Copy tokens[n_train:] to val_path in chunks, then truncate the rest into train_path."""
    itemsize = np.dtype(dtype).itemsize
    with open(all_path, "rb") as src, open(val_path, "wb") as dst:
        src.seek(n_train * itemsize)
        while block := src.read(COPY_TOKENS * itemsize):
            dst.write(block)
    os.truncate(all_path, n_train * itemsize)
    os.replace(all_path, train_path)
