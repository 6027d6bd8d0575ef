"""Fine-tuning from the command line: classification, instructions, continued pretraining,
LoRA runs that keep only adapters, and the errors that must leave nothing behind."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import numpy as np
import pytest
from conftest import byte_base, fails_cleanly, run_cli

from gptjax.cli import main
from gptjax.runs.load import load as load_run
from gptjax.runs.load import load_base, load_finetuned

WORDS = "apple river stone cloud paper glass music table light green".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_file):
    return byte_base(tmp_path_factory.mktemp("ft"), corpus_file)


@pytest.fixture(scope="module")
def labelled(base):
    """A TSV without header, label<TAB>text: the class is the text's first word."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(120):
        label = "spam" if i % 3 == 0 else "ham"
        opener = "win cash now" if label == "spam" else "see you soon"
        lines.append(f"{label}\t{opener} {' '.join(rng.choice(WORDS, 3))}")
    path = base / "texts.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


CLS = ["--label-column", "0", "--text-column", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def classifier(base, labelled):
    out = base / "cls"
    assert main(["finetune-cls", "--base", str(base / "base"), "--data", str(labelled), *CLS,
                 "--epochs", "6", "--lr", "3e-3", "--base-lr", "3e-3", "--out", str(out)]) == 0
    return out


def test_classifier_learns_and_reports(classifier, capsys):
    report = json.loads((classifier / "test_report.json").read_text())
    assert report["n"] == 24 and sum(map(sum, report["confusion"])) == 24  # 20% of 120
    assert report["accuracy"] >= 0.9, report  # the first word decides the class
    assert set(report["per_class"]) == {"ham", "spam"}
    assert (classifier / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(capsys, "classify", "--run", classifier, "--json",
                           "win cash now apple river", "see you soon stone cloud")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["label"] for r in rows] == ["spam", "ham"]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)


def test_a_classifier_is_a_starting_point_and_the_base_object_survives(base, classifier, records, tmp_path):
    from gptjax.finetune.settings import Tuning
    from gptjax.finetune.sft import SftData, finetune_sft
    start = load_base(str(classifier))
    assert start.origin["kind"] == "run" and "head" not in start.params
    tuning = Tuning(epochs=1, batch_size=8, base_lr=1e-3)
    finetune_sft(start, SftData(str(records)), tuning, tmp_path / "a", progress=False, say=lambda *a: None)
    # the step donates its state, not the caller's weights: the same Base can start another run
    assert not any(x.is_deleted() for x in jax.tree.leaves(start.params))


def test_head_only_saves_just_the_head_and_keeps_the_base(base, labelled, tmp_path):
    out = tmp_path / "head"
    assert main(["finetune-cls", "--base", str(base / "base"), "--data", str(labelled), *CLS,
                 "--epochs", "1", "--train", "head", "--out", str(out)]) == 0
    tuned = load_finetuned(out)
    assert set((out / "checkpoints").glob("*/params")) and tuned.spec.trainable.blocks == 0
    gpt = load_run(base / "base").params
    for x, y in zip(jax.tree.leaves(gpt), jax.tree.leaves(tuned.params["gpt"])):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_lora_classifier_trains_few_parameters(base, labelled, tmp_path, capsys):
    out = tmp_path / "lora"
    code, stdout, _ = run_cli(capsys, "finetune-cls", "--base", base / "base", "--data", labelled,
                              *CLS, "--epochs", "1", "--lora-rank", "2", "--out", out)
    assert code == 0 and "LoRA rank 2" in stdout
    tuned = load_finetuned(out)
    assert set(tuned.params) == {"gpt", "head", "lora"}
    code, _, err = run_cli(capsys, "generate", "--run", out)
    assert code == 2 and "is a classifier" in err


