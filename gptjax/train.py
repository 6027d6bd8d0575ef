"""The training loop: set up or resume a run, step, log, evaluate, checkpoint, sample.

The hot loop only dispatches: batches are built on the host while the device works, and
metrics stay on the device until a log interval, when they are fetched together.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from gptjax import config as C
from gptjax import host_memory, model, optim, run
from gptjax.checkpoint import Checkpoints
from gptjax.data import PreparedData, WindowSampler, eval_batches, gather, load_prepared
from gptjax.errors import GptjaxError, Preempted
from gptjax.generate import generate
from gptjax.metrics import MFU_FORMULA, JsonlLog, flops_per_token, peak_flops, plot_losses
from gptjax.distributed import host, is_main, local_rows
from gptjax.mesh import make_mesh
from gptjax.sharding import batch_sharding, check_batch, check_divisible, shardings
from gptjax.train_step import TrainState, init_state, make_eval_step, make_train_step, mean_loss


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    sample: str = ""
    files: dict = field(default_factory=dict)


def train(cfg: C.RunConfig, out_dir: str | Path, *, stop_at: int | None = None,
          progress: bool = True, echo=print) -> TrainResult:
    """Train (or resume) the run in `out_dir` until max_steps, or until step `stop_at`."""
    out = Path(out_dir)
    if not is_main():  # one voice and one writer: process 0
        echo, progress = (lambda *args, **kwargs: None), False
    cfg, data, sampler, steps, resuming = _setup(cfg, out, progress)
    m, t = cfg.model, cfg.train
    log = JsonlLog(out / "metrics.jsonl") if is_main() else _NoLog()
    ckpts = Checkpoints(out / "checkpoints", keep=t.keep_checkpoints)
    try:
        if resuming:
            state, extra = ckpts.restore(steps.abstract_state)
            _check_data_position(extra, data, int(host(state.step)))
            log.truncate_after(int(host(state.step)))  # records past the checkpoint get redone
            echo(f"resuming {out} from step {int(host(state.step))}")
        else:
            state = steps.init_state()
        echo(f"model: {model.param_count(m):,} parameters | data: {data.meta['train_tokens']:,} "
             f"train / {data.meta['val_tokens']:,} val tokens ({cfg.data.tokenizer}) | run: {out}")
        mesh = ",".join(f"{a}={n}" for a, n in steps.mesh.shape.items())
        echo(f"compiled the train and eval steps for mesh {mesh} ({steps.mesh.size} "
             f"device{'s' if steps.mesh.size > 1 else ''}) in {steps.compile_seconds:.1f}s; "
             f"freed host memory: {host_memory.status()}")
        if steps.host_memory_note:
            echo(steps.host_memory_note)
        end = min(t.max_steps, stop_at or t.max_steps)
        val_loss = None
        if int(host(state.step)) < end:
            val_loss = _Loop(cfg, data, sampler, steps, ckpts, log, progress, echo).run(state, end)
        else:
            echo(f"nothing to train: the run is at step {int(host(state.step))} of {t.max_steps}"
                 + (f" and --stop-at is {stop_at}" if stop_at and stop_at < t.max_steps else ""))
    finally:
        ckpts.close()  # waits for asynchronous saves: never exit with one half-written
    if not is_main():
        return TrainResult(out, end, val_loss)
    return _finish(out, cfg, val_loss, log, echo, end)


def _setup(cfg: C.RunConfig, out: Path, progress: bool):
    """Validate, open the data and compile; only then write anything into `out`."""
    C.validate(cfg)
    resuming = run.check_out_dir(out)
    with tempfile.TemporaryDirectory(prefix="gptjax-") as scratch:
        if cfg.data.data:
            data = load_prepared(cfg.data.data)
        elif resuming:
            data = load_prepared(out / run.EMBEDDED_DATA)
        else:
            data = run.prepare_embedded(cfg, Path(scratch) / "data", progress)
        cfg = run.resolve(cfg, data)
        data.tokenizer(cfg.data.gpt2_ranks or None)  # the end sample needs it: fail now, not then
        cfg = _resolve_peak_flops(cfg)
        if resuming:
            run.check_resume(out, cfg, data)
        sampler = _sampler(data.train, cfg, f"training split of {data.path}")
        _sampler(data.val, cfg, f"validation split of {data.path}")
        steps = CompiledSteps(cfg)
        if jax.process_count() > 1:
            # Every process has looked at `out` before process 0 writes into it.
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("gptjax: run checked")
        # Process 0 writes the run's files; the others train from their own copy of the data.
        if is_main() and resuming:
            C.save(cfg, out / "config.json")  # keeps changed resume-safe fields for next time
        elif is_main():
            if run.is_run(out):
                run.start_over(out)  # it has no checkpoint: nothing trained to lose
            data = run.create(out, cfg, data)
    return cfg, data, sampler, steps, resuming


def _resolve_peak_flops(cfg: C.RunConfig) -> C.RunConfig:
    """Fix the MFU denominator once per run: a CPU's measured rate varies with load."""
    if cfg.train.peak_flops > 0:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, peak_flops=peak_flops()))


