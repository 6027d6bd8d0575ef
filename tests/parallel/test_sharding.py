"""Meshes and partition rules, and sharded training on 8 simulated CPU devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError
from gptjax.parallel.mesh import make_mesh, parse_mesh, resolve_sizes
from gptjax.parallel.sharding import check_batch, check_divisible, spec_for

WORKER = Path(__file__).with_name("mesh_worker.py")
MESHES = ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "data=2,tensor=4"]
STEPS = 20


@pytest.fixture(scope="module")
def eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(WORKER), str(STEPS), *MESHES], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_worker_really_had_eight_devices(eight_devices):
    assert eight_devices["devices"] == 8


@pytest.mark.parametrize("spec", MESHES)
def test_every_mesh_matches_single_device_losses(eight_devices, spec):
    single = np.array(eight_devices["single"])
    losses = np.array(eight_devices["meshes"][spec]["losses"])
    assert len(losses) == STEPS and losses[-1] < losses[0]  # it trained
    np.testing.assert_allclose(losses, single, rtol=1e-5)


def test_pmap_with_an_axis_name_matches_single_device(eight_devices):
    np.testing.assert_allclose(eight_devices["pmap"], eight_devices["single"], rtol=1e-5)


def test_fsdp_holds_an_eighth_of_parameters_and_moments_per_device(eight_devices):
    fsdp = eight_devices["meshes"]["fsdp=8"]["max_device_fraction"]
    data = eight_devices["meshes"]["data=8"]["max_device_fraction"]
    assert data == pytest.approx(1.0)  # pure data parallelism replicates everything
    # Small overhead: LayerNorms, biases on d_model and Adam's step count stay replicated.
    assert fsdp <= 1 / 8 + 0.05, fsdp


def test_a_checkpoint_saved_on_8_devices_restores_identically_on_4_and_on_1(eight_devices):
    assert eight_devices["restored_from_fsdp8"] == {
        "data=2,fsdp=2 on 4": {"identical": True, "devices": 4},
        "one device": {"identical": True, "devices": 1}}


@pytest.mark.parametrize("spec,sizes", [
    ("data=2,fsdp=-1", {"data": 2, "fsdp": -1, "tensor": 1}),
    ("tensor=4", {"data": 1, "fsdp": 1, "tensor": 4}),
    (None, {"data": -1, "fsdp": 1, "tensor": 1}),
])
def test_parse_mesh(spec, sizes):
    assert parse_mesh(spec) == sizes


@pytest.mark.parametrize("spec,match", [
    ("data=2,pipeline=2", "unknown mesh axis pipeline"),
    ("data=two", "non-integer"),
    ("data", "not AXIS=SIZE"),
    ("data=0", "positive or -1"),
    ("data=-1,fsdp=-1", "at most one"),
])
def test_bad_mesh_specs(spec, match):
    with pytest.raises(GptjaxError, match=match):
        parse_mesh(spec)


def test_sizes_must_multiply_to_the_device_count():
    assert resolve_sizes(parse_mesh("data=2,fsdp=-1"), 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(GptjaxError, match="needs 4 devices, but there are 8"):
        resolve_sizes(parse_mesh("data=2,fsdp=2"), 8)
    with pytest.raises(GptjaxError, match="do not divide"):
        resolve_sizes(parse_mesh("data=3,fsdp=-1"), 8)


def test_one_device_is_the_mesh_of_one():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_partition_rules_cover_the_gpt2_parameter_tree():
    cfg = ModelConfig(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, d_model=768)
    abstract = jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))
    mesh = _FakeMesh({"data": 1, "fsdp": 8, "tensor": 4})
    specs = {"/".join(k.key for k in path): spec_for(path, x.shape, mesh)
             for path, x in jax.tree_util.tree_leaves_with_path(abstract)}
    assert specs["blocks/attn/qkv/kernel"] == P(None, "fsdp", None, "tensor", None)
    assert specs["blocks/attn/out/kernel"] == P(None, "tensor", None, "fsdp")
    assert specs["blocks/mlp/fc/kernel"] == P(None, "fsdp", "tensor")
    assert specs["blocks/mlp/proj/kernel"] == P(None, "tensor", "fsdp")
    assert specs["wte/embedding"] == P(None, "fsdp")
    assert specs["blocks/ln1/scale"] == P()


def test_tensor_and_batch_divisibility_errors():
    mesh = _FakeMesh({"data": 2, "fsdp": 2, "tensor": 8})
    with pytest.raises(GptjaxError, match="tensor=8 does not divide n_head 12"):
        check_divisible(ModelConfig(n_head=12, d_model=768), mesh)
    with pytest.raises(GptjaxError, match="batch_size 6 is not divisible by data x fsdp = 4"):
        check_batch(6, mesh)


class _FakeMesh:
    """Only .shape is read by the rules and checks."""

    def __init__(self, shape):
        self.shape = shape


def _train_cli(devices: int, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "gptjax", "train", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# One single-device run is the reference trajectory for every multi-device CLI run below.
COMMON = ["--preset", "tiny", "--batch-size", "8", "--max-steps", "12", "--warmup-steps", "2",
          "--log-every", "1", "--eval-every", "3", "--eval-batches", "1", "--max-new-tokens", "0",
          "--no-progress"]


@pytest.fixture(scope="module")
def alone(char_data, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("alone") / "run"
    done = _train_cli(1, "--data", char_data, *COMMON, "--out", out)
    assert done.returncode == 0, done.stderr
    return _losses(out)


def test_a_run_moves_from_8_to_4_to_1_and_back_to_8_devices_with_the_single_device_losses(
        char_data, alone, tmp_path):
    """Checkpoints saved from one mesh restore onto another (and onto another layout of as
    many devices); the trajectory is unchanged."""
    moved = tmp_path / "moved"
    moves = [(8, "fsdp=8", 3), (4, "data=2,fsdp=2", 6), (1, "data=1", 9), (8, "data=2,fsdp=4", 12)]
    for devices, mesh, stop in moves:
        done = _train_cli(devices, "--data", char_data, *COMMON, "--out", moved, "--mesh", mesh,
                          "--stop-at", stop)
        assert done.returncode == 0, done.stderr
        sizes = {"data": 1, "fsdp": 1, "tensor": 1, **dict(a.split("=") for a in mesh.split(","))}
        assert f"for mesh data={sizes['data']},fsdp={sizes['fsdp']},tensor=1 " in done.stdout
    assert len(_losses(moved)) == 12
    np.testing.assert_allclose(_losses(moved), alone, rtol=1e-5)


def test_a_mesh_that_does_not_fit_the_devices_is_one_line_exit_2(char_data, tmp_path):
    done = _train_cli(2, "--data", char_data, "--preset", "tiny", "--out", tmp_path / "r",
                      "--mesh", "data=4", "--no-progress")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "gptjax: error: mesh data=4,fsdp=1,tensor=1 needs 4 devices, but there are 2; change "
        "the sizes or use -1 for one axis"]
    assert not (tmp_path / "r").exists()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preempt_two_processes(char_data, run: Path, after_records: int) -> int:
    """Run (or resume) a long two-process job until metrics.jsonl holds `after_records` train
    records, SIGTERM one process, and return the step both said they stopped at (and saved)."""
    import re
    import signal
    import time
    script = Path(__file__).resolve().parents[2] / "scripts" / "launch_local_cpu.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    job = subprocess.Popen(
        ["bash", str(script), "2", "2", "--", "--data", str(char_data), *COMMON, "--out", str(run),
         "--join-timeout", "120", "--max-steps", "100000", "--eval-every", "50000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while len(_losses(run) if (run / "metrics.jsonl").exists() else []) < after_records:
            assert job.poll() is None and time.monotonic() < deadline, "training never got there"
            time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2
        os.kill(int(children[-1]), signal.SIGTERM)  # one process: the notice spreads
        _, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:  # the launcher and both processes, not only bash
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 130, err[-3000:]
    stopped = [int(n) for n in re.findall(r"gptjax: stopped by [^\n]*? at step (\d+)", err)]
    assert len(stopped) == 2 and stopped[0] == stopped[1], err[-3000:]  # both, at one step
    # the signalled process names its signal; the other says why it stopped too
    assert "stopped by SIGTERM" in err and "stopped by a signal to another process" in err
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == stopped[0]
    return stopped[0]


def test_a_sigterm_to_one_process_stops_the_job_at_one_saved_step(char_data, tmp_path):
    """A SIGTERM to one of two processes makes both stop at the step they agree on
    (parallel.preemption) and save it; a resumed job stops the same way, and the run
    resumes on one device too."""
    run = tmp_path / "preempted"
    first = _preempt_two_processes(char_data, run, after_records=3)
    second = _preempt_two_processes(char_data, run, after_records=first + 3)
    assert second > first
    done = _train_cli(1, "--out", run, "--stop-at", second + 2, "--no-progress")
    assert done.returncode == 0 and f"from step {second}" in done.stdout, done.stderr[-3000:]


def test_an_unreachable_coordinator_is_one_line_exit_2(char_data, tmp_path):
    done = _train_cli(1, "--data", char_data, "--preset", "tiny", "--out", tmp_path / "r",
                      "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
                      "--process-id", "1", "--join-timeout", "5", "--no-progress")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("gptjax: error: could not join the job")
    assert not (tmp_path / "r").exists()


def test_two_processes_train_together_like_one(char_data, alone, tmp_path):
    """scripts/launch_local_cpu.sh: 2 processes x 4 devices on localhost (jax.distributed, CPU
    collectives) train as one data=8 job, with the single-device losses."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "launch_local_cpu.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = tmp_path / "two"
    done = subprocess.run(
        ["bash", str(script), "2", "4", "--", "--data", str(char_data), *COMMON, "--out", str(run),
         "--join-timeout", "120", "--stop-at", "4",
         # Several eval batches: dispatched all at once, their collectives deadlocked the
         # two processes (gptjax.training.step.mean_loss).
         "--eval-batches", "20"],
        env=env, capture_output=True, text=True, timeout=450)
    assert done.returncode == 0, done.stderr[-3000:]
    # Both processes share the script's stdout; only process 0 speaks, so no line of
    # gptjax's appears twice. Gloo's own connection notices are left out, including the
    # pieces of them that the two processes' writes interleave onto lines of their own.
    lines = [line for line in done.stdout.splitlines()
             if line.strip() and "Gloo" not in line and "peer ranks" not in line]
    assert "for mesh data=8,fsdp=1,tensor=1 (8 devices)" in done.stdout
    assert len(lines) == len(set(lines)), done.stdout
    np.testing.assert_allclose(_losses(run), alone[:4], rtol=1e-5)
