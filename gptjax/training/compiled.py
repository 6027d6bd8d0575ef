"""The train and eval steps compiled ahead of time for a run's mesh, with the state and
batch layouts they expect, so that config errors surface before anything is written."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import config as C
from gptjax.cpu import host_memory
from gptjax.errors import GptjaxError
from gptjax.parallel.distributed import local_rows
from gptjax.parallel.mesh import make_mesh
from gptjax.parallel.sharding import batch_sharding, check_batch, check_divisible, shardings
from gptjax.training import optim
from gptjax.training.compile_log import CompileLog
from gptjax.training.step import init_state, make_eval_step, make_train_step


class CompiledSteps:
    """train_step and eval_step for the run's mesh, and a jitted init_state laid out on it;
    with train.stats_every, stats_step too (the train step with per-layer statistics)."""

    def __init__(self, cfg: C.RunConfig, compile_log: CompileLog | None = None):
        m, t = cfg.model, cfg.train
        named = compile_log.watch if compile_log else lambda name, fn: fn  # names in telemetry
        self.mesh = make_mesh(t.mesh)
        check_divisible(m, self.mesh)
        check_batch(t.batch_size, self.mesh, t.grad_accum)
        self.tx = optim.optimizer(t)
        abstract = jax.eval_shape(lambda: init_state(m, t, self.tx))
        self.state_sharding = shardings(abstract, self.mesh)
        # Shapes that carry their sharding: orbax restores each shard onto its device.
        self.abstract_state = jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
            abstract, self.state_sharding)
        self.batch_sharding = batch_sharding(self.mesh)
        self.eval_rows = t.batch_size // t.grad_accum  # evaluation never needs more memory

        def tokens(rows):
            return jax.ShapeDtypeStruct((rows, m.context_length), jnp.int32)
        batch = {"inputs": tokens(t.batch_size), "targets": tokens(t.batch_size)}
        eval_batch = {"inputs": tokens(self.eval_rows), "targets": tokens(self.eval_rows),
                      "weights": jax.ShapeDtypeStruct((self.eval_rows, m.context_length), jnp.float32)}
        replicated = NamedSharding(self.mesh, P())
        started = time.perf_counter()
        try:
            with jax.set_mesh(self.mesh):  # traced under the mesh: activations stay row-split
                self.train_step = jax.jit(
                    named("train_step", make_train_step(m, t, self.tx)), donate_argnums=0,
                    in_shardings=(self.state_sharding, self.batch_sharding),
                    out_shardings=(self.state_sharding, replicated)).lower(abstract, batch).compile()
                # The statistics step is a second executable: the plain step stays as it was.
                self.stats_step = None if not t.stats_every else jax.jit(
                    named("stats_step", make_train_step(m, t, self.tx, stats=True)), donate_argnums=0,
                    in_shardings=(self.state_sharding, self.batch_sharding),
                    out_shardings=(self.state_sharding, replicated)).lower(abstract, batch).compile()
                self.eval_step = jax.jit(
                    named("eval_step", make_eval_step(m)),
                    in_shardings=(self.state_sharding.params, self.batch_sharding),
                    out_shardings=replicated).lower(abstract.params, eval_batch).compile()
                self.init_state = jax.jit(named("init_state", lambda: init_state(m, t, self.tx)),
                                          out_shardings=self.state_sharding)
        except Exception as e:  # XLA reports unsupported dtype/attention choices variously
            raise compile_error(e) from None
        self.compile_seconds = time.perf_counter() - started
        # The step's temporaries are known now: stop keeping freed memory if it would not fit.
        self.host_memory_note = host_memory.fit_to_compiled(self.train_step)

    def put_batch(self, rows_of, global_rows: int) -> dict:
        """A global batch laid out by rows over the mesh's data axes, built from this
        process's rows only: `rows_of(indices)` returns those rows as a dict of arrays."""
        local = rows_of(local_rows(self.batch_sharding, (global_rows,)))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self.batch_sharding, x, (global_rows, *x.shape[1:])), local)


def compile_error(e: Exception) -> GptjaxError:
    """One line for a step XLA would not compile (its messages run to pages)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return GptjaxError(f"this config does not compile on {jax.default_backend()}: {first}")
