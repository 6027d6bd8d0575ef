"""Many processes (hosts) training together through jax.distributed.

Every process runs the same command. JAX's coordinator makes their devices one global set,
so the mesh, the shardings and the train step are the same code as on one host. What
changes: each process reads only its rows of each batch (`local_rows`), only process 0
writes files other than checkpoints (orbax coordinates those itself), and host values of
replicated arrays are read from this process's own shard (`host`).
"""

from __future__ import annotations

import numpy as np

from gptjax.errors import GptjaxError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False, timeout: int = 300) -> None:
    """Join the job: explicit coordinator/count/id, or `auto` (TPU VM slices, SLURM, ...)."""
    import jax

    explicit = (coordinator, num_processes, process_id)
    if not auto and all(v is None for v in explicit):
        return
    if not auto and any(v is None for v in explicit):
        raise GptjaxError("--coordinator, --num-processes and --process-id go together "
                          "(or use --distributed to detect the cluster)")
    if not auto and not 0 <= process_id < num_processes:
        raise GptjaxError(f"--process-id {process_id} is not in [0, {num_processes})")
    if not auto and process_id != 0:
        _wait_for_coordinator(coordinator, timeout)
    # CPU devices of different processes talk through gloo; GPU/TPU collectives ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Stops are agreed by gptjax.parallel.preemption; JAX's service would take SIGTERM.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=timeout)
    except Exception as e:  # unreachable coordinator, bad address, undetectable cluster
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = coordinator or "the cluster's coordinator"
        raise GptjaxError(f"could not join the job through {where} within {timeout}s: "
                          f"{first}") from None


def _wait_for_coordinator(address: str, timeout: int) -> None:
    """Fail in one line when process 0 never answers: past its own timeout, JAX's client
    aborts the whole interpreter instead of raising."""
    import socket
    import time

    host_name, _, port = address.rpartition(":")
    if not host_name or not port.isdigit():
        raise GptjaxError(f"--coordinator must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host_name, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise GptjaxError(f"could not join the job through {address} within {timeout}s: "
                                  f"{e.strerror or e}") from None
            time.sleep(0.5)


def is_main() -> bool:
    import jax
    return jax.process_index() == 0


def one_step_at_a_time() -> bool:
    """Whether the training loop must wait for each step before dispatching the next: on
    CPU devices spread over processes (gloo collectives), several steps in flight at once
    can deadlock inside XLA (seen with 50 or more steps dispatched ahead, no signal needed;
    the stacks are described in benchmarks/NOTES.md). GPUs and TPUs keep their lead."""
    import jax
    return jax.process_count() > 1 and jax.default_backend() == "cpu"


def host(x):
    """A replicated array's value, from this process's own copy (works across processes)."""
    if hasattr(x, "addressable_data"):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def local_rows(sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """Indices of the batch rows this process's devices hold, in order."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(global_shape[0])[index[0]])
    return np.array(sorted(rows), np.int64)
