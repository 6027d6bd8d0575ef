"""`gptjax sweep`: a member's losses are its own `gptjax train` run's, spreading the members
over devices changes nothing, the report names the best member, and bad input is refused
before anything is written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY_RUN, fails_cleanly, run_cli

SWEEP = [*(a for a in TINY_RUN if a not in ("--max-new-tokens", "8")), "--max-steps", "6"]
GRID = ["--lrs", "3e-3,5e-4", "--seeds", "0,3"]


def _records(path, kind, member=None):
    return [r for r in map(json.loads, path.read_text().splitlines())
            if r["kind"] == kind and r.get("member") == member]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("sweep") / "s"
    from gptjax.cli.app import main
    assert main(["sweep", "--data", str(char_data), "--out", str(out), *SWEEP, *GRID]) == 0
    return out


def test_a_member_trains_exactly_as_its_own_train_run(swept, char_data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", char_data, "--out", tmp_path / "one", *SWEEP,
                           "--lr", "5e-4", "--seed", "3", "--max-new-tokens", "0")
    assert code == 0, err
    member = 3  # lr varies slowest: (3e-3, 0), (3e-3, 3), (5e-4, 0), (5e-4, 3)
    for kind, key in (("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("eval", "val_loss")):
        alone = _records(tmp_path / "one" / "metrics.jsonl", kind)
        mine = _records(swept / "metrics.jsonl", kind, member)
        assert [r["step"] for r in mine] == [r["step"] for r in alone] and mine
        np.testing.assert_allclose([r[key] for r in mine], [r[key] for r in alone], rtol=2e-5,
                                   err_msg=f"{kind} {key}")
    summary = json.loads((swept / "sweep.json").read_text())
    rows = summary["members"]
    assert [(r["lr"], r["seed"]) for r in rows] == [(3e-3, 0), (3e-3, 3), (5e-4, 0), (5e-4, 3)]
    best = min(rows, key=lambda r: r["val_loss"])
    assert summary["best_member"] == best["member"] and summary["steps"] == 6
    table = (swept / "sweep.md").read_text()
    assert f"| {best['member']} | {best['lr']:g} |" in table and "best" in table
    assert (swept / "loss.png").stat().st_size > 10_000


def test_members_spread_over_four_devices_train_as_on_one(swept, char_data, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "gptjax", "sweep", "--data", str(char_data),
                           "--out", str(tmp_path / "s4"), *SWEEP, *GRID, "--devices", "4"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "for 4 devices" in done.stdout
    for member in range(4):
        four = _records(tmp_path / "s4" / "metrics.jsonl", "train", member)
        one = _records(swept / "metrics.jsonl", "train", member)
        np.testing.assert_allclose([r["loss"] for r in four], [r["loss"] for r in one], rtol=1e-5)


def test_a_diverging_member_is_reported_and_the_rest_train_on(char_data, tmp_path, capsys):
    code, out, err = run_cli(capsys, "sweep", "--data", char_data, "--out", tmp_path / "d", *SWEEP,
                             "--lrs", "1e-3,1e30", "--grad-clip", "0")
    assert code == 0, err
    rows = json.loads((tmp_path / "d" / "sweep.json").read_text())["members"]
    assert rows[0]["diverged_at"] is None and rows[0]["val_loss"] is not None
    assert rows[1]["diverged_at"] is not None and rows[1]["val_loss"] is None
    assert f"diverged at step {rows[1]['diverged_at']}" in out


@pytest.mark.parametrize("flags, match", [
    (["--lrs", "1e-3,fast"], "--lrs takes comma-separated numbers, got '1e-3,fast'"),
    (["--seeds", "1,1"], "the swept seed values repeat"),
    (["--lrs", "1e-3,1e-6"], "sweep member lr=1e-06, weight_decay=0.1, seed=0: train.min_lr"),
    (["--lrs", "1e-3,2e-3,3e-3", "--devices", "2"], "--devices 2: needs 1..1 devices"),
    (["--mesh", "data=1"], "does not take train.mesh"),
    (["--stats-every", "2"], "does not take train.stats_every"),
    (["--on-nonfinite", "skip"], "does not take train.on_nonfinite (a member with a non-finite"),
])
def test_bad_sweeps_are_refused_before_anything_is_written(char_data, tmp_path, capsys, flags, match):
    fails_cleanly(capsys, "sweep", "--data", char_data, "--out", tmp_path / "s", *SWEEP, *flags,
                  match=match)
    assert not (tmp_path / "s").exists()


def test_a_sweep_never_writes_into_a_folder_with_files(char_data, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    fails_cleanly(capsys, "sweep", "--data", char_data, "--out", tmp_path / "s", *SWEEP,
                  match="exists and is not empty")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["notes.txt"]


def test_help_leaves_out_the_settings_a_sweep_refuses(capsys):
    from gptjax.cli.app import main
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    shown = capsys.readouterr().out
    assert "--lrs" in shown and "--weight-decay " in shown
    assert not any(f"--{flag} " in shown for flag in ("mesh", "stats-every", "on-nonfinite", "log-to"))


def test_an_interrupted_sweep_logs_the_steps_it_took_and_reports_them(char_data, tmp_path, capsys,
                                                                      monkeypatch):
    from gptjax.training import sweep_run
    batch = sweep_run._Runner.batch

    def interrupted_at_4(self, step):
        if step == 3:  # the batch of step 4: steps 1-3 are taken, logged every 5
            raise KeyboardInterrupt
        return batch(self, step)
    monkeypatch.setattr(sweep_run._Runner, "batch", interrupted_at_4)
    code, _, err = run_cli(capsys, "sweep", "--data", char_data, "--out", tmp_path / "s", *SWEEP,
                           *GRID, "--log-every", "5")
    assert code == 130 and "interrupted" in err
    assert [r["step"] for r in _records(tmp_path / "s" / "metrics.jsonl", "train", 2)] == [3]
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["steps"] == 3
    assert "| 2 |" in (tmp_path / "s" / "sweep.md").read_text()