@pytest.mark.parametrize("extra, match", [
    (["--label-column", "label", "--text-column", "text"], "has no column"),
    (["--train", "last-7"], "last-N with 1 <= N <= 2"),
    (["--lora-rank", "2", "--lora-targets", "attn,embed"], "'embed' matches no layer"),
    (["--split", "0.5,0.5"], "--split must be 3"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--max-length", "100000"], "--max-length must be 0 (the model's context) or at most the context length"),
])
def test_bad_classification_input_writes_nothing(base, labelled, tmp_path, capsys, extra, match):
    fails_cleanly(capsys, "finetune-cls", "--base", base / "base", "--data", labelled, *CLS, *extra,
                  "--out", tmp_path / "out", match=match)
    assert not (tmp_path / "out").exists()


def test_one_class_and_empty_text_are_errors(base, tmp_path, capsys):
    one = tmp_path / "one.csv"
    one.write_text("text,label\nhello there,a\ngood day,a\n")
    fails_cleanly(capsys, "finetune-cls", "--base", base / "base", "--data", one, "--out",
                  tmp_path / "out", match="at least two classes")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "fine", "label": "a"}\n{"text": "  ", "label": "b"}\n')
    fails_cleanly(capsys, "finetune-cls", "--base", base / "base", "--data", empty, "--out",
                  tmp_path / "out", match="empty text")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def records(base):
    rng = np.random.default_rng(1)
    recs = [{"instruction": f"Repeat the word {w}.", "input": "" if i % 2 else "twice",
             "output": f"{w} {w}"} for i, w in enumerate(rng.choice(WORDS, 80))]
    path = base / "records.json"
    path.write_text(json.dumps(recs))
    return path


SFT = ["--batch-size", "8", "--no-progress"]


def test_instruction_tuning_lowers_val_loss_and_answers(base, records, tmp_path, capsys):
    out = tmp_path / "sft"
    code, stdout, err = run_cli(capsys, "finetune-sft", "--base", base / "base", "--data", records,
                                *SFT, "--epochs", "2", "--base-lr", "3e-3", "--out", out)
    assert code == 0, err
    # 184 bytes hold a record without input whole; one with input (192 ids) loses the end
    # of its response, none all of it.
    assert "40 of 80 records are longer than the context (184 tokens) and were cut to fit " \
           "(0 of them lose their whole response)" in err, err
    report = json.loads((out / "sft_report.json").read_text())
    assert report["val_loss"] < report["val_loss_before"] and report["truncated"] == 40
    assert report["without_response"] == 0
    assert f"over {report['val_response_tokens']:,} response tokens" in stdout
    test = json.loads((out / "test_records.json").read_text())
    assert len(test) == 8  # 10% of 80
    code, stdout, err = run_cli(capsys, "respond", "--run", out, "--out", tmp_path / "answers.json",
                                "--max-new-tokens", "4", "--no-progress")
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert code == 0 and len(answers) == 8 and all(isinstance(a["model_response"], str) for a in answers)
    long = tmp_path / "long.json"  # prompts that outgrow the context: one summary line
    long.write_text(json.dumps([{"instruction": "Say it. " * 30, "output": "x"}] * 3))
    code, _, err = run_cli(capsys, "respond", "--run", out, "--records", long, "--out",
                           tmp_path / "long-answers.json", "--max-new-tokens", "2", "--no-progress")
    assert code == 0 and "3 of 3 prompts are longer than the context" in err, err
    assert "prompt of" not in err, err
    fails_cleanly(capsys, "judge", "--responses", tmp_path / "answers.json", "--out",
                  tmp_path / "scored.json", "--judge-url", "", match="no judge endpoint configured")


def _long_records(path, n_lost: int, n: int = 80):
    """n records, n_lost of them with an instruction that fills the whole context."""
    recs = [{"instruction": ("Repeat the word, please. " * 8 if i < n_lost else "Repeat it."),
             "output": "stone stone"} for i in range(n)]
    path.write_text(json.dumps(recs))
    return path


def test_instruction_data_whose_responses_are_cut_away_is_refused(base, tmp_path, capsys):
    """At 184 bytes an instruction of 200 leaves no response token: nothing to learn, and
    the template alone would show a large, meaningless fall in validation loss."""
    data = _long_records(tmp_path / "lost.json", n_lost=80)
    fails_cleanly(capsys, "finetune-sft", "--base", base / "base", "--data", data, *SFT,
                  "--out", tmp_path / "out", match="no training record keeps any of its response "
                  "within the context (184 tokens; 80 of 80 records lose it)")
    assert not (tmp_path / "out").exists()


def test_most_responses_cut_away_warns_with_the_share_and_scores_what_is_left(base, tmp_path, capsys):
    data = _long_records(tmp_path / "most.json", n_lost=60)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "finetune-sft", "--base", base / "base", "--data", data,
                                *SFT, "--epochs", "1", "--out", out)
    assert code == 0, err
    assert "60 of 80 records (75%) lose their whole response to the context (184 tokens)" in err
    report = json.loads((out / "sft_report.json").read_text())
    assert report["without_response"] == 60
    # Validation scores response tokens only: 12 ids ("stone stone" and end-of-text) per
    # validation record that keeps its response, none from those that lost it.
    from gptjax.finetune.sft_data import split_records
    _, val, _ = split_records(80, seed=0)
    assert report["val_response_tokens"] == 12 * int(sum(i >= 60 for i in val))


