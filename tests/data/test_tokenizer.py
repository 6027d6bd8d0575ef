import hashlib
import shutil

import pytest
import tiktoken

from gptjax.data import tokenizer as tok
from gptjax.errors import GptjaxError

VARIED = [
    "Hello, world",
    "  leading spaces,\ttabs\n\n\nand   runs of   whitespace   ",
    "I'm sure they'll've done it; we're ok, you'd see",
    "digits 1234567890 and 3.14159, 10,000,000",
    "emoji 😀🎉👩‍👩‍👧 and CJK 漢字かな, Ελληνικά, العربية, हिन्दी",
    "a literal <|endoftext|> in the middle",
    "",
]


R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


@pytest.fixture(scope="module")
def gpt2(gpt2_ranks):
    return tok.GPT2Tokenizer(gpt2_ranks)


@pytest.fixture(scope="module")
def tiktoken_r50k(gpt2_ranks, tmp_path_factory):
    """tiktoken's own r50k_base (GPT-2) encoding, served offline from its file cache."""
    if gpt2_ranks:
        cache = tmp_path_factory.mktemp("tiktoken_cache")
        shutil.copy(gpt2_ranks, cache / hashlib.sha1(R50K_URL.encode()).hexdigest())
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
            return tiktoken.get_encoding("r50k_base")
    return tiktoken.get_encoding("r50k_base")


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello, world") == [15496, 11, 995]
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256


@pytest.mark.parametrize("text", VARIED)
def test_gpt2_ids_equal_tiktoken_and_round_trip(gpt2, tiktoken_r50k, text):
    ids = gpt2.encode(text)
    assert ids == tiktoken_r50k.encode_ordinary(text)
    assert gpt2.decode(ids) == text
    # The end-of-text string in a corpus is ordinary text, never the special id.
    assert tok.GPT2_EOT_ID not in ids


@pytest.mark.parametrize("text", VARIED)
def test_byte_and_char_round_trip(text):
    b = tok.ByteTokenizer()
    assert b.decode(b.encode(text)) == text
    assert all(0 <= i < 256 for i in b.encode(text))
    c = tok.CharTokenizer(text or "x")
    assert c.decode(c.encode(text)) == text
    assert c.eot_id == c.vocab_size - 1 == len(set(text or "x"))


def test_char_tokenizer_rejects_unknown_characters():
    with pytest.raises(GptjaxError, match="not in the vocabulary"):
        tok.CharTokenizer("abc").encode("abd")


def test_decoders_skip_ids_outside_the_vocabulary(gpt2):
    assert tok.ByteTokenizer().decode([104, 105, 256, 999]) == "hi"
    assert gpt2.decode([15496, 50256, 60000]) == "Hello<|endoftext|>"


def test_spec_round_trip(gpt2_ranks):
    for t in (tok.ByteTokenizer(), tok.CharTokenizer("hello"), tok.GPT2Tokenizer(gpt2_ranks)):
        again = tok.from_spec(t.spec(), gpt2_ranks)
        assert again.encode("hello") == t.encode("hello")
    with pytest.raises(GptjaxError, match="unknown tokenizer"):
        tok.from_spec({"kind": "sentencepiece"})


def test_offline_without_ranks_is_one_actionable_error(monkeypatch):
    def offline(name):
        raise ConnectionError("network unreachable")
    monkeypatch.delenv(tok.GPT2_RANKS_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(GptjaxError, match=tok.GPT2_RANKS_ENV):
        tok.GPT2Tokenizer()


def test_wrong_ranks_file_is_rejected(tmp_path):
    bad = tmp_path / "ranks.tiktoken"
    bad.write_text("SGVsbG8= 0\n")
    with pytest.raises(GptjaxError, match="not the GPT-2 ranks file"):
        tok.GPT2Tokenizer(bad)
    with pytest.raises(GptjaxError, match="not found"):
        tok.GPT2Tokenizer(tmp_path / "missing")