def _sampler(tokens, cfg: C.RunConfig, what: str) -> WindowSampler:
    t = cfg.train
    try:
        return WindowSampler(len(tokens), cfg.model.context_length, t.batch_size, t.sampler,
                             t.stride, t.seed)
    except GptjaxError as e:
        raise GptjaxError(f"{what}: {e}; use a larger corpus or a smaller --context-length") from None


class _NoLog:
    """Processes other than 0 keep no metrics file."""

    def write(self, record: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


class CompiledSteps:
    """train_step and eval_step for the run's mesh, compiled ahead of time so config errors
    surface before anything is written."""

    def __init__(self, cfg: C.RunConfig):
        m, t = cfg.model, cfg.train
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
                    make_train_step(m, t, self.tx), donate_argnums=0,
                    in_shardings=(self.state_sharding, self.batch_sharding),
                    out_shardings=(self.state_sharding, replicated)).lower(abstract, batch).compile()
                self.eval_step = jax.jit(
                    make_eval_step(m), in_shardings=(self.state_sharding.params, self.batch_sharding),
                    out_shardings=replicated).lower(abstract.params, eval_batch).compile()
                self.init_state = jax.jit(lambda: init_state(m, t, self.tx),
                                          out_shardings=self.state_sharding)
        except Exception as e:  # XLA reports unsupported dtype/attention choices variously
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GptjaxError(f"this config does not compile on {jax.default_backend()}: {first}") from None
        self.compile_seconds = time.perf_counter() - started
        # The step's temporaries are known now: stop keeping freed memory if it would not fit.
        self.host_memory_note = host_memory.fit_to_compiled(self.train_step)

    def put_batch(self, rows_of, global_rows: int) -> dict:
        """A global batch laid out by rows over the mesh's data axes, built from this
        process's rows only: `rows_of(indices)` returns those rows as a dict of arrays."""
        local = rows_of(local_rows(self.batch_sharding, (global_rows,)))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self.batch_sharding, x, (global_rows, *x.shape[1:])), local)


def _check_data_position(extra: dict, data: PreparedData, step: int) -> None:
    if extra.get("data") != run.data_fingerprint(data):
        raise GptjaxError(f"checkpoint at step {step} was trained on different data "
                          f"({extra.get('data')}); refusing to resume on {data.path}")
    if extra.get("data_position", {}).get("step") != step:
        raise GptjaxError(f"checkpoint data position {extra.get('data_position')} does not "
                          f"match its step {step}")


