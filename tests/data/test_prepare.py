import json

import numpy as np
import pytest

from gptjax.data import tokenizer as tok
from gptjax.data.corpus import _safe_pieces
from gptjax.data.prepare import prepare
from gptjax.data.prepared import load_prepared
from gptjax.errors import GptjaxError


def all_tokens(out) -> list[int]:
    d = load_prepared(out)
    return np.concatenate([d.train, d.val]).tolist()


def test_files_folders_and_jsonl_become_documents_separated_by_eot(tmp_path, gpt2_ranks):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Hello, world")
    (tmp_path / "docs" / "b.md").write_text("Second <|endoftext|> doc")
    (tmp_path / "docs" / ".hidden.txt").write_text("skipped")
    (tmp_path / "extra.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth"}\n')
    meta = prepare([str(tmp_path / "docs"), str(tmp_path / "extra.jsonl")], tmp_path / "out",
                   "gpt2", gpt2_ranks=gpt2_ranks, progress=False)
    enc = tok.GPT2Tokenizer(gpt2_ranks)
    eot = [enc.eot_id]
    expected = (enc.encode("Hello, world") + eot + enc.encode("Second <|endoftext|> doc") + eot
                + enc.encode("third") + eot + enc.encode("fourth") + eot)
    assert all_tokens(tmp_path / "out") == expected
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    assert meta["train_tokens"] + meta["val_tokens"] == len(expected)
    assert [s["documents"] for s in meta["sources"]] == [1, 1, 2]
    assert all(len(s["sha256"]) == 64 for s in meta["sources"])
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta


def test_char_vocabulary_is_stored_and_val_is_the_tail(tmp_path):
    (tmp_path / "t.txt").write_text("abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabc")
    meta = prepare([str(tmp_path / "t.txt")], tmp_path / "out", "char", val_fraction=0.25,
                   progress=False)
    assert meta["tokenizer"] == {"kind": "char", "chars": "abc"} and meta["eot_id"] == 3
    d = load_prepared(tmp_path / "out")
    assert d.tokenizer().decode(d.train.tolist() + d.val.tolist()) == "abc" * 17
    assert len(d.val) == round(52 * 0.25) and d.val[-1] == 3


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    meta = prepare([str(tmp_path / "bad.txt")], tmp_path / "out", "byte", progress=False)
    assert meta["replaced_invalid_utf8_bytes"] == 3
    text = tok.ByteTokenizer().decode(all_tokens(tmp_path / "out"))
    assert text == "caf\ufffd ok \ufffd\ufffd end"


def test_bpe_on_safe_pieces_equals_bpe_on_the_whole_text(gpt2_ranks):
    enc = tok.GPT2Tokenizer(gpt2_ranks)
    text = "It's 10,000 miles... isn't it?  Yes!\n\n  Wait:\tthe   end 😀. " * 300
    pieces = list(_safe_pieces(iter([text[i:i + 777] for i in range(0, len(text), 777)]), 500))
    assert "".join(pieces) == text and len(pieces) > 10
    assert sum((enc.encode(p) for p in pieces), []) == enc.encode(text)


def test_a_run_without_spaces_is_still_cut_to_bounded_pieces():
    text = "y" * 5000 + " tail"
    pieces = list(_safe_pieces(iter([text]), 500))
    assert "".join(pieces) == text and max(map(len, pieces)) < 1000


def test_empty_and_whitespace_corpora_are_rejected_and_nothing_is_written(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t \n")
    for name in ("empty.txt", "blank.txt"):
        for kind in ("char", "byte"):
            with pytest.raises(GptjaxError, match="empty or whitespace"):
                prepare([str(tmp_path / name)], tmp_path / "out", kind, progress=False)
            assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt", "empty.txt"]


def test_existing_output_is_never_overwritten(tmp_path, corpus_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.bin").write_bytes(b"precious")
    with pytest.raises(GptjaxError, match="already exists"):
        prepare([str(corpus_file)], out, "byte", progress=False)
    assert (out / "keep.bin").read_bytes() == b"precious"


def test_missing_input_and_malformed_jsonl(tmp_path):
    with pytest.raises(GptjaxError, match="input not found"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "out", "byte", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(GptjaxError, match="bad.jsonl:2"):
        prepare([str(tmp_path / "bad.jsonl")], tmp_path / "out", "byte", progress=False)
    assert not (tmp_path / "out").exists()


def test_out_of_vocabulary_ids_are_caught_when_loading(tmp_path, corpus_file):
    prepare([str(corpus_file)], tmp_path / "out", "char", progress=False)
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    ids[5] = 500
    ids.tofile(tmp_path / "out" / "train.bin")
    with pytest.raises(GptjaxError, match="token id 500, outside the vocabulary"):
        load_prepared(tmp_path / "out")


@pytest.mark.parametrize("kind", ["gpt2", "char"])
def test_worker_processes_give_the_same_tokens(tmp_path, monkeypatch, gpt2_ranks, kind):
    import gptjax.data.prepare as prep
    text = "Worker processes keep the order of pieces. 😀 Ünïcödé\n" * 4000
    (tmp_path / "t.txt").write_text(text)
    inline = prepare([str(tmp_path / "t.txt")], tmp_path / "one", kind, gpt2_ranks=gpt2_ranks,
                     workers=1, progress=False)
    monkeypatch.setattr(prep, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr("gptjax.data.corpus.PIECE_CHARS", 20_000)  # many pieces: order matters
    pooled = prepare([str(tmp_path / "t.txt")], tmp_path / "two", kind, gpt2_ranks=gpt2_ranks,
                     workers=2, progress=False)
    assert all_tokens(tmp_path / "one") == all_tokens(tmp_path / "two")
    assert inline["train_tokens"] == pooled["train_tokens"]


@pytest.mark.parametrize("make", ["embedded", "files"])
def test_progress_counts_each_input_byte_once_per_pass(tmp_path, make):
    """The char tokenizer reads the corpus twice (vocabulary, then tokens): each pass's bar
    ends at the corpus's size, not at twice it."""
    from gptjax.data.corpus import Corpus, EmbeddedCorpus
    if make == "embedded":
        corpus = EmbeddedCorpus()
    else:
        (tmp_path / "a.txt").write_text("héllo\n" * 1000)
        (tmp_path / "b.jsonl").write_text(json.dumps({"text": "wörld"}) + "\n")
        corpus = Corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    total = corpus.total_bytes()
    assert total > 0
    for _ in range(2):
        assert sum(1 for _ in corpus.pieces()) > 0 and corpus.bytes_read == total
