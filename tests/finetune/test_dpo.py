"""gptjax finetune-dpo: the loss against a hand computation, margins that grow on a toy
preference set, a frozen reference, and bad preference records."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import byte_base, fails_cleanly, run_cli

from gptjax.finetune.dpo import dpo_loss
from gptjax.runs import finetuned
from gptjax.runs.load import load_base

WORDS = "apple river stone cloud paper glass music table light green".split()


def test_the_losses_equal_a_hand_computation_on_a_toy_pair():
    pc, pr, rc, rr, beta = -4.0, -6.5, -5.0, -5.5, 0.2
    h = (pc - pr) - (rc - rr)  # 2.5 - 0.5 = 2.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    args = [jnp.array([v]) for v in (pc, pr, rc, rr)]
    losses, chosen_reward, rejected_reward = dpo_loss(*args, beta)
    assert float(losses[0]) == pytest.approx(-math.log(sig(beta * h)), rel=1e-6)
    assert float(chosen_reward[0]) == pytest.approx(beta * (pc - rc))
    assert float(rejected_reward[0]) == pytest.approx(beta * (pr - rr))
    smoothed = dpo_loss(*args, beta, "sigmoid", 0.1)[0]
    assert float(smoothed[0]) == pytest.approx(
        -0.9 * math.log(sig(beta * h)) - 0.1 * math.log(sig(-beta * h)), rel=1e-6)
    assert float(dpo_loss(*args, beta, "ipo")[0][0]) == pytest.approx((h - 1 / (2 * beta)) ** 2)


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_file):
    return byte_base(tmp_path_factory.mktemp("dpo"), corpus_file)


def _preferences(path, n=80, **changes):
    rng = np.random.default_rng(2)
    recs = [{"instruction": f"Is {w} a word?", "input": "", "chosen": f"yes, {w}",
             "rejected": f"no, {w}"} for w in rng.choice(WORDS, n)]
    for i, change in changes.items():
        recs[int(i[1:])] = change(recs[int(i[1:])])
    path.write_text(json.dumps(recs))
    return path


def test_preference_tuning_grows_the_margin_and_leaves_the_reference_alone(base, tmp_path, capsys):
    before = finetuned.fingerprint(load_base(base / "base").params)
    out = tmp_path / "dpo"
    code, stdout, err = run_cli(capsys, "finetune-dpo", "--base", base / "base", "--data",
                                _preferences(tmp_path / "prefs.json"), "--batch-size", "8",
                                "--epochs", "3", "--base-lr", "3e-3", "--beta", "0.5",
                                "--no-progress", "--out", out)
    assert code == 0, err
    report = json.loads((out / "dpo_report.json").read_text())
    b, a = report["before"], report["after"]
    # The policy starts as the reference: every reward 0, the loss log 2, nothing ranked.
    assert b["val_margin"] == pytest.approx(0.0, abs=1e-5)
    assert b["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert a["val_margin"] > 0.1 and a["val_accuracy"] > 0.5 and a["val_loss"] < b["val_loss"]
    assert a["val_chosen_logp"] - a["val_rejected_logp"] > b["val_chosen_logp"] - b["val_rejected_logp"]
    assert "preference accuracy 0.000 -> 1.000" in stdout, stdout
    assert finetuned.fingerprint(load_base(base / "base").params) == before  # the reference
    code, _, err = run_cli(capsys, "generate", "--run", out, "--prompt", "Is", "--max-new-tokens", "3")
    assert code == 0, err


@pytest.mark.parametrize("changes,match", [
    ({"r3": lambda r: {k: v for k, v in r.items() if k != "rejected"}}, "record 3: missing 'rejected'"),
    ({"r5": lambda r: {**r, "rejected": r["chosen"]}, "r9": lambda r: {**r, "rejected": r["chosen"]}},
     "record 5 (and 1 more: 9): chosen and rejected are the same text"),
])
def test_bad_preference_records_are_one_line(base, tmp_path, capsys, changes, match):
    data = _preferences(tmp_path / "bad.json", **changes)
    fails_cleanly(capsys, "finetune-dpo", "--base", base / "base", "--data", data, "--out",
                  tmp_path / "out", "--no-progress", match=match)
    assert not (tmp_path / "out").exists()


def test_bad_loss_settings_are_one_line(base, tmp_path, capsys):
    data = _preferences(tmp_path / "p.json")
    for flags, match in [(["--beta", "0"], "--beta must be positive"),
                         (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
                         (["--dpo-loss", "ipo", "--label-smoothing", "0.1"], "belongs to the sigmoid loss")]:
        fails_cleanly(capsys, "finetune-dpo", "--base", base / "base", "--data", data, *flags,
                      "--out", tmp_path / "out", match=match)


def test_a_dpo_runs_finetune_json_is_a_valid_config(base, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    flags = ["--max-steps", "2", "--batch-size", "8", "--no-progress", "--dpo-loss", "ipo"]
    code, _, err = run_cli(capsys, "finetune-dpo", "--base", base / "base", "--data",
                           _preferences(tmp_path / "p.json"), *flags, "--out", first)
    assert code == 0, err
    code, _, err = run_cli(capsys, "finetune-dpo", "--config", first / "finetune.json", "--out", again,
                           "--no-progress")
    assert code == 0, err
    settings = lambda run: json.loads((run / "finetune.json").read_text())["settings"]  # noqa: E731
    assert settings(again) == settings(first) and settings(first)["data"]["dpo_loss"] == "ipo"
    report = lambda run: json.loads((run / "dpo_report.json").read_text())  # noqa: E731
    assert report(again)["after"] == report(first)["after"]


def test_identical_answers_can_be_left_out_with_a_count(base, tmp_path, capsys):
    same = lambda r: {**r, "rejected": r["chosen"]}  # noqa: E731
    data = _preferences(tmp_path / "p.json", r2=same, r7=same)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "finetune-dpo", "--base", base / "base", "--data", data,
                           "--drop-identical", "--max-steps", "1", "--no-progress", "--out", out)
    assert code == 0 and "left out 2 records whose chosen and rejected answers are the same" in err
    assert json.loads((out / "dpo_report.json").read_text())["identical_left_out"] == 2
