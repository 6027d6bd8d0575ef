"""End-to-end through the CLI: train, bitwise resume, checkpoints, generate, eval."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TINY_RUN, fails_cleanly, run_cli

from gptjax.config import SECTIONS, RunConfig, from_dict, preset
from gptjax.runs.load import load as load_run


def train_losses(run_dir) -> list[tuple[int, float]]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("runs") / "full"
    from gptjax.cli import main  # capsys is function-scoped, so call main directly here
    assert main(["train", "--data", str(char_data), "--out", str(out), *TINY_RUN,
                 "--max-steps", "6"]) == 0
    return out


def test_run_directory_has_everything(full_run):
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "sample.txt"):
        assert (full_run / name).is_file(), name
    cfg = json.loads((full_run / "config.json").read_text())
    assert cfg["model"]["n_layer"] == 2 and cfg["data"]["tokenizer"] == "char"
    assert cfg["model"]["vocab_size"] > 0
    assert [s for s, _ in train_losses(full_run)] == [1, 2, 3, 4, 5, 6]
    evals = [json.loads(l) for l in (full_run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in l]
    assert [e["step"] for e in evals] == [3, 6] and all(np.isfinite(e["val_loss"]) for e in evals)



def test_speed_counts_only_timed_steps_when_intervals_do_not_divide(tmp_path, char_data, capsys):
    """Log every 4, evaluate every 6: the clock restarts after the evaluation at step 6, so
    the record at step 8 times only steps 7-8 (2 steps), not all 4. The evaluation line at
    step 6 reports the losses of steps 5-6, not the step-4 record's."""
    out = tmp_path / "r"
    code, stdout, err = run_cli(capsys, "train", "--data", char_data, "--out", out, *TINY_RUN,
                                "--log-every", "4", "--eval-every", "6", "--max-steps", "12")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12]
    assert [r["timed_steps"] for r in train] == [3, 2, 4]  # step 1 is warm-up, untimed
    (eval_line,) = [line for line in stdout.splitlines() if line.startswith("step 6: train loss")]
    shown = float(eval_line.split("train loss ")[1].split(",")[0])
    assert abs(shown - train[0]["loss"]) > 1e-4, (eval_line, train[0])
    # At step 12 both fall due: one train line, then the evaluation without repeating it.
    at_12 = [line for line in stdout.splitlines() if line.startswith("step 12:")]
    assert len(at_12) == 2 and at_12[1].startswith("step 12: val loss"), at_12


def test_the_end_sample_is_what_the_saved_checkpoint_generates(full_run):
    """The sample comes from the state in memory; the last checkpoint holds that state, so
    generating from the saved run with the sample's settings gives the same text."""
    from gptjax.generation.decoder import generate
    loaded = load_run(full_run)
    t, tok = loaded.config.train, loaded.tokenizer
    ids = generate(loaded.params, loaded.config.model, [], t.max_new_tokens, seed=t.seed,
                   temperature=0.8, top_k=40, valid_vocab=tok.vocab_size, eot_id=tok.eot_id,
                   stop_at_eot=False)
    assert tok.decode(ids) == (full_run / "sample.txt").read_text()

def test_load_run_from_python_as_documented(full_run):
    """The README's example: `gptjax.load_run` gives config, tokenizer and parameters that
    reproduce the run's own end-of-training sample through the public `generate_text`."""
    import gptjax
    run = gptjax.load_run(full_run)  # latest: step 6
    assert run.step == 6 and run.config == from_dict(
        json.loads((full_run / "config.json").read_text()))
    t = run.config.train
    (text,) = gptjax.generate_text(run.params, run.config.model, run.tokenizer, [[]],
                                   t.max_new_tokens, gptjax.Sampling(0.8, 40, seed=t.seed),
                                   stop_at_eot=False)
    assert text == (full_run / "sample.txt").read_text()
    assert gptjax.load_run(full_run, checkpoint=3).step == 3
    with pytest.raises(gptjax.GptjaxError, match="latest, best or a step"):
        gptjax.load_run(full_run, checkpoint="newest")


