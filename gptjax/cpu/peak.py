"""This CPU's matmul peak, the denominator of MFU: measured well once, kept, reused.

A rate measured in half a second at a run's start reads whatever else the machine is doing:
on a 2-core Xeon one start-up measured 0.088 TFLOP/s, a quiet one 0.29, and the busy run
then showed MFU 117% (issue 32). So the first measurement on a machine takes longer
(`THOROUGH_SECONDS`), and its rate is recorded in `peak-flops.json` beside the native
kernels' records in gptjax's cache, keyed by CPU model, usable cores and dtype. Each run
still measures briefly at start: a higher rate replaces the record (records only ever
rise), one far below it says the machine is busy (in the run's start-up line), and the
run uses the record either way.
A cache that cannot be written is no error: the run uses what it measured.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

from gptjax.cpu import machine
from gptjax.cpu.measured_choice import one_process_at_a_time, read_record, write_atomically

THOROUGH_SECONDS = 2.0  # the first measurement on a machine: the best of this long a run
QUICK_SECONDS = 0.5  # each run's check at start
BUSY_BELOW = 0.5  # a start-up rate under this share of the record: the machine is busy
REDO = "gptjax bench --remeasure-peak to redo"


@dataclass(frozen=True)
class Peak:
    flops: float  # per process: multiply by the job's processes
    source: str  # for config.json, metrics.jsonl and the start-up line


def matmul_rate(product: Callable[[], object], n: int, repeats: int = 10,
                min_seconds: float = QUICK_SECONDS) -> float:
    """FLOP/s of `product()`, one finished n x n x n product per call (any library): the
    best call of at least `repeats` and at least `min_seconds`, after one untimed call."""
    product()
    best, done, start = float("inf"), 0, time.perf_counter()
    while done < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - t0)
        done += 1
    return 2.0 * n ** 3 / best


def measure_matmul(dtype: str = "float32", min_seconds: float = QUICK_SECONDS,
                   n: int = 1024) -> float:
    """The n x n matmul rate of the default device in `dtype`, in FLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    return matmul_rate(lambda: mm(a).block_until_ready(), n, 10, min_seconds)


def record_path() -> Path:
    from gptjax.cpu import native
    return native.cache_dir() / "peak-flops.json"


def key(dtype: str) -> str:
    return f"{machine.cpu_model()} | {machine.usable_cores()} threads | {dtype} matmul"


def recorded(dtype: str) -> dict | None:
    """{"flops", "measured" (a date)} for this machine, or None."""
    entry = read_record(record_path()).get(key(dtype))
    ok = isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0
    return entry if ok else None


def cpu_peak(dtype: str = "float32", measure: Callable[..., float] | None = None) -> Peak:
    """The peak a run on this CPU uses: the record (made now, thoroughly, if there is none),
    raised by a better start-up measurement, kept over a worse one (noted in its source)."""
    measure = measure or measure_matmul
    entry = recorded(dtype)
    if entry is None:
        with _one_writer():  # processes starting together: one measures, the rest read it
            entry = recorded(dtype)
            if entry is None:
                rate = measure(dtype, min_seconds=THOROUGH_SECONDS)
                where = ("recorded" if _store(dtype, rate)
                         else "not recorded: the cache is not writable")
                return Peak(rate, f"{dtype} matmul measured on this machine now ({where}); {REDO}")
    quick = measure(dtype, min_seconds=QUICK_SECONDS)
    if quick > entry["flops"]:
        with _one_writer():
            _store(dtype, quick, only_if_higher=True)
        return Peak(quick, f"{dtype} matmul measured on this machine now, a new best; {REDO}")
    # Said in the run's start-up line (stdout) rather than as a warning on stderr, where a
    # failing command keeps to its one line.
    busy = (f"; the machine looks busy: {quick / 1e12:.3g} at start, so the record is used"
            if quick < BUSY_BELOW * entry["flops"] else "")
    return Peak(entry["flops"], f"{dtype} matmul measured on this machine, {entry['measured']}; "
                f"{REDO}{busy}")


def raise_record(dtype: str, flops: float) -> bool:
    """Raise the record to a rate a run achieved above it; whether it was written. No
    record is made from this: a first one is always a thorough measurement."""
    with _one_writer():
        return recorded(dtype) is not None and _store(dtype, flops, only_if_higher=True)


def remeasure(dtype: str = "float32", measure: Callable[..., float] | None = None
              ) -> tuple[float | None, float, bool]:
    """Measure thoroughly and replace the record whatever it held: (old, new FLOP/s, saved)."""
    measure = measure or measure_matmul
    with _one_writer():
        entry = recorded(dtype)
        rate = measure(dtype, min_seconds=THOROUGH_SECONDS)
        saved = _store(dtype, rate)
    return (entry["flops"] if entry else None), rate, saved


@contextlib.contextmanager
def _one_writer():
    """The record's lock (none where the cache cannot be made: nothing is written there)."""
    try:
        record_path().parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    with one_process_at_a_time(record_path()):
        yield


def _store(dtype: str, flops: float, only_if_higher: bool = False) -> bool:
    """Write the rate into the record (the caller holds `_one_writer`); whether it was."""
    old = recorded(dtype)
    if only_if_higher and old is not None and old["flops"] >= flops:
        return False
    entries = read_record(record_path())
    entries[key(dtype)] = {"flops": flops, "measured": date.today().isoformat()}
    try:
        write_atomically(record_path(), json.dumps(entries, indent=1) + "\n")
        return True
    except OSError:
        return False
