"""Agreeing, on every process of a job, on one step at which to stop after a signal.

A preemption notice (SIGTERM) or a Ctrl-C reaches one process, or several at different
moments. Each records it (`training.stop_signals`). At check steps, the same step numbers
on every process, the processes gather their flags in one tiny collective and all stop
there if any flag is set. Nothing runs in the background and every process computes the
answer from the same gathered values, so they cannot disagree or wait for each other
outside the collectives training already runs.

JAX's own preemption service did this before, with a protocol thread, a mutex shared with
the per-step question and a barrier in the coordination service. About 1 in 50 local
two-process trials never stopped: a notice came, the job stalled and no step was agreed
(benchmarks/RESULTS.md, "Preemption trials"). `distributed.initialize` turns the service
off, so its SIGTERM handler does not compete with ours.
"""

from __future__ import annotations

import jax
import numpy as np

# A multi-process check waits for the steps dispatched before it (the gather queues behind
# them), so it runs every few steps rather than every step; single-process checks are free.
MULTI_PROCESS_CHECK_EVERY = 5


def check_every() -> int:
    """How many steps apart the stop checks are: the stop comes at most this many steps
    after the signal (plus the step in flight)."""
    return 1 if jax.process_count() == 1 else MULTI_PROCESS_CHECK_EVERY


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process; every process must call it at the same point."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