@pytest.fixture(scope="module")
def sft_lora(base, records):
    out = base / "sft-lora"
    assert main(["finetune-sft", "--base", str(base / "base"), "--data", str(records), *SFT,
                 "--epochs", "1", "--lora-rank", "4", "--lora-targets", "all", "--lr", "1e-2",
                 "--out", str(out)]) == 0
    return out


def test_lora_instruction_tuning_keeps_only_adapters_and_exports_merged(base, sft_lora, tmp_path, capsys):
    ckpt = next((sft_lora / "checkpoints").glob("*/params"))
    base_ckpt = next((base / "base" / "checkpoints").glob("*/params"))
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert size < 0.5 * sum(p.stat().st_size for p in base_ckpt.rglob("*") if p.is_file())
    tuned = load_finetuned(sft_lora)
    assert set(tuned.params) == {"gpt", "lora"}
    merged = load_run(sft_lora).params  # what generate and convert use
    tokens = np.arange(20)[None] % 200
    from gptjax import model
    unmerged = model.apply(tuned.params["gpt"], tokens, tuned.spec.model, lora=tuned.spec.lora,
                           adapters=tuned.params["lora"])
    np.testing.assert_allclose(np.asarray(model.apply(merged, tokens, tuned.spec.model)),
                               np.asarray(unmerged), atol=1e-5, rtol=0)
    code, _, err = run_cli(capsys, "convert", sft_lora, "--out", tmp_path / "hf")
    assert code == 0, err
    from gptjax.hf.io import load_hf
    _, exported = load_hf(tmp_path / "hf")
    np.testing.assert_array_equal(np.asarray(exported["blocks"]["attn"]["qkv"]["kernel"]),
                                  np.asarray(merged["blocks"]["attn"]["qkv"]["kernel"]))


def test_a_base_that_no_longer_matches_is_refused(sft_lora, tmp_path, capsys):
    import shutil
    copy = tmp_path / "tuned"
    shutil.copytree(sft_lora, copy)
    spec = json.loads((copy / "finetune.json").read_text())
    (copy / "finetune.json").write_text(json.dumps({**spec, "base_fingerprint": "0" * 64}))
    code, _, err = run_cli(capsys, "generate", "--run", copy, "--max-new-tokens", "2")
    assert code == 2 and "changed after fine-tuning" in err


def test_continued_pretraining_with_lora(base, tmp_path, capsys):
    import shutil
    out, tuning_data = tmp_path / "lm", tmp_path / "tuning-data"
    shutil.copytree(base / "data", tuning_data)  # not the base's own folder
    code, stdout, err = run_cli(capsys, "finetune-lm", "--base", base / "base", "--data", tuning_data,
                                "--lora-rank", "4", "--lr", "1e-2", "--epochs", "1",
                                "--eval-every", "20", "--no-progress", "--out", out)
    assert code == 0, err
    assert "trainable:" in stdout and "val loss" in stdout
    code, _, err = run_cli(capsys, "generate", "--run", out, "--max-new-tokens", "3", "--prompt", "The")
    assert code == 0, err
    # eval without --data reads the data the run was tuned on, and agrees with --data.
    code, own, err = run_cli(capsys, "eval", "--run", out, "--batches", "2")
    assert code == 0 and own.rstrip().endswith(f"of {tuning_data.absolute()}"), (own, err)
    code, given, err = run_cli(capsys, "eval", "--run", out, "--batches", "2", "--data", base / "data")
    assert code == 0 and own.split(" (")[0] == given.split(" (")[0] and "val loss" in own, err
    shutil.rmtree(tuning_data)
    fails_cleanly(capsys, "eval", "--run", out, match="was tuned on")


def test_eval_of_an_instruction_tuned_run_asks_for_data(base, sft_lora, capsys):
    fails_cleanly(capsys, "eval", "--run", sft_lora, match="has no prepared data of its own")
    code, out, err = run_cli(capsys, "eval", "--run", sft_lora, "--batches", "1", "--data", base / "data")
    assert code == 0 and "val loss" in out, err