def assert_same_params(run_a, run_b):
    a, b = load_run(run_a), load_run(run_b)
    assert a.step == b.step
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def test_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(tmp_path, char_data, full_run, capsys):
    out = tmp_path / "resumed"
    code, _, err = run_cli(capsys, "train", "--data", char_data, "--out", out, *TINY_RUN,
                           "--max-steps", "6", "--stop-at", "3")
    assert code == 0, err
    assert [s for s, _ in train_losses(out)] == [1, 2, 3]
    code, stdout, err = run_cli(capsys, "train", "--out", out, "--no-progress")
    assert code == 0, err
    assert "resuming" in stdout and "from step 3" in stdout
    # Without a progress bar, each log interval (every step here) is a console line; the
    # first step after a (re)start is untimed, so it has no speed.
    lines = [line for line in stdout.splitlines() if line.startswith("step ") and ", lr " in line]
    assert [line.split(":")[0] for line in lines] == ["step 4", "step 5", "step 6"]
    assert "tokens/s" not in lines[0] and all("tokens/s, MFU " in line for line in lines[1:])
    assert train_losses(out) == train_losses(full_run)  # exact float equality
    assert_same_params(full_run, out)


def test_bitwise_resume_with_dropout_accumulation_and_sliding_windows(tmp_path, char_data, capsys):
    flags = [*TINY_RUN, "--max-steps", "7", "--dropout", "0.1", "--grad-accum", "2",
             "--sampler", "sliding", "--stride", "7", "--max-new-tokens", "0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(capsys, "train", "--data", char_data, "--out", whole, *flags)[0] == 0
    # Stop off the evaluation cadence (eval_every is 3), then resume twice.
    assert run_cli(capsys, "train", "--data", char_data, "--out", parts, *flags, "--stop-at", "2")[0] == 0
    assert run_cli(capsys, "train", "--out", parts, "--no-progress", "--stop-at", "5")[0] == 0
    assert run_cli(capsys, "train", "--out", parts, "--no-progress")[0] == 0
    assert [s for s, _ in train_losses(parts)] == list(range(1, 8))
    assert train_losses(parts) == train_losses(whole)
    assert_same_params(whole, parts)


def test_resume_with_a_different_training_config_is_refused(full_run, capsys):
    before = (full_run / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, "train", "--out", full_run, "--lr", "0.5", "--no-progress")
    assert code == 2 and "train.lr" in err and len(err.strip().splitlines()) == 1
    assert (full_run / "metrics.jsonl").read_text() == before


def test_finished_run_is_not_trained_further(full_run, capsys):
    ckpts = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    losses = train_losses(full_run)
    code, stdout, err = run_cli(capsys, "train", "--out", full_run, "--no-progress")
    assert code == 0, err
    assert "nothing to train: the run is at step 6 of 6" in stdout
    assert "compiled" not in stdout  # said before compiling anything
    # A new sample length (a resume-safe field) is kept, and the sample made again.
    code, stdout, err = run_cli(capsys, "train", "--out", full_run, "--no-progress",
                                "--max-new-tokens", "4")
    assert code == 0 and "nothing to train: the run is at step 6 of 6" in stdout, err
    assert len((full_run / "sample.txt").read_text()) == 4
    assert train_losses(full_run) == losses
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ckpts
    assert json.loads((full_run / "config.json").read_text())["train"]["max_new_tokens"] == 4


def test_generate_is_seeded_and_greedy_is_deterministic(full_run, capsys):
    outs = [run_cli(capsys, "generate", "--run", full_run, "--prompt", "The quick",
                    "--max-new-tokens", "12", "--ignore-eot", *flags)
            for flags in (["--temperature", "0"], ["--temperature", "0"],
                          ["--seed", "1", "--top-k", "5"], ["--seed", "1", "--top-k", "5"])]
    assert all(code == 0 for code, _, _ in outs)
    texts = [o.rstrip("\n") for _, o, _ in outs]
    assert texts[0] == texts[1] and texts[2] == texts[3]
    assert all(t.startswith("The quick") and len(t) == len("The quick") + 12 for t in texts)


def test_generate_batches_prompts_and_cuts_at_stop_strings(full_run, capsys):
    args = ["generate", "--run", full_run, "--max-new-tokens", "20", "--temperature", "0",
            "--ignore-eot"]
    code, single, err = run_cli(capsys, *args, "--prompt", "The quick")
    assert code == 0, err
    code, batch, err = run_cli(capsys, *args, "--prompt", "The quick", "--prompt", "She")
    assert code == 0, err
    lines = batch.splitlines()
    assert lines[0] == "--- 1 ---" and "--- 2 ---" in lines
    assert batch.startswith("--- 1 ---\n" + single)  # streamed alone = batched
    code, with_xla, err = run_cli(capsys, *args, "--prompt", "The quick", "--decode-matmul", "xla")
    assert (code, with_xla) == (0, single), err  # the native kernel's products decode alike
    stop = single[len("The quick") + 3:len("The quick") + 5]
    code, cut, err = run_cli(capsys, *args, "--prompt", "The quick", "--stop", stop)
    assert code == 0, err
    assert cut == single[:single.index(stop, len("The quick"))] + "\n"


def test_a_prompt_longer_than_the_context_warns_in_one_line(full_run, capsys):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 10
    code, out, err = run_cli(capsys, "generate", "--run", full_run, "--prompt", long_prompt,
                             "--max-new-tokens", "3", "--temperature", "0")
    assert code == 0 and out.startswith(long_prompt)
    assert err.splitlines() == [f"gptjax: warning: prompt of {len(long_prompt)} tokens is longer "
                                "than the context; keeping its last 32"]


def _eval_line(out: str) -> tuple[float, float]:
    return float(out.split("val loss ")[1].split(",")[0]), float(out.split("perplexity ")[1].split()[0])


def test_eval_prints_loss_and_perplexity_over_what_it_scored(full_run, char_data, capsys):
    """--batches scores what training evaluates on; the default for a small split (and
    --full) every non-overlapping window of it, checked against the public loss."""
    code, out, err = run_cli(capsys, "eval", "--run", full_run, "--data", char_data, "--batches", "2")
    assert code == 0, err
    loss, ppl = _eval_line(out)
    assert ppl == pytest.approx(np.exp(loss), rel=1e-3)
    assert "the first 2 validation batches, as training evaluates (256 of the split's 936 tokens" in out
    last_eval = [r for r in map(json.loads, (full_run / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "eval"][-1]
    assert loss == pytest.approx(last_eval["val_loss"], abs=1e-4)

    code, default, err = run_cli(capsys, "eval", "--run", full_run)
    assert code == 0 and run_cli(capsys, "eval", "--run", full_run, "--full")[1] == default, err
    import gptjax
    from gptjax.data.windows import window_count
    run = gptjax.load_run(full_run)
    val, ctx = gptjax.load_prepared(char_data).val, run.config.model.context_length
    rows = np.stack([val[i * ctx:i * ctx + ctx + 1] for i in range(window_count(len(val), ctx))])
    by_hand = float(gptjax.loss(run.params, {"inputs": rows[:, :-1], "targets": rows[:, 1:]},
                                run.config.model))
    assert f"over the whole validation split ({rows.shape[0] * ctx:,} tokens)" in default
    assert f"val loss {by_hand:.4f}," in default  # as printed; and unrounded:
    from gptjax.eval.loss import evaluate
    assert evaluate(full_run, full=True).loss == pytest.approx(by_hand, abs=1e-5)
    fails_cleanly(capsys, "eval", "--run", full_run, "--full", "--batches", "2", match="not allowed")


def test_checkpoints_keep_latest_and_best(tmp_path, char_data, capsys):
    out = tmp_path / "keep"
    code, _, err = run_cli(capsys, "train", "--data", char_data, "--out", out, *TINY_RUN,
                           "--max-steps", "12", "--eval-every", "2", "--keep-checkpoints", "2",
                           "--max-new-tokens", "0")
    assert code == 0, err
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    evals = {json.loads(l)["step"]: json.loads(l)["val_loss"]
             for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l}
    best = min(evals, key=evals.get)
    assert steps == sorted({10, 12, best})


def test_python_dash_m_and_help_list_every_field_with_its_default():
    res = subprocess.run([sys.executable, "-m", "gptjax", "train", "--help"],
                         capture_output=True, text=True, check=True)
    text = " ".join(res.stdout.split())  # argparse wraps lines
    shown = RunConfig(model=preset("baby"))
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = getattr(getattr(shown, section), f.name)
            assert f"--{f.name.replace('_', '-')}" in text, f.name
            assert f"(default: {'empty' if default == '' else repr(default)})" in text, f.name
