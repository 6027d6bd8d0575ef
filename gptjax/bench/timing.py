"""The timing protocol shared by `gptjax bench` and benchmarks/: a guard that fails when
anything is traced or compiled while the clock runs, and medians with their spread."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from dataclasses import dataclass

import jax

from gptjax.training.compile_log import CACHE_HIT_EVENT, COMPILE_EVENT, TRACE_EVENT  # noqa: F401


class RecompileError(AssertionError):
    """Something was traced or compiled inside a region that must only run compiled code."""


@dataclass
class CompileGuard:
    """What `no_compiles` saw: filled in when its block exits."""

    what: str
    checked: bool = False
    events: list = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        return {"checked": self.checked, "compiles": len(self.events), "region": self.what}


@contextlib.contextmanager
def no_compiles(what: str = "the timed region"):
    """Raise RecompileError if JAX traces or compiles anything inside the block.

    A listener on jax.monitoring's trace and backend-compile events, so it catches
    recompiles of jitted functions, new shapes, and any stray eager op compiled on first
    use. Calls of an AOT-compiled executable record neither event.
    """
    guard = CompileGuard(what)

    def listener(event, duration, **kwargs):
        if event in (TRACE_EVENT, COMPILE_EVENT):
            guard.events.append((event.rsplit("/", 1)[-1], kwargs.get("fun_name", "?"), duration))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield guard
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    if guard.events:
        names = sorted({f"{name} ({kind})" for kind, name, _ in guard.events})
        raise RecompileError(f"{len(guard.events)} trace/compile event(s) in {what}: "
                             + ", ".join(names))
    guard.checked = True


def median_min_max(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