class _Loop:
    """The stepping loop with its logging, evaluation and checkpoint cadence."""

    def __init__(self, cfg: C.RunConfig, data: PreparedData, sampler: WindowSampler,
                 steps: CompiledSteps, ckpts: Checkpoints, log: JsonlLog, progress: bool, echo):
        m, t = cfg.model, cfg.train
        self.cfg, self.data, self.sampler, self.ckpts, self.log = cfg, data, sampler, ckpts, log
        self.say = tqdm.write if progress else echo  # tqdm.write keeps lines clear of the bar
        self.progress = progress
        self.train_step, self.put_batch = steps.train_step, steps.put_batch
        val = [steps.put_batch(lambda rows, b=b: {k: v[rows] for k, v in b.items()}, steps.eval_rows)
               for b in eval_batches(data.val, m.context_length, steps.eval_rows,
                                     t.eval_batches * t.grad_accum)]
        self.evaluate = lambda params: mean_loss(steps.eval_step, params, val)
        self.tokens_per_step = t.batch_size * m.context_length
        self.flops_per_token = flops_per_token(m, model.param_count(m, exclude_position=True))
        self.peak = t.peak_flops
        echo(f"MFU uses {MFU_FORMULA}; peak {self.peak / 1e12:.3g} TFLOP/s "
             f"(train.peak_flops: data sheet, or measured f32 matmul at the run's start on CPU)")

    def run(self, state: TrainState, end: int) -> float | None:
        t, T = self.cfg.train, self.cfg.model.context_length
        step = first = shown = int(host(state.step))
        bar = tqdm(total=end, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.progress)
        pending, val_loss, train_loss = [], None, None
        clock, untimed = time.perf_counter(), 0
        preempted = _preemption_check()
        try:
            while step < end:
                starts = self.sampler.starts(step)
                batch = self.put_batch(lambda rows: gather(self.data.train, starts[rows], T),
                                       len(starts))
                state, metrics = self.train_step(state, batch)
                pending.append(metrics)
                step += 1
                # Asked at every step, with ids from this loop's start (1, 2, ...): the
                # protocol counts from 0, so a notice during a resumed run's start-up stops at
                # id 1. At the last step the run just finishes.
                if preempted(step - first) and step < end:
                    raise Preempted(step)  # every process is here: saved below, as for Ctrl-C
                if step == first + 1:  # the only per-step sync: keep warm-up out of tokens/s
                    jax.block_until_ready(metrics)
                    clock, untimed = time.perf_counter(), 1
                if step % t.log_every == 0 or step == end:
                    fetched = [jax.tree.map(host, m_) for m_ in pending]  # waits for them
                    now = time.perf_counter()
                    rec = self._record(step, fetched, untimed, now - clock)
                    self.log.write(rec)
                    if not self.progress:  # the bar shows these; without it, a line each
                        self.say(_train_line(rec))
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}",
                                    mfu=f"{100 * (rec['mfu'] or 0):.1f}%", refresh=False)
                    bar.update(step - shown)  # the bar counts finished steps, not dispatched ones
                    shown = step
                    pending, clock, untimed, train_loss = [], now, 0, rec["loss"]
                if step % t.eval_every == 0 or step == end:
                    val_loss = self._evaluate_and_save(state, train_loss)
                    clock = time.perf_counter()  # keep evaluation out of tokens/s
        except KeyboardInterrupt:
            bar.close()
            if pending:  # keep the interval's losses; its timing is meaningless now
                fetched = [jax.tree.map(host, m_) for m_ in pending]
                self.log.write(self._record(step, fetched, len(pending), 0.0))
            if self.ckpts.latest_step() != int(host(state.step)):
                self._evaluate_and_save(state, None)
            raise
        bar.close()
        return val_loss

    def _evaluate_and_save(self, state: TrainState, train_loss: float | None) -> float:
        step = int(host(state.step))
        val_loss = self.evaluate(state.params)
        ppl = math.exp(min(val_loss, 50))
        self.log.write({"kind": "eval", "step": step, "val_loss": val_loss, "val_ppl": ppl})
        head = f"step {step}: " + (f"train loss {train_loss:.4f}, " if train_loss is not None else "")
        self.say(f"{head}val loss {val_loss:.4f}, val perplexity {ppl:.2f}")
        self.ckpts.save(state, {"config": C.to_dict(self.cfg), "data_position": {"step": step},
                                "data": run.data_fingerprint(self.data)}, val_loss)
        return val_loss

    def _record(self, step: int, metrics: list[dict], untimed: int, seconds: float) -> dict:
        """One JSONL record for a log interval; `untimed` leading steps ran before the clock."""
        losses = np.array([m_["loss"] for m_ in metrics], np.float64)
        timed = len(metrics) - untimed
        tok_s = self.tokens_per_step * timed / seconds if timed and seconds > 0 else None
        loss = float(losses.mean())
        return {"kind": "train", "step": step, "loss": loss, "ppl": math.exp(min(loss, 50)),
                "loss_last": float(losses[-1]), "lr": float(metrics[-1]["lr"]),
                "grad_norm": float(metrics[-1]["grad_norm"]), "tokens_per_s": tok_s,
                "mfu": tok_s * self.flops_per_token / self.peak if tok_s else None}


