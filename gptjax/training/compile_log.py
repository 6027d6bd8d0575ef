"""Compile telemetry: what JAX traced and compiled while a run was set up and trained.

A listener on jax.monitoring's events, open for the run, collects per function: traces to
a jaxpr and their seconds, XLA compiles and their seconds, and persistent-cache hits and
misses (recorded inside the compile they belong to, so each is credited to the compile
event that follows it). Functions passed through `watch` also note the argument shapes of
every trace, so a retrace says which shapes caused it. Calls of an AOT-compiled
executable record nothing: in a healthy run, everything appears once, at start-up.
"""

from __future__ import annotations

import functools
import threading

import jax

# jax.monitoring events: tracing a Python function to a jaxpr, and an XLA compile (recorded
# for persistent-cache hits too, which still load an executable); the cache's verdicts.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


def _bare(name: str) -> str:
    """A compile event names jit(f) where its trace event names f: one name for both."""
    return name[4:-1] if name.startswith("jit(") and name.endswith(")") else name


def describe_shapes(args) -> str:
    """'inputs: int32[12,64], ...' for the leaves of a call's arguments (at most 8 shown)."""
    leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    parts = [f"{jax.tree_util.keystr(path) or 'arg'}: {getattr(x, 'dtype', type(x).__name__)}"
             f"[{','.join(map(str, getattr(x, 'shape', ())))}]" for path, x in leaves]
    return ", ".join(parts[:8]) + (f", ... ({len(parts)} leaves)" if len(parts) > 8 else "")


class CompileLog:
    """Collects trace, compile and persistent-cache events between open() and close()."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: list[tuple[str, str, float]] = []  # (kind, function, seconds)
        self._cache: list[str] = []  # cache events waiting for their compile event
        self._shapes: dict[str, list[str]] = {}  # watched function -> shapes of each trace
        self._reported = 0
        self._traced: dict[str, int] = {}  # function -> traces reported so far

    def _on_duration(self, event, seconds, **kwargs):
        kind = {TRACE_EVENT: "trace", COMPILE_EVENT: "compile"}.get(event)
        if kind is None:
            return
        with self._lock:
            name = _bare(kwargs.get("fun_name", "?"))
            self._events.append((kind, name, seconds))
            if kind == "compile":
                self._events.extend((c, name, 0.0) for c in self._cache)
                self._cache.clear()

    def _on_event(self, event, **kwargs):
        kind = {CACHE_HIT_EVENT: "cache_hit", CACHE_MISS_EVENT: "cache_miss"}.get(event)
        if kind is not None:
            with self._lock:
                self._cache.append(kind)

    def open(self) -> CompileLog:
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    def __enter__(self) -> CompileLog:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def watched(self, name: str) -> bool:
        return name in self._shapes

    def watch(self, name: str, fn):
        """fn, renamed `name` in the events, noting its argument shapes at every trace (the
        body of a jitted function runs in Python only while it is traced)."""
        @functools.wraps(fn)
        def traced(*args):
            with self._lock:
                self._shapes.setdefault(name, []).append(describe_shapes(args))
            return fn(*args)
        traced.__name__ = traced.__qualname__ = name
        return traced

    def new_records(self, step: int) -> list[dict]:
        """metrics.jsonl records (kind "compile") of the events since the last call, one per
        function; `retrace` marks a function traced before, with its traces' shapes."""
        with self._lock:
            events, self._reported = self._events[self._reported:], len(self._events)
        by_function: dict[str, dict] = {}
        for kind, name, seconds in events:
            r = by_function.setdefault(name, {"kind": "compile", "step": step, "function": name,
                                              "traces": 0, "trace_s": 0.0, "compiles": 0,
                                              "compile_s": 0.0, "cache_hits": 0, "cache_misses": 0})
            if kind in ("trace", "compile"):
                r[f"{kind}s"] += 1
                r[f"{kind}_s"] = round(r[f"{kind}_s"] + seconds, 4)
            else:
                r[f"{kind}es" if kind == "cache_miss" else f"{kind}s"] += 1
        for name, r in by_function.items():
            before = self._traced.get(name, 0)
            self._traced[name] = before + r["traces"]
            if r["traces"] and (before or r["traces"] > 1):
                r["retrace"] = True
                shapes = self._shapes.get(name, [])
                if shapes:  # the shapes of its last traces, the one that caused this last
                    r["shapes"] = shapes[-(r["traces"] + 1):]
        return list(by_function.values())


def summary(records: list[dict]) -> str:
    """One console line: each function's compile seconds, and the cache's hits."""
    compiled = [r for r in records if r["compiles"]]
    def seconds(r):
        return r["compile_s"] + r["trace_s"]
    compiled.sort(key=seconds, reverse=True)
    parts = [f"{r['function']} {seconds(r):.1f}s" for r in compiled[:4]]
    if len(compiled) > 4:
        parts.append(f"{len(compiled) - 4} more in {sum(map(seconds, compiled[4:])):.1f}s")
    hits, misses = (sum(r[k] for r in records) for k in ("cache_hits", "cache_misses"))
    if hits or misses:
        cache = f"persistent cache: {hits} hit(s), {misses} miss(es)"
        if misses:  # a miss is written back only if it took long enough to be worth keeping
            cache += (f" (a compile under {jax.config.jax_persistent_cache_min_compile_time_secs:g}s "
                      "is not kept: JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS)")
    elif jax.config.jax_compilation_cache_dir:
        cache = "persistent cache: set, but no compile here consulted it"
    else:
        cache = "persistent cache: not used (set JAX_COMPILATION_CACHE_DIR to keep compiles)"
    return f"traced and compiled: {', '.join(parts) or 'nothing'}; {cache}"
