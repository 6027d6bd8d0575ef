"""host_memory.keep_freed_memory: repeated XLA:CPU executions stop faulting their temporaries
back in, and the policy is never half applied. Fresh interpreters, since it must run before
JAX's runtime starts (this pytest process has long since started it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from gptjax.cpu import host_memory

needs_glibc = pytest.mark.skipif(host_memory._glibc() is None,
                                 reason="the policy is glibc's mallopt; other C libraries keep theirs")

# A jitted function whose 128 MiB intermediate (8192 x 4096 float32) lives in XLA's per-call
# temporary block: larger than glibc's largest mmap threshold and than a thread arena's heap.
_FAULTS_PER_CALL = """
import resource, sys, time
from gptjax.cpu import host_memory
state = host_memory.keep_freed_memory() if sys.argv[1] != "system" else "untouched"
if sys.argv[1] == "undone":  # a step whose 3 blocks would pass half of a 64 MiB machine
    state = host_memory.fit_to_step(128 << 20, ram_bytes=64 << 20, backend="cpu").split(":")[0]
import jax, jax.numpy as jnp
x = jnp.ones((8192, 64)); w = jnp.ones((64, 4096)); u = jnp.ones((4096, 8))
f = jax.jit(lambda x, w, u: (x @ w) @ u)
def call():
    f(x, w, u).block_until_ready()
    # XLA frees a call's block just after its result is ready; back-to-back calls can race
    # that and grow the heap for a while (host_memory's docstring). Not what is tested here.
    time.sleep(0.05)
for _ in range(2):
    call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    call()
print(state, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _python(code: str, *args: str, env: dict | None = None) -> str:
    """Run `code` in a fresh interpreter with the policy allowed (conftest turns it off)."""
    env = {**os.environ, host_memory.OPT_OUT_ENV: "1", **(env or {})}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@needs_glibc
def test_kept_memory_is_reused_where_glibc_would_fault_it_in_every_call():
    kept_state, kept_faults = _python(_FAULTS_PER_CALL, "keep").rsplit(" ", 1)
    system_state, system_faults = _python(_FAULTS_PER_CALL, "system").rsplit(" ", 1)
    undone_state, undone_faults = _python(_FAULTS_PER_CALL, "undone").rsplit(" ", 1)
    assert kept_state == host_memory.KEPT and system_state == "untouched"
    assert undone_state == "freed host memory is no longer kept"
    # 128 MiB is 32,768 pages of 4 KiB: glibc's default maps and faults them in on every call,
    # and so it does again once fit_to_step has restored the default.
    assert float(system_faults) > 20_000 and float(undone_faults) > 20_000
    assert float(kept_faults) < 500


_FIT = """
import sys
from gptjax.cpu import host_memory
host_memory.keep_freed_memory()
said = host_memory.fit_to_step(1 << 30, ram_bytes=8 << 30, backend=sys.argv[1])  # 3 <= 4 GiB
print(said, host_memory.status())
"""


@needs_glibc
def test_fit_to_step_keeps_the_policy_when_three_blocks_fit_and_only_on_cpu():
    assert _python(_FIT, "cpu") == "None kept (glibc)"
    assert _python(_FIT, "gpu") == "None system default"  # device temporaries: not host memory


def test_too_late_or_opted_out_changes_nothing(monkeypatch):
    import jax
    jax.devices()  # this process's runtime has started
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "1")
    assert host_memory.keep_freed_memory() == "system default (JAX's runtime had already started)"
    assert host_memory.status() == "system default"
    opted_out = _python("from gptjax.cpu import host_memory; print(host_memory.keep_freed_memory())",
                        env={host_memory.OPT_OUT_ENV: "0"})
    assert opted_out == f"system default ({host_memory.OPT_OUT_ENV}=0)"


@needs_glibc
def test_training_commands_keep_it_and_record_it(tmp_path):
    out = tmp_path / "bench.json"
    _python("import sys; from gptjax.cli import main; sys.exit(main(sys.argv[1:]))",
            "bench", "--preset", "tiny", "--batch", "2", "--steps", "1", "--repeats", "1",
            "--warmup", "1", "--json", str(out))
    assert json.loads(out.read_text())["machine"]["host_memory"] == host_memory.KEPT