def _preemption_check():
    """step id -> whether every process of the job has reached the step at which JAX's
    preemption service (started by jax.distributed) decided to stop after a SIGTERM reached
    one of them. It must be asked at every step, with the same ids on every process; a job
    without the service never stops."""
    if jax.process_count() == 1:
        return lambda step: False
    from jax.experimental import multihost_utils
    available = True

    def check(step_id: int) -> bool:
        nonlocal available
        if available:
            try:
                return multihost_utils.reached_preemption_sync_point(step_id)
            except RuntimeError:  # no preemption service in this job
                available = False
        return False
    return check


def _train_line(rec: dict) -> str:
    """A console line for a log interval's record (what the progress bar shows, and lr)."""
    speed = (f", {rec['tokens_per_s']:,.0f} tokens/s, MFU {rec['mfu']:.1%}"
             if rec["tokens_per_s"] else "")
    return f"step {rec['step']}: train loss {rec['loss']:.4f}{speed}, lr {rec['lr']:.2e}"


def _finish(out: Path, cfg: C.RunConfig, val_loss, log: JsonlLog, echo, end: int) -> TrainResult:
    """Sample from the latest checkpoint, plot the losses, and say where everything is."""
    if jax.process_count() > 1:
        # Restoring for the sample would need every process; generate from the run instead.
        echo(f"(no sample from a {jax.process_count()}-process job: run `gptjax generate "
             f"--run {out}`)")
        return _report(TrainResult(out, end, val_loss), log, out, echo)
    loaded = run.load(out, "latest", cfg.data.gpt2_ranks or None)
    tokenizer = loaded.tokenizer
    result = TrainResult(out, loaded.step, val_loss)
    if loaded.step < cfg.train.max_steps:
        echo(f"stopped at step {loaded.step} of {cfg.train.max_steps}; "
             f"run `gptjax train --out {out}` to continue")
    if cfg.train.sample_tokens:
        ids = generate(loaded.params, cfg.model, [], cfg.train.sample_tokens, seed=cfg.train.seed,
                       temperature=0.8, top_k=40, valid_vocab=tokenizer.vocab_size,
                       eot_id=tokenizer.eot_id, stop_at_eot=False)
        result.sample = tokenizer.decode(ids)
        (out / "sample.txt").write_text(result.sample)
        result.files["sample"] = out / "sample.txt"
        echo("sample (temperature 0.8, top-k 40, from end-of-text):\n" + result.sample.strip() + "\n")
    return _report(result, log, out, echo)


def _report(result: TrainResult, log: JsonlLog, out: Path, echo) -> TrainResult:
    result.files["loss curve"] = plot_losses(log.read(), out / "loss.png")
    result.files["metrics"] = log.path
    result.files["checkpoints"] = out / "checkpoints"
    result.files["config"] = out / "config.json"
    for what, path in result.files.items():
        echo(f"{what:>12}: {path}")
    return result
