"""GPT-2's tokenizer written for transformers encodes and decodes exactly as tiktoken does."""

import json

import pytest

from gptjax.data.tokenizer import GPT2Tokenizer
from gptjax.errors import GptjaxError
from gptjax.hf.tokenizer import bytes_to_unicode, merge_parts, save_tokenizer

TEXTS = [
    "Hello world",
    "  two leading spaces, then   three, a tab\there\tand\t\ttwo",
    "line one\nline two\n\n\nafter blank lines\r\nwindows ending   \n  ",
    "I'm sure it's what they're saying: we've, I'll, he'd, 'S 'T 'RE (case) and rock 'n' roll",
    "digits 0 7 42 1234567890 3.14159 -2.5e-10 1,000,000 $19.99 50% 2024-01-31 0x1F",
    "punctuation!!! ??? ... -- — – ;; :: () [] {} <> @#$%^&*_+=|\\/~` \"quoted\" «guillemets»",
    "emoji 😀🎉 👩‍👩‍👧 ❤️ 🇺🇸 and a lone 🙂",
    "CJK 漢字かなカナ 한국어 中文字符 日本語のテキスト",
    "accents café naïve Ångström résumé, combining e\u0301 a\u0308 n\u0303 and zalgo Z\u0351\u0324",
    "RTL עברית العربية فارسی mixed with English",
    "Ελληνικά Русский язык ภาษาไทย हिन्दी",
    "trailing spaces   ",
    "",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, gpt2_ranks):
    transformers = pytest.importorskip("transformers")
    ours = GPT2Tokenizer(gpt2_ranks)
    out = tmp_path_factory.mktemp("tok")
    written = save_tokenizer(ours, out, model_max_length=1024)
    assert sorted(p.name for p in written) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    return ours, transformers.GPT2TokenizerFast.from_pretrained(out), out


def test_byte_alphabet_is_printable_and_reversible():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_vocab_and_merges_have_gpt2s_sizes(tokenizers):
    _, _, out = tokenizers
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262
    assert merges[0] == "#version: 0.2" and len(merges) == 50001
    assert merges[1] == "Ġ t" and merges[-1] == "Ġg azed"


@pytest.mark.parametrize("text", TEXTS)
def test_transformers_gives_tiktokens_ids_and_text(tokenizers, text):
    ours, theirs, _ = tokenizers
    ids = ours.encode(text)
    assert theirs.encode(text) == ids
    assert theirs.decode(ids) == ours.decode(ids) == text


def test_end_of_text_decodes_the_same(tokenizers):
    ours, theirs, _ = tokenizers
    assert ours.decode([50256]) == theirs.decode([50256]) == "<|endoftext|>"
    assert theirs.eos_token_id == 50256


def test_ranks_that_are_not_one_merge_are_rejected():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"abc": 3}  # no "ab" or "bc" to build "abc" from
    with pytest.raises(GptjaxError, match="not one merge"):
        merge_parts(b"abc", ranks)
    assert merge_parts(b"abc", {**ranks, b"bc": 3, b"abc": 4}) == (b"a", b"bc")
