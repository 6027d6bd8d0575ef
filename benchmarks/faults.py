"""Fault injection on `gptjax train`, each experiment a function that returns its outcome.

tests/faults/ runs each experiment a few times and asserts the outcome; run as a script, it
runs them many times and prints the counts that benchmarks/RESULTS.md records:

    python benchmarks/faults.py --kills 50 --data PREPARED_DIR

Every run is a tiny char model trained for STEPS steps with a checkpoint every EVAL_EVERY;
"equal" means the final parameters and optimizer state are bitwise equal to an
uninterrupted run's.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np

STEPS, EVAL_EVERY = 40, 5
RUN_FLAGS = ["--preset", "tiny", "--batch-size", "4", "--warmup-steps", "2", "--log-every", "5",
             "--eval-every", str(EVAL_EVERY), "--eval-batches", "2", "--max-new-tokens", "0",
             "--max-steps", str(STEPS), "--no-progress"]

# Runs the CLI with the rename that commits a checkpoint (orbax's atomic temporary folder)
# paused once every item of step >= `at` has been written: a kill there lands inside a save.
PAUSED_SAVE = """
import sys, time
from orbax.checkpoint._src.path import atomicity
original = atomicity.AtomicRenameTemporaryPath.finalize
done = []  # one pause per run
async def paused(self, *args, **kwargs):
    name = self.get().name
    if name.split(".")[0].isdigit() and int(name.split(".")[0]) >= {at} and not done:
        done.append(name)
        print(f"finalizing {{name}}", flush=True)
        time.sleep({pause})
    return await original(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = paused
from gptjax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_argv(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gptjax", "train", "--data", str(data), "--out", str(out),
            *RUN_FLAGS, *extra]


def run(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def final_state(run_dir: Path) -> list[np.ndarray]:
    """Every leaf of the run's latest TrainState, as saved (verified on the way)."""
    from gptjax import config as C
    from gptjax.training.checkpoint import Checkpoints
    from gptjax.training.step import init_state

    cfg = C.load(Path(run_dir) / "config.json")
    abstract = jax.eval_shape(lambda: init_state(cfg.model, cfg.train))
    ckpts = Checkpoints(Path(run_dir) / "checkpoints", create=False)
    try:
        state, _ = ckpts.restore(abstract)
    finally:
        ckpts.close()
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def reference(work: Path, data: Path) -> list[np.ndarray]:
    out = work / "reference"
    done = run(train_argv(out, data))
    assert done.returncode == 0, done.stderr
    return final_state(out)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    """Read the process's stdout until a line contains `text`."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if text in line:
            return
        if time.time() > deadline:
            break
    raise RuntimeError(f"never printed {text!r}")


def kill_at(work: Path, data: Path, ref, seconds: float) -> str:
    """kill -9 after `seconds`, then the same command again: 'equal', 'differs' or 'failed'."""
    out = work / f"kill-{seconds:.2f}"
    proc = subprocess.Popen(train_argv(out, data), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    proc.kill()
    proc.wait()
    return _rerun_and_compare(out, data, ref)


def kill_inside_save(work: Path, data: Path, ref, at: int = 2 * EVAL_EVERY) -> str:
    """kill -9 while a checkpoint is written but not yet committed, then rerun."""
    out = work / f"kill-in-save-{at}"
    proc = _paused_save(out, data, at, pause=60)
    try:
        _wait_for(proc, "finalizing")
        assert list((out / "checkpoints").glob("*.orbax-checkpoint-tmp*")), "no save in flight"
    finally:
        proc.kill()
        proc.wait()
    return _rerun_and_compare(out, data, ref)


def _paused_save(out: Path, data: Path, at: int, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PAUSED_SAVE.format(at=at, pause=pause), "train",
                             "--data", str(data), "--out", str(out), *RUN_FLAGS],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _rerun_and_compare(out: Path, data: Path, ref) -> str:
    if not (out / "config.json").exists():  # killed before the run existed: a fresh start
        shutil.rmtree(out, ignore_errors=True)
    done = run(train_argv(out, data))
    if done.returncode != 0:
        return "failed: " + done.stderr.strip().splitlines()[-1][:200]
    return "equal" if equal(final_state(out), ref) else "differs"


def signal_and_resume(work: Path, data: Path, ref, sig: int, after_step: int = 12) -> tuple[int, str, str]:
    """Send `sig` once step `after_step` is logged: (exit code, last stderr line, outcome of
    the rerun)."""
    out = work / f"signal-{sig}"
    proc = subprocess.Popen(train_argv(out, data, "--log-every", "1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(proc, f"step {after_step}: train loss")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    last = (stderr.strip().splitlines() or [""])[-1]
    return proc.returncode, last, _rerun_and_compare(out, data, ref)


def damage(run_dir: Path, rel: str, mode: str, ref) -> str:
    """Damage one file of a copy of `run_dir` ("flip" 16 bytes, "truncate" to half,
    "delete"), then restore its latest checkpoint as resume does: 'detected', 'harmless'
    (restored bitwise equal: orbax never reads that byte), 'silent' or 'crash: ...'."""
    from gptjax.errors import CheckpointDamaged

    work = Path(tempfile.mkdtemp(prefix="gptjax-damage-"))
    try:
        copy = work / "run"
        shutil.copytree(run_dir, copy)
        path = copy / rel
        blob = bytearray(path.read_bytes())
        if mode == "flip":
            at = len(blob) // 2
            for i in range(at, min(at + 16, len(blob))):
                blob[i] ^= 0xFF
            path.write_bytes(bytes(blob))
        elif mode == "truncate":
            path.write_bytes(bytes(blob[:len(blob) // 2]))
        else:
            path.unlink()
        try:
            state = final_state(copy)
        except CheckpointDamaged:
            return "detected"
        except Exception as e:  # noqa: BLE001  anything else is an outcome to report
            return f"crash: {type(e).__name__}: {str(e)[:120]}"
        return "harmless" if equal(state, ref) else "silent"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def checkpoint_files(run_dir: Path) -> list[str]:
    latest = max((p for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    return sorted(str(p.relative_to(run_dir)) for p in latest.rglob("*") if p.is_file())


def concurrent_writers(work: Path, data: Path) -> tuple[int, str]:
    """A second `gptjax train` on the same --out while the first runs: its exit code and
    stderr; the first must still finish."""
    out = work / "shared-out"
    first = _paused_save(out, data, EVAL_EVERY, pause=15)  # held open by a slow first save
    try:
        _wait_for(first, "finalizing")
        second = run(train_argv(out, data))
    finally:
        first.communicate(timeout=300)
    assert first.returncode == 0
    return second.returncode, second.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared char data (gptjax prepare ... --tokenizer char)")
    p.add_argument("--kills", type=int, default=50, help="random kill -9 trials")
    p.add_argument("--saves", type=int, default=10, help="kill -9 inside a save trials")
    p.add_argument("--signals", type=int, default=5, help="trials of each of SIGTERM and SIGINT")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="gptjax-faults-"))
    data = Path(args.data)
    try:
        t0 = time.time()
        ref = reference(work, data)
        one_run = time.time() - t0
        kills = Counter(kill_at(work / f"k{i}", data, ref, rng.uniform(0.5, one_run))
                        for i in range(args.kills))
        print(f"kill -9 at random (0.5-{one_run:.1f} s into a {one_run:.1f} s run), then rerun: "
              f"{dict(kills)}")
        saves = Counter(kill_inside_save(work / f"s{i}", data, ref, at=EVAL_EVERY * rng.randint(1, 7))
                        for i in range(args.saves))
        print(f"kill -9 inside a save, then rerun: {dict(saves)}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            results = Counter()
            for i in range(args.signals):
                code, _, outcome = signal_and_resume(work / f"{sig.name}{i}", data, ref, sig,
                                                     after_step=rng.randint(3, STEPS - 5))
                results[f"exit {code}, rerun {outcome}"] += 1
            print(f"{sig.name} mid-run, then rerun: {dict(results)}")
        damages = Counter()
        for rel in checkpoint_files(work / "reference"):
            for mode in ("flip", "truncate", "delete"):
                outcome = damage(work / "reference", rel, mode, ref)
                damages[outcome.split(":")[0]] += 1
                if outcome not in ("detected", "harmless"):
                    print(f"  {mode} {rel}: {outcome}")
        print(f"damage to each file of the latest checkpoint (flip, truncate, delete): {dict(damages)}")
        code, err = concurrent_writers(work, data)
        print(f"second writer on one --out: exit {code}: {err.strip()[:160]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
