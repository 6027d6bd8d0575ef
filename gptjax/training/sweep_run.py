"""`run_sweep`: train a sweep's members together (gptjax.training.sweep) on a run's data,
log every member's losses, and report them as a table, a JSON summary and a plot.

A sweep is exploration: it keeps no checkpoints and no end sample. A member whose loss
turns non-finite is marked diverged at that step and the others train on (vmap keeps
them apart); the sweep stops early only when every member has diverged.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from gptjax import config as C
from gptjax.data.prepare import prepare_embedded
from gptjax.data.prepared import load_prepared
from gptjax.data.windows import WindowSampler, eval_batches, gather
from gptjax.errors import GptjaxError, RunFailed
from gptjax.training import run_dir, sweep, sweep_limits, sweep_report
from gptjax.training.compiled import compile_error
from gptjax.training.metrics import JsonlLog

AXIS = "member"  # the mesh axis the members are spread over


@dataclass
class SweepResult:
    out: Path
    members: list[dict]  # sweep_report.summarize's rows
    tokens_per_s: float | None = None
    files: dict = field(default_factory=dict)


def run_sweep(cfg: C.RunConfig, members: list[C.TrainConfig], out: str | Path, *,
              devices: int = 1, progress: bool = True, echo=print) -> SweepResult:
    """Train every member of `members` (from sweep.grid(cfg, ...)) for cfg.train.max_steps
    in one compiled step, its members spread over `devices` devices, writing into `out`."""
    out = Path(out)
    _check(cfg, members, out, devices)
    with tempfile.TemporaryDirectory(prefix="gptjax-sweep-") as scratch:
        data = (load_prepared(cfg.data.data) if cfg.data.data
                else prepare_embedded(cfg.data, Path(scratch) / "data", progress))
        cfg = run_dir.resolve(cfg, data)
        runner = _Runner(cfg, members, data, devices, progress, echo)
        out.mkdir(parents=True, exist_ok=True)
        log = JsonlLog(out / "metrics.jsonl")
        try:
            tokens_per_s = runner.run(log)
        except BaseException:  # interrupted or failed: report what was learned, then re-raise
            try:
                sweep_report.write(out, cfg, sweep_report.summarize(members, log.read()),
                                   runner.summary(), echo)
            except Exception as e:  # never in place of the error that stopped the sweep
                echo(f"the sweep's report could not be written: {e}")
            raise
        rows = sweep_report.summarize(members, log.read())
        files = sweep_report.write(out, cfg, rows, runner.summary(), echo)
    result = SweepResult(out, rows, tokens_per_s, files)
    if all(r["diverged_at"] is not None for r in rows):
        raise RunFailed(f"every member of the sweep diverged (see {files['table']})")
    return result


def _check(cfg: C.RunConfig, members: list[C.TrainConfig], out: Path, devices: int) -> None:
    sweep_limits.check(cfg.train)
    if jax.process_count() > 1:
        raise GptjaxError("gptjax sweep runs in one process")
    if not members:
        raise GptjaxError("a sweep needs at least one member")
    if devices < 1 or devices > jax.device_count() or len(members) % devices:
        raise GptjaxError(f"--devices {devices}: needs 1..{jax.device_count()} devices (there "
                          f"are {jax.device_count()}) dividing the {len(members)} members")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptjaxError(f"{out} exists and is not empty; choose a new --out for the sweep")


class _Runner:
    """The compiled sweep step, evaluation and batches for one sweep, and its loop."""

    def __init__(self, cfg: C.RunConfig, members: list[C.TrainConfig], data, devices: int,
                 progress: bool, echo):
        m, t = cfg.model, cfg.train
        self.cfg, self.members, self.data, self.progress, self.echo = cfg, members, data, progress, echo
        self.samplers = {s.seed: WindowSampler(len(data.train), m.context_length, t.batch_size,
                                               t.sampler, t.stride, s.seed) for s in members}
        WindowSampler(len(data.val), m.context_length, t.batch_size)  # the same checks as train's
        mesh = Mesh(np.array(jax.devices()[:devices]), (AXIS,))
        self.spread, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
        abstract = jax.eval_shape(lambda: sweep.init_states(m, t, members))
        state_sharding = jax.tree.map(lambda _: self.spread, abstract)
        n, rows, T = len(members), t.batch_size, m.context_length
        tokens = jax.ShapeDtypeStruct((n, rows, T), jnp.int32)
        batch = {"inputs": tokens, "targets": tokens}
        eval_rows = rows // t.grad_accum  # as a single run evaluates: the same val batches
        self.val = [jax.device_put(b, replicated) for b in
                    eval_batches(data.val, T, eval_rows, t.eval_batches * t.grad_accum)]
        started = time.perf_counter()
        try:
            self.step = jax.jit(sweep.make_sweep_step(m, t), donate_argnums=0,
                                in_shardings=(state_sharding, self.spread, self.spread),
                                out_shardings=(state_sharding, self.spread)).lower(
                abstract, batch, jax.eval_shape(lambda: sweep.hparams(members))).compile()
            self.eval = jax.jit(sweep.make_sweep_eval(m), in_shardings=(state_sharding.params, replicated),
                                out_shardings=self.spread).lower(abstract.params, self.val[0]).compile()
        except Exception as e:
            raise compile_error(e) from None
        self.init = jax.jit(lambda: sweep.init_states(m, t, members), out_shardings=state_sharding)
        self.compile_seconds = time.perf_counter() - started
        self.hparams = jax.device_put(sweep.hparams(members), self.spread)
        self.tokens_per_step = n * rows * T
        self.tokens_per_s: float | None = None
        self.steps_done = 0

    def summary(self) -> dict:
        return {"members": len(self.members), "devices": self.spread.mesh.size,
                "steps": self.steps_done, "compile_seconds": round(self.compile_seconds, 3),
                "tokens_per_s": self.tokens_per_s}

    def batch(self, step: int) -> dict:
        """Every member's windows at `step` (each drawn as its seed's single run draws them)."""
        T = self.cfg.model.context_length
        by_seed = {seed: gather(self.data.train, s.starts(step), T) for seed, s in self.samplers.items()}
        return jax.device_put(sweep.stack_batches([by_seed[m.seed] for m in self.members]), self.spread)

    def evaluate(self, params) -> np.ndarray:
        total = count = 0
        for b in self.val:
            t_, c_ = self.eval(params, b)
            total, count = total + t_, count + c_
        return np.asarray(total / count, np.float64)

    def run(self, log: JsonlLog) -> float | None:
        t = self.cfg.train
        mesh = self.spread.mesh.size
        self.echo(f"sweep: {len(self.members)} members of {self.cfg.model.n_layer} layers x "
                  f"{self.cfg.model.d_model} wide, compiled in {self.compile_seconds:.1f}s for "
                  f"{mesh} device{'s' if mesh > 1 else ''}")
        state = self.init()
        end, pending = t.max_steps, []
        diverged = [False] * len(self.members)
        clock, timed_steps, timed_seconds, pending_timed = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(total=end, desc="sweep", unit="step", dynamic_ncols=True, disable=not self.progress)
        taken = 0
        try:
            for step in range(1, end + 1):
                state, metrics = self.step(state, self.batch(step - 1), self.hparams)
                pending.append(metrics)
                taken = step
                if step == 1:  # keep the first (warm-up) step out of tokens/s
                    jax.block_until_ready(metrics)
                    clock = time.perf_counter()
                else:
                    pending_timed += 1
                log_now = step % t.log_every == 0 or step == end
                eval_now = step % t.eval_every == 0 or step == end
                if not (log_now or eval_now):
                    continue
                jax.block_until_ready(pending)
                timed_steps += pending_timed
                timed_seconds += time.perf_counter() - clock
                pending_timed = 0
                if timed_steps:
                    self.tokens_per_s = self.tokens_per_step * timed_steps / timed_seconds
                if log_now:  # the records a single run writes: the same steps, the same means
                    fetched = [jax.tree.map(np.asarray, m_) for m_ in pending]
                    self._log_train(log, step - len(fetched) + 1, fetched, diverged)
                    pending = []
                    losses = [r for r, d in zip(fetched[-1]["loss"], diverged) if not d]
                    bar.set_postfix(best_loss=f"{min(losses):.3f}" if losses else "-",
                                    tok_s=f"{self.tokens_per_s or 0:.0f}", refresh=False)
                    if not self.progress:  # the bar shows these; without it, a line each
                        self.echo(f"step {step}: train loss {min(losses) if losses else math.nan:.4f} "
                                  f"(the lowest of {len(losses)} live members), "
                                  f"{self.tokens_per_s or 0:,.0f} tokens/s")
                if eval_now:
                    for i, v in enumerate(self.evaluate(state.params)):
                        log.write({"kind": "eval", "step": step, "member": i,
                                   "val_loss": _finite(v), "val_ppl": _finite(math.exp(min(v, 50)))})
                self.steps_done = step
                bar.update(step - bar.n)
                if all(diverged):
                    break
                clock = time.perf_counter()  # logging and evaluation stay out of tokens/s
        except KeyboardInterrupt:  # the steps taken since the last record still get theirs
            if pending:
                self._log_train(log, taken - len(pending) + 1,
                                [jax.tree.map(np.asarray, m_) for m_ in pending], diverged)
                self.steps_done = taken
            raise
        finally:
            bar.close()
        return self.tokens_per_s

    def _log_train(self, log: JsonlLog, first: int, fetched: list[dict], diverged: list[bool]) -> None:
        """One record per member for the interval of steps first.. (the mean of its losses,
        as a single run's record), and a diverged record at a member's first bad step."""
        losses = np.stack([f["loss"] for f in fetched])  # (steps, members)
        for i in range(len(self.members)):
            bad = ~np.isfinite(losses[:, i]) | ~np.isfinite([f["grad_norm"][i] for f in fetched])
            if bad.any() and not diverged[i]:
                diverged[i] = True
                log.write({"kind": "diverged", "step": first + int(np.argmax(bad)), "member": i})
            last, loss = fetched[-1], float(losses[:, i].mean())
            share = self.tokens_per_s / len(self.members) if self.tokens_per_s else None
            log.write({"kind": "train", "step": first + len(fetched) - 1, "member": i,
                       "loss": _finite(loss), "ppl": _finite(math.exp(min(loss, 50))),
                       "loss_last": _finite(float(losses[-1, i])), "lr": float(last["lr"][i]),
                       "grad_norm": _finite(float(last["grad_norm"][i])),
                       "tokens_per_s": share})  # this member's share of the sweep's rate


def _finite(x: float) -> float | None:
    """JSON has no NaN or infinity: a diverged member's values are written as null."""
    return float(x) if math.isfinite(x) else None
