"""Faults injected in-process: non-finite losses, a loss spike, a full disk, a damaged
latest checkpoint on resume. Runs are benchmarks/faults.py's tiny 40-step runs."""

import errno
import json
import shutil
import subprocess

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import benchmark_script, run_cli

from gptjax.training import loop

faults = benchmark_script("faults")


def _train(capsys, out, data, *extra):
    return run_cli(capsys, "train", "--data", data, "--out", out, *faults.RUN_FLAGS, *extra)


def _steps(run_dir):
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_non_finite_loss_stops_the_run_before_any_non_finite_checkpoint(tmp_path, capsys, char_data):
    code, _, err = _train(capsys, tmp_path / "run", char_data, "--lr", "1e4")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "non-finite loss" in lines[0], err
    if _steps(tmp_path / "run"):  # whatever was saved before it is finite
        assert all(np.isfinite(x).all() for x in faults.final_state(tmp_path / "run")
                   if x.dtype.kind == "f")


def test_skip_drops_non_finite_updates_and_stops_after_max_skips_in_a_row(tmp_path, capsys, char_data):
    code, _, err = _train(capsys, tmp_path / "run", char_data, "--lr", "1e4",
                          "--on-nonfinite", "skip", "--max-skips", "3", "--eval-every", "40")
    assert code == 1 and "3 updates in a row" in err, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped_updates") for r in records if r["kind"] == "train")


def _spike_once_at(monkeypatch, step: int):
    """The guard sees a tenfold loss at `step`, the first time only (as a bad batch would
    cause it): what follows is the policy's doing."""
    original, seen = loop.Guard.check, []

    def check(self, first, metrics):
        if not seen and first <= step < first + len(metrics):
            seen.append(step)
            metrics = [dict(m, loss=m["loss"] * 10) if first + i == step else m
                       for i, m in enumerate(metrics)]
        return original(self, first, metrics)
    monkeypatch.setattr(loop.Guard, "check", check)


def test_a_spike_rolls_back_skips_its_batches_and_resumes_alike(tmp_path, capsys, char_data, monkeypatch,
                                                                faults_reference):
    flags = ("--spike-policy", "rollback", "--spike-factor", "3")
    _spike_once_at(monkeypatch, 27)
    code, out, err = _train(capsys, tmp_path / "whole", char_data, *flags)
    assert code == 0, err
    assert "step 27: loss" in out and "rolled back to step 25 and skipping 2 batch(es)" in out
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_batches"] for r in records if r["kind"] == "rollback"] == [[26, 27]]
    whole = faults.final_state(tmp_path / "whole")
    # The same run stopped after the rollback and resumed: the skipped batches stay skipped.
    _spike_once_at(monkeypatch, 27)
    assert _train(capsys, tmp_path / "parts", char_data, *flags, "--stop-at", "30")[0] == 0
    assert _train(capsys, tmp_path / "parts", char_data, *flags)[0] == 0
    assert faults.equal(faults.final_state(tmp_path / "parts"), whole)
    assert not faults.equal(whole, faults_reference[1])  # it did change the run


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_partial_files(tmp_path, capsys, char_data,
                                                                             monkeypatch, faults_reference):
    original, calls = ocp.CheckpointManager.save, []

    def full_disk(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 3:  # as tensorstore fails: part of the checkpoint is on disk
            (self.directory / f"{step}.orbax-checkpoint-tmp-123").mkdir()
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    run_dir = tmp_path / "run"
    code, _, err = _train(capsys, run_dir, char_data)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert not list((run_dir / "checkpoints").glob("*tmp*")) and _steps(run_dir) == [5, 10]
    monkeypatch.undo()  # space freed: it resumes from step 10 and ends as if nothing happened
    assert _train(capsys, run_dir, char_data)[0] == 0
    assert faults.equal(faults.final_state(run_dir), faults_reference[1])


@pytest.mark.skipif(subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0
                    if shutil.which("unshare") else True,
                    reason="no user namespaces here for a private tmpfs; the injected ENOSPC "
                    "test above covers the same path")
def test_a_real_full_tmpfs_stops_in_one_line(tmp_path, char_data):
    mount = tmp_path / "small"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=1200k tmpfs {mount} && "
              + " ".join(faults.train_argv(mount / "run", char_data)) + "; echo rc=$?; "
              f"ls {mount / 'run' / 'checkpoints'}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert "rc=1" in done.stdout and len(errors) == 1, done.stderr
    assert "space" in errors[0] and "tmp" not in done.stdout.split("rc=1")[1]


def test_resume_sets_a_damaged_latest_checkpoint_aside_and_ends_alike(tmp_path, capsys, char_data,
                                                                     faults_reference):
    run_dir = tmp_path / "run"
    assert _train(capsys, run_dir, char_data, "--stop-at", "20")[0] == 0
    data_file = max((run_dir / "checkpoints" / "20" / "params" / "d").iterdir(),
                    key=lambda p: p.stat().st_size)
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data_file.write_bytes(bytes(blob))
    code, _, err = _train(capsys, run_dir, char_data)
    assert code == 0 and "checkpoint 20 in" in err and "damaged-checkpoints/20" in err, err
    assert (run_dir / "damaged-checkpoints" / "20" / "params").is_dir()  # kept, not deleted
    assert faults.equal(faults.final_state(run_dir), faults_reference[1])
    assert run_cli(capsys, "check", run_dir)[0] == 0


def test_a_finished_run_with_a_damaged_last_checkpoint_trains_its_last_steps_again(
        tmp_path, capsys, char_data, faults_reference):
    """Re-running a finished run says "nothing to train" without compiling only when its last
    checkpoint verifies; a damaged one is set aside and the steps after the one before rerun."""
    run_dir = tmp_path / "run"
    shutil.copytree(faults_reference[0], run_dir)  # a finished run of these flags, to damage a copy of
    last = _steps(run_dir)[-1]
    finished = faults.final_state(run_dir)
    data_file = max((run_dir / "checkpoints" / str(last) / "params" / "d").iterdir(),
                    key=lambda p: p.stat().st_size)
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 3] ^= 0x5A
    data_file.write_bytes(bytes(blob))
    code, stdout, err = _train(capsys, run_dir, char_data)
    assert code == 0 and f"damaged-checkpoints/{last}" in err, err
    assert "nothing to train" not in stdout and "resuming" in stdout
    assert _steps(run_dir)[-1] == last and faults.equal(faults.final_state(run_dir), finished)