@pytest.mark.parametrize("text, match", [
    (b"{not json", "finetune.json: Expecting property name"),
    (b"\xff\xfe{", "finetune.json: 'utf-8' codec can't decode"),
    (b'{"task": "lm"}', "finetune.json is malformed (KeyError: 'model')"),
    (b'[]', "finetune.json is malformed (AttributeError:"),
    (None, "finetune.json is malformed (TypeError: settings is not an object)")])
def test_a_damaged_finetune_json_is_one_line(sft_lora, tmp_path, capsys, text, match):
    import shutil
    copy = tmp_path / "tuned"
    shutil.copytree(sft_lora, copy)
    if text is None:  # every field in place but one of the wrong type
        text = json.dumps({**json.loads((copy / "finetune.json").read_text()), "settings": None})
        text = text.encode()
    (copy / "finetune.json").write_bytes(text)
    fails_cleanly(capsys, "eval", "--run", copy, match=match)
    fails_cleanly(capsys, "generate", "--run", copy, "--max-new-tokens", "2", match=match)


class _Judge(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["model"] == "judge-1"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "85"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_judge_scores_through_an_openai_compatible_endpoint(tmp_path, capsys, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi.",
                                    "model_response": "Hello."}] * 2))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, out, err = run_cli(capsys, "judge", "--responses", answers, "--out", tmp_path / "s.json",
                                 "--judge-url", f"http://127.0.0.1:{server.server_port}/v1",
                                 "--judge-model", "judge-1", "--no-progress")
    finally:
        server.shutdown()
    assert code == 0, err
    assert [r["score"] for r in json.loads((tmp_path / "s.json").read_text())] == [85, 85]
    assert "mean score 85.0" in out


def test_max_steps_bounds_fine_tuning_in_steps_not_epochs(base, records, tmp_path, capsys):
    """68 training records in batches of 8 are 8 steps an epoch: --max-steps 11 runs one
    epoch and 3 steps of the next, validating every 5 steps and once at the end."""
    out = tmp_path / "sft"
    code, stdout, err = run_cli(capsys, "finetune-sft", "--base", base / "base", "--data", records,
                                *SFT, "--max-steps", "11", "--eval-every", "5", "--out", out)
    assert code == 0, err
    assert "11 steps (1.4 epochs of 8 steps), validating every 5 steps" in stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [5, 10, 11]
    assert json.loads((out / "sft_report.json").read_text())["steps"] == 11
    fails_cleanly(capsys, "finetune-sft", "--base", base / "base", "--data", records, *SFT,
                  "--max-steps", "-1", "--out", tmp_path / "bad", match="--max-steps must be >= 0")


def test_a_fine_tuned_runs_finetune_json_repeats_it_and_a_toml_sets_a_new_one(
        base, records, sft_lora, tmp_path, capsys):
    """finetune.json (base, data, tuning) as --config gives the same run; a hand-written
    TOML with [base], [data] and [tuning] works too, with flags on top; a file from another
    task is refused."""
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "finetune-sft", "--config", sft_lora / "finetune.json",
                           "--out", again, "--no-progress")
    assert code == 0, err
    settings = lambda run: json.loads((run / "finetune.json").read_text())["settings"]  # noqa: E731
    assert settings(again) == settings(sft_lora)
    report = lambda run: json.loads((run / "sft_report.json").read_text())  # noqa: E731
    assert report(again)["val_loss"] == report(sft_lora)["val_loss"]

    (tmp_path / "lm.toml").write_text(
        f'[base]\nrun = "{base / "base"}"\ncheckpoint = "latest"\n'
        f'[data]\npath = "{base / "data"}"\n'
        '[tuning]\nmax_steps = 3\nbatch_size = 4\nlr = 0.01\n')
    code, stdout, err = run_cli(capsys, "finetune-lm", "--config", tmp_path / "lm.toml",
                                "--batch-size", "2", "--out", tmp_path / "lm", "--no-progress")
    assert code == 0, err
    tuning = settings(tmp_path / "lm")["tuning"]
    assert (tuning["max_steps"], tuning["batch_size"], tuning["lr"]) == (3, 2, 0.01)
    fails_cleanly(capsys, "finetune-cls", "--config", sft_lora / "finetune.json", "--out",
                  tmp_path / "cls", match="holds the settings of a finetune-sft run, not finetune-cls")
