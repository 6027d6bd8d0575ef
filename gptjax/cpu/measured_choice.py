"""Choosing between ways of computing the same thing by timing them once on this machine.

Which of two equivalent paths is faster can depend on the CPU generation (benchmarks/NOTES.md,
decode 15: the native decode kernel against XLA's dot), and a CPU's name does not say which.
`fastest` times the candidates, alternating, keeps the answer with its timings in a JSON
record, and afterwards reads it back, so each machine pays for the measurement once.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import jax

Candidates = dict[str, Callable[[], object]]  # name -> one run (returns what to wait for)


def fastest(record: Path, key: str, make_candidates: Callable[[], Candidates], *,
            prefer: str, margin: float = 0.03, repeats: int = 21,
            clock: Callable[[], float] = time.perf_counter) -> str:
    """The name of the fastest candidate for `key`, from `record` when it holds one.

    Otherwise `make_candidates()` builds the runs (only then, so a recorded answer costs
    nothing); each runs once untimed, then `repeats` times in alternation, and the lowest
    median wins, unless `prefer` is within `margin` of it: a near tie keeps the preferred
    path rather than following the noise. One process measures at a time (a lock beside the
    record), so processes that start together neither share the machine while timing nor
    measure twice. Runs under `jax.ensure_compile_time_eval`, so this may be called while a
    jitted function is being traced. If the measurement fails, `prefer` is returned, with a
    warning, and nothing is recorded: the candidates compute the same thing, so the
    choice is only ever about speed."""
    recorded = _recorded_choice(record, key)
    if recorded:
        return recorded
    with one_process_at_a_time(record):
        recorded = _recorded_choice(record, key)  # measured while this process waited
        if recorded:
            return recorded
        try:
            medians = _medians(make_candidates, repeats, clock)
        except Exception as err:  # noqa: BLE001 (any failure leaves the preferred path)
            warnings.warn(f"could not time the candidates for {key!r}, using {prefer!r}: "
                          f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
            return prefer
        if prefer not in medians:
            raise ValueError(f"prefer={prefer!r} is not one of the candidates {list(medians)}")
        best = min(medians, key=medians.get)
        choice = prefer if medians[prefer] <= (1 + margin) * medians[best] else best
        entry = {"choice": choice,
                 "median_ms": {n: round(s * 1e3, 3) for n, s in medians.items()},
                 "repeats": repeats, "prefer_within": margin,
                 "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            write_atomically(record, json.dumps({**read_record(record), key: entry}, indent=1) + "\n")
        except OSError:
            pass  # a read-only cache: the choice holds for this process, measured again next
    return choice


def _medians(make_candidates: Callable[[], Candidates], repeats: int,
             clock: Callable[[], float]) -> dict[str, float]:
    # Transfers are allowed whatever guard the caller set: the runs' inputs are made here.
    with jax.ensure_compile_time_eval(), jax.transfer_guard("allow"):
        candidates = make_candidates()
        for run in candidates.values():
            _wait(run())  # compiles and warms; untimed
        seconds = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, run in candidates.items():
                start = clock()
                _wait(run())
                seconds[name].append(clock() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def _wait(out) -> None:
    """Block until `out` is computed; refuse a traced value (under a transformation that
    stages even compile-time-eval code, timing would measure tracing, not running)."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(out)):
        raise RuntimeError("the candidates were traced, not run")
    jax.block_until_ready(out)


def _recorded_choice(record: Path, key: str) -> str | None:
    """The recorded choice for `key`, if the entry is whole: a choice among its timings."""
    entry = read_record(record).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("median_ms"), dict):
        choice = entry.get("choice")
        if isinstance(choice, str) and choice in entry["median_ms"]:
            return choice
    return None


@contextlib.contextmanager
def one_process_at_a_time(record: Path):
    try:
        import fcntl  # POSIX; elsewhere processes may measure side by side
        lock = open(record.with_name(record.name + ".lock"), "a")
    except (ImportError, OSError):  # no fcntl, or a read-only cache
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def read_record(record: Path) -> dict:
    """The record's entries; {} where it is missing or unreadable (it is measured again)."""
    try:
        entries = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_atomically(path: Path, text: str) -> None:
    """Concurrent processes each replace the whole file: a reader never sees half of one."""
    fd, partial = tempfile.mkstemp(suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(partial, 0o644)  # mkstemp's 0600 would hide it from a shared cache's users
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
