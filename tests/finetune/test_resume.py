"""Resumable fine-tuning: rerunning a command with the same --out continues from the last
validation and ends bit for bit where an uninterrupted run ends, for all four commands;
what cannot be resumed is refused in one line with nothing on disk changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import byte_base, fails_cleanly, run_cli

from gptjax.finetune import session
from gptjax.runs.load import load_finetuned

WORDS = "apple river stone cloud paper glass music table light green".split()
OPENERS = ("great fun", "awful day", "plain note")


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_file):
    root = byte_base(tmp_path_factory.mktemp("resume"), corpus_file)
    rng = np.random.default_rng(3)
    labelled = [{"text": f"{OPENERS[i % 3]} {' '.join(rng.choice(WORDS, 3))}", "label": "pnu"[i % 3]}
                for i in range(90)]
    (root / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    records = [{"instruction": f"Repeat {w}.", "input": "", "output": f"{w} {w}"}
               for w in rng.choice(WORDS, 60)]
    (root / "records.json").write_text(json.dumps(records))
    prefs = [{"instruction": f"Is {w} a word?", "input": "", "chosen": f"yes, {w}", "rejected": f"no, {w}"}
             for w in rng.choice(WORDS, 60)]
    (root / "prefs.json").write_text(json.dumps(prefs))
    return root


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without its timings, which differ from run to run."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_s"} for line in lines]


def _assert_same_run(resumed: Path, whole: Path) -> None:
    a, b = load_finetuned(resumed), load_finetuned(whole)
    assert a.step == b.step
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _records(resumed) == _records(whole)


def _commands(root: Path) -> dict[str, list]:
    common = ["--base", root / "base", "--batch-size", "4", "--eval-every", "6", "--patience", "0",
              "--no-progress"]
    return {
        "finetune-sft": ["finetune-sft", *common, "--data", root / "records.json", "--epochs", "3",
                         "--dropout", "0.1"],
        "finetune-dpo": ["finetune-dpo", *common, "--data", root / "prefs.json", "--epochs", "3",
                         "--lora-rank", "2"],
        "finetune-lm": ["finetune-lm", *common, "--data", root / "data", "--max-steps", "30",
                        "--unfreeze", "gradual:0.005", "--layer-lr-decay", "0.8"],
    }


@pytest.mark.parametrize("command", ["finetune-sft", "finetune-dpo", "finetune-lm"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(base, tmp_path, capsys, monkeypatch, command):
    argv = _commands(base)[command]
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "whole")
    assert code == 0, err

    real_fit = session.fit

    def fit_until_step_23(state, frozen, step_fn, *args, **kwargs):
        def step(state, frozen, batch):
            if int(state.step) == 23:  # past the save at 18 and the log records of step 20
                raise KeyboardInterrupt
            return step_fn(state, frozen, batch)
        return real_fit(state, frozen, step, *args, **kwargs)

    monkeypatch.setattr(session, "fit", fit_until_step_23)
    out = tmp_path / "cut"
    assert run_cli(capsys, *argv, "--out", out)[0] == 130
    assert max(r["step"] for r in _records(out)) == 20
    # As if killed after the resume state was saved and before the best checkpoint was: the
    # resumed run writes the best from its resume state again.
    for step in [p for p in (out / "checkpoints").iterdir() if p.name.isdigit()]:
        shutil.rmtree(step)
    monkeypatch.setattr(session, "fit", real_fit)
    code, said, err = run_cli(capsys, *argv, "--out", out)
    assert code == 0, err
    assert "resuming" in said and "at step 18 " in said
    _assert_same_run(out, tmp_path / "whole")


def test_a_killed_classifier_run_resumes_bit_for_bit(base, tmp_path, capsys):
    """SIGKILL in the middle of training, with dropout and gradual unfreezing."""
    argv = ["finetune-cls", "--base", base / "base", "--data", base / "labelled.jsonl", "--batch-size", "8",
            "--epochs", "24", "--patience", "0", "--dropout", "0.1", "--unfreeze", "gradual:3",
            "--layer-lr-decay", "0.9", "--lr", "3e-3", "--base-lr", "3e-3", "--no-progress"]
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "whole")
    assert code == 0, err
    out = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, "-m", "gptjax", *map(str, argv), "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(p.name.isdigit() and int(p.name) >= 42 for p in (out / "resume").glob("*")):
            assert job.poll() is None and time.monotonic() < deadline, "ended or stalled before step 42"
            time.sleep(0.02)
        os.kill(job.pid, signal.SIGKILL)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == -signal.SIGKILL and not (out / "test_report.json").exists()
    code, said, err = run_cli(capsys, *argv, "--out", out)
    assert code == 0, err
    resumed_at = int(said.split("resuming ")[1].split(" at step ")[1].split()[0])
    assert 42 <= resumed_at < 168
    _assert_same_run(out, tmp_path / "whole")
    reports = [json.loads((d / "test_report.json").read_text()) for d in (out, tmp_path / "whole")]
    assert reports[0] == reports[1]
    # A finished run, rerun, only reports again.
    code, again, err = run_cli(capsys, *argv, "--out", out)
    assert code == 0 and "it had finished" in again, err
    _assert_same_run(out, tmp_path / "whole")


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_what_cannot_resume_is_refused_and_left_as_it_was(base, tmp_path, capsys):
    argv = _commands(base)["finetune-lm"]
    run = tmp_path / "lm"
    assert run_cli(capsys, *argv, "--out", run)[0] == 0
    before = _tree(run)
    fails_cleanly(capsys, *argv, "--seed", "1", "--out", run,
                  match="was started with other settings (settings.tuning.seed was 0, now 1)")
    fails_cleanly(capsys, *_commands(base)["finetune-sft"], "--out", run,
                  match="is a finetune-lm run, not finetune-sft")
    assert _tree(run) == before
    (run / "resume").rename(tmp_path / "aside")  # as a run from before resume state existed
    fails_cleanly(capsys, *argv, "--out", run, match="holds a checkpoint but no resume state")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    fails_cleanly(capsys, *argv, "--out", other, match="is not a fine-tuning run to resume")
    assert (other / "notes.txt").read_text() == "mine"


def test_a_cross_validation_folder_and_a_single_run_are_not_mixed(base, tmp_path, capsys):
    cls = ["finetune-cls", "--base", base / "base", "--data", base / "labelled.jsonl", "--no-progress"]
    folds = tmp_path / "cv"
    (folds / "fold-1").mkdir(parents=True)
    fails_cleanly(capsys, *cls, "--out", folds, match="holds a cross-validation (fold-* runs)")
    single = tmp_path / "single"
    single.mkdir()
    (single / "finetune.json").write_text(json.dumps({"task": "cls"}))
    fails_cleanly(capsys, *cls, "--folds", "2", "--out", single, match="is a single classifier run")
    assert [p.name for p in folds.iterdir()] == ["fold-1"] and [p.name for p in single.iterdir()] == [
        "finetune.json"]


def test_a_torn_last_log_line_does_not_block_the_resume(tmp_path):
    from gptjax.training.metrics import JsonlLog
    log = JsonlLog(tmp_path / "metrics.jsonl")
    for step in (5, 10, 15):
        log.write({"kind": "train", "step": step, "loss": 1.0})
    with open(log.path, "a") as fh:
        fh.write('{"kind": "train", "st')  # a write cut short
    log.truncate_after(10)
    assert [r["step"] for r in log.read()] == [5, 10]
