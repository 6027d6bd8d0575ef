"""Instruction data: reading and checking records, the prompt format, splits, encoding, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptjax.errors import GptjaxError
from gptjax.finetune.sft_data import (
    RESPONSE_MARKER,
    EncodedExample,
    collate,
    encode_examples,
    format_example,
    format_prompt,
    read_records,
    split_records,
)

WITH_INPUT = {"instruction": "Convert to passive voice.", "input": "The cat chased the mouse.",
              "output": "The mouse was chased by the cat."}
WITHOUT_INPUT = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(GptjaxError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- prompt format -------------------------------------------------------------------------

def test_format_prompt_with_input():
    assert format_prompt(WITH_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nConvert to passive voice.\n\n"
        "### Input:\nThe cat chased the mouse.\n\n### Response:\n")


def test_format_prompt_without_input_and_example_pair():
    expected = ("Below is an instruction that describes a task. Write a response that "
                "appropriately completes the request.\n\n### Instruction:\nName a primary "
                "colour.\n\n### Response:\n")
    assert format_prompt(WITHOUT_INPUT) == expected
    assert format_prompt({"instruction": "Name a primary colour.", "output": "x"}) == expected
    prompt, response = format_example(WITHOUT_INPUT)
    assert prompt == expected and prompt.endswith(RESPONSE_MARKER) and response == "Red."


# -- reading -------------------------------------------------------------------------------

def test_read_json_array_fills_missing_input_and_keeps_extra_keys(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([WITH_INPUT, {"instruction": "Say hi.", "output": "Hi.", "id": 7}]))
    records = read_records(path)
    assert records[0] == WITH_INPUT
    assert records[1] == {"instruction": "Say hi.", "output": "Hi.", "id": 7, "input": ""}


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(WITH_INPUT) + "\n\n" + json.dumps(WITHOUT_INPUT) + "\n")
    assert read_records(path) == [WITH_INPUT, WITHOUT_INPUT]


@pytest.mark.parametrize("name, content, expected", [
    ("d.json", json.dumps([WITH_INPUT, {"instruction": "x"}]), "record 1: missing 'output'"),
    ("d.json", json.dumps([WITH_INPUT, "text"]), "record 1: expected an object, found str"),
    ("d.json", json.dumps([{"instruction": "x", "input": 3, "output": "y"}]),
     "record 0: 'input' must be a string, found int"),
    ("d.json", json.dumps([{"instruction": " ", "output": "y"}]), "record 0: empty instruction"),
    ("d.json", "[]", "holds no records"),
    ("d.json", json.dumps({"records": []}), "expected a JSON array of records, found a dict"),
    ("d.json", '[\n  {"instruction": "x",\n   "output": }\n]', "malformed JSON at line 3, column 14"),
    ("d.json", json.dumps(WITH_INPUT) + "\n" + json.dumps(WITH_INPUT),
     "name the file .jsonl"),
    ("d.jsonl", json.dumps(WITH_INPUT) + "\n\n" + '{"instruction": "x", "output": ',
     "malformed JSON on line 3"),
    ("d.jsonl", json.dumps(WITH_INPUT) + "\n\n" + json.dumps({"instruction": "x"}),
     "record 1 (line 3): missing 'output'"),
])
def test_bad_records_are_named(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    assert expected in error_of(read_records, path)


def test_invalid_utf8_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"instruction": "caf\xe9", "output": "y"}]')
    assert "not UTF-8" in error_of(read_records, path)


# -- splits --------------------------------------------------------------------------------

def test_split_sizes_follow_the_book_and_partition():
    train, val, test = split_records(1100)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(1100))
    assert np.array_equal(train, split_records(1100, seed=0)[0])
    assert not np.array_equal(train, split_records(1100, seed=1)[0])
    assert [len(s) for s in split_records(20, (0.5, 0.25, 0.25))] == [10, 5, 5]


def test_split_errors():
    assert "empty split" in error_of(split_records, 5)  # train 4, test int(0.5) = 0
    assert "sum to 1" in error_of(split_records, 100, (0.8, 0.1, 0.2))
    assert "positive" in error_of(split_records, 100, (1.0, 0.0, 0.0))


# -- encoding and batches ------------------------------------------------------------------

def fake_encode(text: str) -> list[int]:
    """One id per character (its code point), enough to check lengths and order."""
    return [ord(c) for c in text]


def test_encode_examples_concatenates_and_truncates_from_the_end():
    records = [{"instruction": "a", "input": "", "output": "xyz"}]
    prompt_len = len(format_prompt(records[0]))
    examples, cut = encode_examples(records, fake_encode, 0, context_length=prompt_len + 10)
    assert cut == 0
    (ex,) = examples
    assert ex.ids.dtype == np.int32 and ex.prompt_len == prompt_len
    assert ex.ids.tolist() == fake_encode(format_prompt(records[0])) + [120, 121, 122, 0]

    # context_length + 1 = prompt_len + 2 ids fit: the prompt, "x", "y"; the rest is cut.
    examples, cut = encode_examples(records * 2, fake_encode, 0, context_length=prompt_len + 1)
    assert cut == 2
    assert examples[0].ids.tolist()[-2:] == [120, 121] and len(examples[0].ids) == prompt_len + 2

    # A prompt longer than the context keeps its example, with prompt_len clipped.
    examples, cut = encode_examples(records, fake_encode, 0, context_length=5)
    assert cut == 1 and len(examples[0].ids) == 6 and examples[0].prompt_len == 6


def example(ids, prompt_len):
    return EncodedExample(np.array(ids, dtype=np.int32), prompt_len)


EOT = 9


def test_collate_pads_shifts_and_weights_real_targets_only():
    batch = collate([example([1, 2, 3, 4, EOT], 2), example([5, 6, EOT], 1)], EOT, length=6)
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
    assert batch["inputs"].tolist() == [[1, 2, 3, 4, EOT, EOT], [5, 6, EOT, EOT, EOT, EOT]]
    assert batch["targets"].tolist() == [[2, 3, 4, EOT, EOT, EOT], [6, EOT, EOT, EOT, EOT, EOT]]
    # Targets 0..n-2 count (the last of them is the example's own end-of-text); padding never.
    assert batch["weights"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]


def test_collate_mask_prompt_keeps_the_first_response_token():
    # prompt [1, 2, 3], response [4], then eot: target 4 is predicted at position 2.
    batch = collate([example([1, 2, 3, 4, EOT], 3), example([5, 6, EOT], 1)], EOT, length=5,
                    mask_prompt=True)
    assert batch["targets"].tolist() == [[2, 3, 4, EOT, EOT], [6, EOT, EOT, EOT, EOT]]
    assert batch["weights"].tolist() == [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0]]


def test_collate_exact_fit_and_too_short():
    batch = collate([example([1, 2, 3, EOT], 2)], EOT, length=3)  # len(x) = length + 1
    assert batch["inputs"].tolist() == [[1, 2, 3]]
    assert batch["targets"].tolist() == [[2, 3, EOT]]
    assert batch["weights"].tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match="too short"):
        collate([example([1, 2, 3, EOT], 2)], EOT, length=2)
    with pytest.raises(ValueError):
        collate([], EOT, length=4)
