"""Choosing between ways of computing the same thing by timing them once on this machine.

Which of two equivalent paths is faster can depend on the CPU generation (benchmarks/NOTES.md,
decode 15: the native decode kernel against XLA's dot), and a CPU's name does not say which.
`fastest` times the candidates, alternating, keeps the answer with its timings in a JSON
record, and afterwards reads it back, so each machine pays for the measurement once.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
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
    path rather than following the noise. (Seven repeats of two ~5 ms runs put the ratio of
    the same two paths anywhere in 0.95-1.23 on a busy 2-core machine; 21 kept it in
    1.00-1.06.) Runs under `jax.ensure_compile_time_eval`, so this
    may be called while a jitted function is being traced."""
    recorded = _read(record).get(key)
    if isinstance(recorded, dict) and isinstance(recorded.get("choice"), str):
        return recorded["choice"]
    with jax.ensure_compile_time_eval():
        candidates = make_candidates()
        if prefer not in candidates:
            raise ValueError(f"prefer={prefer!r} is not one of the candidates {list(candidates)}")
        for run in candidates.values():
            jax.block_until_ready(run())  # compiles and warms; untimed
        seconds = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, run in candidates.items():
                start = clock()
                jax.block_until_ready(run())
                seconds[name].append(clock() - start)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    best = min(medians, key=medians.get)
    choice = prefer if medians[prefer] <= (1 + margin) * medians[best] else best
    entry = {"choice": choice, "median_ms": {n: round(s * 1e3, 3) for n, s in medians.items()},
             "repeats": repeats, "prefer_within": margin,
             "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        _write_atomically(record, json.dumps({**_read(record), key: entry}, indent=1) + "\n")
    except OSError:
        pass  # a read-only cache: the choice still holds for this process, and is measured again
    return choice


def _read(record: Path) -> dict:
    """The record's entries; {} where it is missing or unreadable (it is measured again)."""
    try:
        entries = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_atomically(path: Path, text: str) -> None:
    """Concurrent processes each replace the whole file: a reader never sees half of one."""
    fd, partial = tempfile.mkstemp(suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
