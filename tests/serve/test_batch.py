"""`gptjax generate --input --output`: every prompt answered through the scheduler as the
reference decoder answers it, a cut-off output resumed at the first missing id with the
lines already written kept, and bad input refused in one line before anything is written."""

import json

import pytest
from conftest import byte_base, fails_cleanly, run_cli

from gptjax.generation.sampling import Sampling
from gptjax.generation.textgen import generate_text
from gptjax.model.quantize import quantized_config
from gptjax.runs.load import load_run
from gptjax.serve.served import load_served

PROMPTS = ["Every effort", "moves me", "x", "the picture was", "a", "Gisburn", "it was no great surprise"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_file):
    return byte_base(tmp_path_factory.mktemp("batch"), corpus_file) / "base"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def _answers(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _batch(capsys, base, prompts, output):
    return run_cli(capsys, "generate", "--run", base, "--input", prompts, "--output", output,
                   "--temperature", "0", "--max-new-tokens", "12", "--max-batch", "3", "--no-progress")


def test_every_prompt_is_answered_as_the_reference_decoder_answers_it(capsys, base, prompts, tmp_path):
    code, out, err = _batch(capsys, base, prompts, tmp_path / "out.jsonl")
    assert code == 0, err
    assert "answered 7 prompt(s)" in out
    got = _answers(tmp_path / "out.jsonl")
    run = load_run(base)
    want = generate_text(run.params, run.config.model, run.tokenizer, PROMPTS, 12, Sampling(temperature=0))
    assert [got[f"p{i}"]["text"] for i in range(7)] == want
    assert all(r["finish_reason"] in ("stop", "length") and r["completion_tokens"] <= 12
               for r in got.values())


def test_a_cut_off_output_resumes_at_the_first_missing_id(capsys, base, prompts, tmp_path):
    full = tmp_path / "full.jsonl"
    assert _batch(capsys, base, prompts, full)[0] == 0
    lines = full.read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:3]) + lines[3][:10])  # a crash mid-line
    code, out, err = _batch(capsys, base, prompts, partial)
    assert code == 0, err
    assert "answered 4 prompt(s)" in out
    resumed = partial.read_text().splitlines(keepends=True)
    assert resumed[:3] == lines[:3] and len(resumed) == 7
    assert _answers(partial) == _answers(full)
    code, out, _ = _batch(capsys, base, prompts, partial)  # nothing left to do
    assert code == 0 and "answered 0 prompt(s)" in out and partial.read_text().count("\n") == 7


@pytest.mark.parametrize("records, match", [
    (['{"id": 1}'], "prompts.jsonl:1: a record needs a \"prompt\" string"),
    (['{"id": 1, "prompt": "a"}', '{"id": 1, "prompt": "b"}'], "prompts.jsonl:2: id 1 repeats"),
    (['{"prompt": "a"}', "not json"], "prompts.jsonl:2: not JSON"),
    ([], "prompts.jsonl: no prompts"),
])
def test_a_bad_prompt_file_is_one_line_and_writes_nothing(capsys, base, tmp_path, records, match):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(r + "\n" for r in records))
    fails_cleanly(capsys, "generate", "--run", base, "--input", path, "--output", tmp_path / "o.jsonl",
                  match=match)
    assert not (tmp_path / "o.jsonl").exists()


def test_an_input_needs_an_output(capsys, base, prompts):
    fails_cleanly(capsys, "generate", "--run", base, "--input", prompts,
                  match="batch inference takes both --input FILE and --output FILE")


def test_quantized_batch_answers_are_the_quantized_decoders(capsys, base, prompts, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--run", base, "--input", prompts, "--output",
                           tmp_path / "q.jsonl", "--temperature", "0", "--max-new-tokens", "12",
                           "--quantize", "int4", "--quant-group", "8", "--no-progress")
    assert code == 0, err
    run = load_run(base)
    cfg = quantized_config(run.config.model, "int4", 8)
    want = generate_text(run.params, cfg, run.tokenizer, PROMPTS, 12, Sampling(temperature=0))
    got = _answers(tmp_path / "q.jsonl")
    assert [got[f"p{i}"]["text"] for i in range(7)] == want
    served = load_served(run=str(base), quantize="int4", quant_group=8)
    assert served.config.quantize == "int4" and served.params["wte"]["embedding"].dtype == "uint8"
