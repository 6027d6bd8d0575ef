"""Compile telemetry: traces and compiles per function, a retrace with the shapes of each
trace, and `gptjax train` logging its compiles once at start-up, with the persistent
cache's hits on a second run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from conftest import REPO, TINY_RUN

from gptjax.training.compile_log import CompileLog, summary


def test_a_new_shape_is_a_retrace_naming_both_shapes():
    with CompileLog() as log:
        f = jax.jit(log.watch("scale", lambda x, y: x * y["k"]))
        f(jnp.ones((2, 3)), {"k": 2.0})
        (first,) = [r for r in log.new_records(0) if r["function"] == "scale"]
        f(jnp.ones((2, 3)), {"k": 3.0})  # same shapes: nothing new
        assert [r for r in log.new_records(1) if r["function"] == "scale"] == []
        f(jnp.ones((4, 3)), {"k": 2.0})
        (again,) = [r for r in log.new_records(2) if r["function"] == "scale"]
    assert first["traces"] == first["compiles"] == 1 and "retrace" not in first
    assert first["compile_s"] > 0 and first["step"] == 0
    assert again["retrace"] and again["step"] == 2 and again["traces"] == 1
    assert again["shapes"] == ["[0]: float32[2,3], [1]['k']: float32[]",
                               "[0]: float32[4,3], [1]['k']: float32[]"]
    assert log.watched("scale") and not log.watched("other")
    assert summary([first]).startswith("traced and compiled: scale ")


def _train(out, cache):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # cached however fast it compiles
    done = subprocess.run([sys.executable, "-m", "gptjax", "train", "--out", str(out), *TINY_RUN,
                           "--max-steps", "4", "--max-new-tokens", "0"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return done.stdout, {r["function"]: r for r in records if r["kind"] == "compile" and r["step"] == 0}, \
        [r for r in records if r["kind"] == "compile" and r["step"] > 0]


def test_train_logs_each_compile_once_and_a_second_run_hits_the_persistent_cache(tmp_path):
    said, first, later = _train(tmp_path / "a", tmp_path / "cache")
    for name in ("train_step", "eval_step", "init_state"):
        assert first[name]["traces"] == first[name]["compiles"] == 1, name
    assert first["train_step"]["cache_misses"] == 1 and first["train_step"]["cache_hits"] == 0
    assert "persistent cache: 0 hit(s)" in said
    # the steps are compiled ahead of time: the loop never traces them again
    assert not [r for r in later if r["function"] in ("train_step", "eval_step")]
    said, second, _ = _train(tmp_path / "b", tmp_path / "cache")
    assert second["train_step"]["cache_hits"] == 1 and second["train_step"]["cache_misses"] == 0
    assert second["train_step"]["compile_s"] < first["train_step"]["compile_s"]
    assert "persistent cache: 0 hit(s)" not in said and "hit(s)" in said
