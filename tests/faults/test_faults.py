"""The fault-injection suite: each experiment of benchmarks/faults.py (which repeats them
many times for RESULTS.md) run a few times, with its outcome asserted. A tiny char model,
40 steps, a checkpoint every 5."""

import random
import signal

import pytest
from conftest import benchmark_script

faults = benchmark_script("faults")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def ref(faults_reference):
    return faults_reference[1]


def test_kill_9_at_random_moments_resumes_bitwise_equal(work, char_data, ref):
    rng = random.Random(0)
    for i in range(3):
        assert faults.kill_at(work / f"kill{i}", char_data, ref, rng.uniform(2.0, 6.0)) == "equal"


def test_kill_9_inside_a_save_resumes_from_the_last_committed_checkpoint(work, char_data, ref):
    assert faults.kill_inside_save(work, char_data, ref, at=10) == "equal"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_reached_and_exits_130(work, char_data, ref, sig):
    code, last, outcome = faults.signal_and_resume(work, char_data, ref, sig, after_step=12)
    assert code == 130, last
    assert f"stopped by {sig.name} at step" in last and "checkpoint saved" in last
    # The step it stopped at is not a multiple of the checkpoint interval, yet it is saved.
    steps = sorted(int(p.name) for p in (work / f"signal-{sig}" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert outcome == "equal" and steps[-1] == 40, steps


def test_damage_to_any_checkpoint_file_is_detected_or_harmless(faults_reference):
    run_dir, ref = faults_reference  # damage() changes a copy of it
    outcomes = {}
    for rel in faults.checkpoint_files(run_dir):
        for mode in ("flip", "truncate", "delete"):
            outcomes[(rel, mode)] = faults.damage(run_dir, rel, mode, ref)
    bad = {k: v for k, v in outcomes.items() if v not in ("detected", "harmless")}
    assert not bad, bad
    # Every array file and the checksums themselves are among what is caught.
    detected = {rel for (rel, mode), v in outcomes.items() if v == "detected"}
    assert any("/params/d/" in r or "/params/ocdbt" in r for r in detected)
    assert any("/train/" in r for r in detected) and any("/checksums/" in r for r in detected)


def test_a_second_writer_is_refused_naming_the_holder(work, char_data):
    code, err = faults.concurrent_writers(work, char_data)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "is in use by gptjax train (pid " in lines[0] and " on host " in lines[0]
