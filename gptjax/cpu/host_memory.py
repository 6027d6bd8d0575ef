"""Keep freed host memory inside the process, so each XLA:CPU step does not fault it in again.

XLA:CPU gives every execution its temporaries as one block: ~667 MB for the `mini` train
step at batch 8 x 256, ~50 MB for `baby` at 12 x 64. glibc serves a block that size with a
fresh `mmap` and returns it with `munmap` when the step ends: blocks above its mmap
threshold always go that way (the threshold cannot be raised past 32 MiB), and so does any
block a worker thread asks for that will not fit its arena's 64 MiB heap. The next step's
first write to each page then traps into the kernel, which zeroes the page. Measured on
the 2-core machine: 172K minor faults and ~370 ms of kernel time per `mini` step, and about
a quarter of a `baby` step's wall time (benchmarks/NOTES.md, "Train step on XLA:CPU").

`keep_freed_memory()` tells glibc to serve every thread from its main heap, never to `mmap`
a block, and never to give freed memory back, so step two reuses step one's pages. The
cost is resident memory: it stays at its high-water mark, and that mark is higher, because
the next step's block is often allocated before the last one's is freed and a freed block
is a little too small for glibc's aligned allocation of the next. Measured: `mini`'s
resident memory settled at 2.7 GB instead of 1.5 GB (three blocks) after four steps, then
stayed there. So gptjax does not do this on import. `gptjax train` and `gptjax bench` turn
it on (`GPTJAX_KEEP_FREED_MEMORY=0` turns it off), and once the step is compiled,
`fit_to_step` turns it back off when three of its blocks would not fit in half the RAM.
Library users call both themselves.

It must run before JAX starts its CPU runtime: a thread that has already allocated keeps
the arena it has, so a late call would only half apply. It then does nothing and says so.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters from glibc's <malloc.h>, and glibc's defaults for the two we restore.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
# Blocks of one step's temporaries that resident memory settles at (see above).
BLOCKS_KEPT = 3

OPT_OUT_ENV = "GPTJAX_KEEP_FREED_MEMORY"
KEPT = "kept (glibc)"  # what keep_freed_memory() and status() say when the policy is on

_applied = False


def _glibc():
    """The running C library if it is glibc (mallopt's parameters above are glibc's), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it: musl's does not
        return libc
    except (OSError, AttributeError):
        return None


def _jax_runtime_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without this private query: assume started
        return True


def keep_freed_memory() -> str:
    """Apply the policy above if possible; returns what happened, in a few words.

    Idempotent. Does nothing (and says why) when the C library is not glibc, when the
    opt-out variable is "0", or when JAX's runtime has already started in this process.
    """
    global _applied
    if _applied:
        return KEPT
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        return f"system default ({OPT_OUT_ENV}=0)"
    libc = _glibc()
    if libc is None:
        return "system default (not glibc)"
    if _jax_runtime_started():
        return "system default (JAX's runtime had already started)"
    # One arena: big blocks from any thread come from the main heap, which can grow past
    # 64 MiB. No mmap'd blocks, and trimming off (-1), so freed pages stay mapped.
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    if not ok:  # the arena limit may have stuck: harmless on its own
        return "system default (mallopt refused)"
    _applied = True
    return KEPT


def fit_to_step(temp_bytes: int, ram_bytes: int | None = None, backend: str | None = None,
                devices: int = 1) -> str | None:
    """Once a step is compiled (`temp_bytes` from its memory_analysis(), per device; `devices`
    CPU devices in this process each run one), undo the policy where it does not pay:
    silently when the step runs on an accelerator (its temporaries are not host memory),
    and with a one-line message (returned) when BLOCKS_KEPT such blocks per device would
    pass half the RAM (or of the cgroup's limit). Returns None when nothing needs saying."""
    if not _applied:
        return None
    if (backend or _default_backend()) != "cpu":
        _restore_defaults()
        return None
    ram = ram_bytes if ram_bytes is not None else _ram_bytes()
    if ram is None or BLOCKS_KEPT * temp_bytes * devices <= ram // 2:
        return None
    _restore_defaults()
    return (f"freed host memory is no longer kept: {BLOCKS_KEPT} x the step's "
            f"{temp_bytes * devices / 2**30:.1f} GiB of temporaries would pass half of the "
            f"{ram / 2**30:.0f} GiB of RAM (steps will be slower on CPU)")


def fit_to_compiled(compiled) -> str | None:
    """fit_to_step for a compiled JAX step: its temporaries per device, times this
    process's devices."""
    import jax
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # not every backend reports a memory plan
        return None
    return fit_to_step(int(temp or 0), devices=jax.local_device_count())


def _restore_defaults() -> None:
    """mmap and trimming back, and the kept free memory handed back to the system. Not all
    of glibc's defaults: threads stay on the one arena (they cannot be moved), and the mmap
    threshold no longer adapts. Neither has been measured on an accelerator host."""
    global _applied
    libc = _glibc()
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _applied = False


def _default_backend() -> str:
    import jax
    return jax.default_backend()


def _ram_bytes() -> int | None:
    """Physical memory, or the container's cgroup v2 limit where that is lower."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        return min(ram, int(limit)) if limit.isdigit() else ram
    except OSError:
        return ram


def status() -> str:
    """What `keep_freed_memory` has done in this process, for benchmark records."""
    return KEPT if _applied else "system default"
