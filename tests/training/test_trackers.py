"""Trackers beside metrics.jsonl: what `gptjax train --log-to` writes is read back from
TensorBoard's event files and MLflow's file store, a resumed run continues its MLflow run,
a slow tracker never holds up the caller, and a failing one only warns."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
from conftest import TINY_RUN, byte_base, fails_cleanly, run_cli

from gptjax.errors import GptjaxError
from gptjax.training import trackers
from gptjax.training.metrics import JsonlLog


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every TFRecord event file in the folder."""
    from tensorboardX.proto.event_pb2 import Event
    found: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: length, its crc, the record, its crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def _mlflow(run: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient
    store = (run / "mlruns").absolute()
    return MlflowClient(tracking_uri=store.as_uri()), (store / "run-id").read_text().strip()


def _jsonl(run: Path, kind: str, field: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[field] for r in records if r.get("kind", "train") == kind and field in r}


def test_train_sends_every_record_to_tensorboard_and_mlflow_and_a_resume_continues_the_run(
        tmp_path, char_data, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", char_data, "--out", run, *TINY_RUN, "--max-steps", "8",
            "--log-every", "2", "--eval-every", "4", "--log-to", "jsonl,tensorboard,mlflow"]
    code, _, err = run_cli(capsys, *argv, "--stop-at", "4")
    assert code == 0, err
    client, run_id = _mlflow(run)
    code, _, err = run_cli(capsys, *argv)  # resumed: the same MLflow run goes on
    assert code == 0 and "warning" not in err, err
    assert _mlflow(run)[1] == run_id
    train_loss, val_loss = _jsonl(run, "train", "loss"), _jsonl(run, "eval", "val_loss")
    assert sorted(train_loss) == [2, 4, 6, 8] and sorted(val_loss) == [4, 8]

    board = _tensorboard_scalars(run / "tensorboard")
    assert board["train/loss"] == pytest.approx(train_loss, rel=1e-6)  # float32 on the way
    assert board["eval/val_loss"] == pytest.approx(val_loss, rel=1e-6)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert history == pytest.approx(train_loss, rel=1e-12)
    assert {m.step for m in client.get_metric_history(run_id, "eval/val_loss")} == {4, 8}
    got = client.get_run(run_id)
    assert got.data.params["model.n_layer"] == "2" and got.info.status == "FINISHED"


def test_fine_tuning_sends_its_records_to_tensorboard_and_may_change_trackers_on_resume(
        tmp_path, corpus_file, capsys):
    base = byte_base(tmp_path, corpus_file)
    argv = ["finetune-lm", "--base", base / "base", "--data", base / "data", "--max-steps", "20",
            "--batch-size", "2", "--eval-every", "10", "--no-progress", "--out", tmp_path / "lm"]
    code, _, err = run_cli(capsys, *argv, "--log-to", "jsonl,tensorboard")
    assert code == 0, err
    train_loss, val_loss = _jsonl(tmp_path / "lm", "train", "loss"), _jsonl(tmp_path / "lm", "eval", "val_loss")
    assert sorted(train_loss) == [10, 20] and sorted(val_loss) == [10, 20]
    board = _tensorboard_scalars(tmp_path / "lm" / "tensorboard")
    assert board["train/loss"] == pytest.approx(train_loss, rel=1e-6)
    assert board["eval/val_loss"] == pytest.approx(val_loss, rel=1e-6)
    assert "log_to" not in json.loads((tmp_path / "lm" / "finetune.json").read_text())["settings"]["tuning"]
    code, out, err = run_cli(capsys, *argv)  # the same run: where metrics go is not a setting
    assert code == 0 and "it had finished" in out, err
    fails_cleanly(capsys, *argv[:-1], tmp_path / "other", "--log-to", "neptune",
                  match="--log-to must be a comma-separated list")
    assert not (tmp_path / "other").exists()


def test_an_unknown_tracker_is_refused_before_anything_is_written(tmp_path, char_data, capsys):
    fails_cleanly(capsys, "train", "--data", char_data, "--out", tmp_path / "run", *TINY_RUN,
                  "--log-to", "jsonl,neptune", match="--log-to must be a comma-separated list")
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_package_names_its_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(GptjaxError, match=r"pip install 'gptjax\[wandb\]'"):
        trackers.parse_log_to("jsonl,wandb")
    assert trackers.parse_log_to("jsonl,tensorboard,tensorboard") == ("tensorboard",)


class _Blocked:
    """A tracker that cannot finish its first record until released."""

    def __init__(self, out, name, params):
        self.release, self.got = threading.Event(), []

    def log(self, step, values):
        self.release.wait(timeout=30)
        self.got.append((step, values))

    def close(self):
        pass


def test_a_slow_tracker_never_holds_up_the_writer_and_gets_everything_in_order(tmp_path, monkeypatch):
    made = []
    monkeypatch.setitem(trackers._CLASSES, "tensorboard", lambda *a: made.append(_Blocked(*a)) or made[-1])
    log = trackers.tracked(JsonlLog(tmp_path / "metrics.jsonl"), ("tensorboard",), tmp_path, "r", {})
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step, "note": "text is not a scalar"})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # written at once
    while not made:  # the tracker opens on the background thread
        threading.Event().wait(0.01)
    assert made[0].got == []  # still stuck on the first record: the writer did not wait
    made[0].release.set()
    log.close()
    assert made[0].got == [(1, {"train/loss": 1.0}), (2, {"train/loss": 0.5}), (3, {"train/loss": 1 / 3})]


def test_a_failing_tracker_is_dropped_with_one_warning(tmp_path, monkeypatch):
    class Broken(_Blocked):
        def log(self, step, values):
            raise OSError("disk full")

    monkeypatch.setitem(trackers._CLASSES, "mlflow", Broken)
    log = trackers.tracked(JsonlLog(tmp_path / "metrics.jsonl"), ("mlflow",), tmp_path, "r", {})
    with pytest.warns(UserWarning, match="--log-to mlflow stopped at step 1: OSError: disk full"):
        for step in (1, 2):
            log.write({"step": step, "loss": 1.0})
        log.close()
    assert len(JsonlLog(tmp_path / "metrics.jsonl").read()) == 2
