"""Training a run for longer: the schedule's cosine tails, and `gptjax train --extend-to`."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import TINY_RUN, run_cli

from gptjax.config import Tail, TrainConfig, check_tails, format_tails, parse_tails
from gptjax.errors import GptjaxError
from gptjax.training import optim
from gptjax.training.extend import describe, extended


def test_a_tail_starts_where_the_schedule_was_and_ends_at_min_lr():
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    before = optim.schedule(t)
    from gptjax.config import RunConfig
    t2 = extended(RunConfig(train=t), 40, 300).train
    assert (t2.max_steps, t2.decay_steps) == (300, 100)
    assert parse_tails(t2.lr_tails) == [Tail(40, 300, float(f"{float(before(40)):.6g}"))]
    after = optim.schedule(t2)
    steps = np.arange(0, 301)
    old, new = np.array([before(s) for s in steps]), np.array([after(s) for s in steps])
    np.testing.assert_array_equal(new[:40], old[:40])  # the steps taken keep their rates
    assert new[40] == pytest.approx(old[40], rel=1e-6)  # continuous at the boundary
    assert np.all(np.diff(new[40:]) <= 0) and new[300] == pytest.approx(1e-4, rel=1e-6)
    assert new[170] == pytest.approx((old[40] + 1e-4) / 2, rel=1e-5)  # cosine midpoint
    # A second extension starts from the first tail's rate at its start.
    t3 = extended(RunConfig(train=t2), 300, 400).train
    assert parse_tails(t3.lr_tails)[0] == parse_tails(t2.lr_tails)[0]
    np.testing.assert_array_equal([optim.schedule(t3)(s) for s in range(300)], new[:300])
    # Extending a finished run: its rate had reached min_lr, and the log says it stays there.
    finished = extended(RunConfig(train=t), 100, 150).train
    assert parse_tails(finished.lr_tails)[0].lr == 1e-4
    assert "stays at min_lr 0.0001" in describe(parse_tails(finished.lr_tails)[0], 1e-4)


@pytest.mark.parametrize("spec,match", [
    ("60:80", "is not START:END:LR"),
    ("120:130:0.1", "by step 100"),  # starts after the first schedule ended
    ("60:50:0.1", "end after it starts"),
    ("60:90:0.1", "ends at step 90, but train.max_steps is 130"),
])
def test_bad_tails_are_refused(spec, match):
    t = TrainConfig(max_steps=130, decay_steps=100, lr_tails=spec)
    with pytest.raises(GptjaxError, match=match):
        check_tails(t)
    assert format_tails(parse_tails("60:130:0.0001")) == "60:130:0.0001"


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_extend_to_trains_on_along_a_new_tail_that_the_config_repeats(tmp_path, char_data, capsys):
    run = tmp_path / "run"
    base = ["--data", char_data, *TINY_RUN, "--max-new-tokens", "0"]
    assert run_cli(capsys, "train", "--out", run, *base, "--max-steps", "10", "--stop-at", "6")[0] == 0
    before = (run / "config.json").read_text()
    code, _, err = run_cli(capsys, "train", "--out", run, "--max-steps", "14", "--no-progress")
    assert code == 2 and "use --extend-to 14" in err and (run / "config.json").read_text() == before
    code, _, err = run_cli(capsys, "train", "--out", run, "--extend-to", "9", "--no-progress")
    assert code == 2 and "not beyond the run's max_steps (10)" in err

    code, stdout, err = run_cli(capsys, "train", "--out", run, "--extend-to", "14", "--no-progress")
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())["train"]
    (tail,) = parse_tails(saved["lr_tails"])
    assert (saved["max_steps"], saved["decay_steps"], tail.start, tail.end) == (14, 10, 6, 14)
    assert f"from step 6 the learning rate decays again along a cosine, from {tail.lr:.3g}" in stdout
    records = _train_records(run)
    assert [r["step"] for r in records] == list(range(1, 15))
    schedule = optim.schedule(dataclasses.replace(TrainConfig(), **saved))
    assert [r["lr"] for r in records] == pytest.approx([float(schedule(s - 1)) for s in range(1, 15)])

    # The extended run's config.json, given to a new run, trains the same steps exactly.
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "train", "--out", again, *base, "--max-steps", "14",
                           "--decay-steps", "10", "--lr-tails", saved["lr_tails"])
    assert code == 0, err
    assert [r["loss"] for r in _train_records(again)] == [r["loss"] for r in records]
    code, stdout, _ = run_cli(capsys, "train", "--out", run, "--no-progress")
    assert code == 0 and "nothing to train: the run is at step 14 of 14" in stdout
