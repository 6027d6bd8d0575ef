"""`train`: set up or resume a run, then config -> data -> compiled steps -> loop ->
checkpoints -> report, one way; the end sample comes from the state in memory."""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import jax

from gptjax import config as C
from gptjax import model
from gptjax.cpu import host_memory
from gptjax.cpu.peak import raise_record
from gptjax.data.prepare import prepare_embedded
from gptjax.data.prepared import PreparedData, load_prepared
from gptjax.data.windows import WindowSampler
from gptjax.errors import CheckpointDamaged, GptjaxError
from gptjax.generation.decoder import generate
from gptjax.parallel.distributed import host, is_main
from gptjax.training import run_dir, run_lock, trackers
from gptjax.training.checkpoint import Checkpoints
from gptjax.training.compile_log import CompileLog
from gptjax.training.compile_log import summary as compile_summary
from gptjax.training.compiled import CompiledSteps
from gptjax.training.layer_stats import plot_stats
from gptjax.training.loop import Loop
from gptjax.training.metrics import JsonlLog, peak_flops, plot_losses
from gptjax.training.step import TrainState
from gptjax.training.stop_signals import StopSignals


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    sample: str = ""
    files: dict = field(default_factory=dict)


def train(cfg: C.RunConfig, out_dir: str | Path, *, stop_at: int | None = None,
          progress: bool = True, echo=print) -> TrainResult:
    """Train (or resume) the run in `out_dir` until max_steps, or until step `stop_at`.

    Process 0 holds the run's lock (`run_lock`) throughout: a second writer is refused."""
    out = Path(out_dir)
    if not is_main():  # one voice and one writer: process 0
        return _train(cfg, out, stop_at, False, lambda *args, **kwargs: None)
    with run_lock.hold(out, "gptjax train"):
        return _train(cfg, out, stop_at, progress, echo)


def _train(cfg: C.RunConfig, out: Path, stop_at: int | None, progress: bool, echo) -> TrainResult:
    end = min(cfg.train.max_steps, stop_at or cfg.train.max_steps)
    trackers.parse_log_to(cfg.train.log_to)  # a missing tracker package: refused before any work
    with CompileLog() as compile_log:  # what is traced and compiled, from here to the end
        return _train_compiling(cfg, out, stop_at, progress, echo, end, compile_log)


def _train_compiling(cfg: C.RunConfig, out: Path, stop_at: int | None, progress: bool, echo,
                     end: int, compile_log: CompileLog) -> TrainResult:
    cfg, *set_up = _setup(cfg, out, progress, end, compile_log)
    log = JsonlLog(out / "metrics.jsonl") if is_main() else _NoLog()
    if is_main():
        flat = {f"{section}.{k}": v for section, fields in C.to_dict(cfg).items() for k, v in fields.items()}
        log = trackers.tracked(log, trackers.parse_log_to(cfg.train.log_to), out, out.absolute().name, flat)
    try:
        return _train_logged(cfg, out, stop_at, progress, echo, end, set_up, _CompilesTo(log, compile_log))
    finally:
        if isinstance(log, trackers.Tracked):
            log.close()  # sends what is queued; a tracker never holds up a step before this


def _train_logged(cfg: C.RunConfig, out: Path, stop_at: int | None, progress: bool, echo, end: int,
                  set_up: list, log) -> TrainResult:
    """Train with the metrics log open: `set_up` is what _setup gave besides the config."""
    data, tokenizer, sampler, steps, resuming = set_up
    m, t = cfg.model, cfg.train
    if isinstance(steps, int):  # already at `end`: said before compiling anything
        echo(_nothing_to_train(steps, t.max_steps, stop_at))
        return _report(TrainResult(out, steps, None), cfg, log, out, echo)

    def set_aside(damaged, moved_to):
        warnings.warn(f"{damaged}; moved it to {moved_to} (nothing is deleted: remove it when "
                      "you no longer need it); resuming from the newest checkpoint that verifies")

    ckpts = Checkpoints(out / "checkpoints", keep=t.keep_checkpoints,
                        set_aside=set_aside if resuming and is_main() else None)
    stop = StopSignals()
    if jax.process_count() > 1:
        # Before restore and compile: a notice then stops the job at its first check. A
        # single process instead keeps Ctrl-C able to abort a long start-up at once.
        stop.install()
    try:
        extra = {}
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
        echo(compile_summary(log.write_compiles(int(host(state.step)))))
        if steps.host_memory_note:
            echo(steps.host_memory_note)
        val_loss = None
        if int(host(state.step)) < end:
            loop = Loop(cfg, data, sampler, steps, ckpts, log, progress, echo, stop.install(), extra,
                        on_peak_raised=lambda flops, source: _peak_raised(out, cfg, flops, source))
            state, val_loss = loop.run(state, end)
        else:  # a multi-process job, or the latest checkpoint fell back to one at `end`
            echo(_nothing_to_train(int(host(state.step)), t.max_steps, stop_at))
    finally:
        try:
            ckpts.close()  # waits for asynchronous saves: never exit with one half-written
        finally:
            stop.restore()  # only now: a signal during that save is ignored until it commits
    if not is_main():
        return TrainResult(out, end, val_loss)
    return _finish(out, cfg, tokenizer, state, val_loss, log, echo, end)


def _nothing_to_train(step: int, max_steps: int, stop_at: int | None) -> str:
    return (f"nothing to train: the run is at step {step} of {max_steps}"
            + (f" and --stop-at is {stop_at}" if stop_at and stop_at < max_steps else ""))


def _finished_at(out: Path, end: int) -> int | None:
    """The latest checkpoint's step when it is at or past `end` and verifies: a finished run
    re-run says so without compiling. A damaged one is left to the resume path, which sets it
    aside and trains from the one before. One process only: a job decides on one path."""
    if jax.process_count() > 1 or jax.device_count() > 1:
        return None  # verify() reads the whole state onto one device: too big for a mesh's
    ckpts = Checkpoints(out / "checkpoints", create=False)
    try:
        latest = ckpts.latest_step()
        if latest is None or latest < end:
            return None
        ckpts.verify(latest)
        return latest
    except CheckpointDamaged:
        return None
    finally:
        ckpts.close()


def _wants_sample(out: Path, cfg: C.RunConfig) -> bool:
    """A finished run still makes its end sample when it has none, or a new length is asked."""
    n = cfg.train.max_new_tokens
    return bool(n) and (not (out / "sample.txt").exists()
                        or C.load(out / "config.json").train.max_new_tokens != n)


def _setup(cfg: C.RunConfig, out: Path, progress: bool, end: int, compile_log: CompileLog):
    """Validate, open the data and compile; only then write anything into `out`. A resumed
    run already at `end` compiles nothing: its step comes back in place of the steps."""
    C.validate(cfg)
    resuming = run_dir.check_out_dir(out)
    with tempfile.TemporaryDirectory(prefix="gptjax-") as scratch:
        if cfg.data.data:
            data = load_prepared(cfg.data.data)
        elif resuming:
            data = load_prepared(out / run_dir.EMBEDDED_DATA)
        else:
            data = prepare_embedded(cfg.data, Path(scratch) / "data", progress)
        cfg = run_dir.resolve(cfg, data)
        tokenizer = data.tokenizer(cfg.data.gpt2_ranks or None)  # the end sample's: fail now, not then
        cfg = _resolve_peak_flops(cfg, resuming)
        if resuming:
            run_dir.check_resume(out, cfg, data)
        sampler = _sampler(data.train, cfg, f"training split of {data.path}")
        _sampler(data.val, cfg, f"validation split of {data.path}")
        finished = _finished_at(out, end) if resuming and not _wants_sample(out, cfg) else None
        if finished is not None:
            C.save(cfg, out / "config.json")  # as below: changed resume-safe fields are kept
            return cfg, data, tokenizer, sampler, finished, resuming
        steps = CompiledSteps(cfg, compile_log)
        if jax.process_count() > 1:
            # Every process has looked at `out` before process 0 writes into it.
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("gptjax: run checked")
        # Process 0 writes the run's files; the others train from their own copy of the data.
        if is_main() and resuming:
            C.save(cfg, out / "config.json")  # keeps changed resume-safe fields for next time
        elif is_main():
            if run_dir.is_run(out):
                run_dir.start_over(out)  # it has no checkpoint: nothing trained to lose
            data = run_dir.create(out, cfg, data)
    return cfg, data, tokenizer, sampler, steps, resuming


def _peak_dtype(cfg: C.RunConfig) -> str:
    return "bfloat16" if cfg.model.dtype == "bfloat16" else "float32"  # float16: no CPU record


def _peak_raised(out: Path, cfg: C.RunConfig, flops: float, source: str) -> None:
    """Keep a raised peak: in config.json (a resume compares against it) and, on a CPU, in
    this machine's record."""
    if jax.devices()[0].platform == "cpu":
        raise_record(_peak_dtype(cfg), flops / jax.process_count())
    if is_main():
        saved = C.load(out / "config.json")
        C.save(dataclasses.replace(saved, train=dataclasses.replace(
            saved.train, peak_flops=flops, peak_source=source)), out / "config.json")


def _resolve_peak_flops(cfg: C.RunConfig, resuming: bool) -> C.RunConfig:
    """Fix the MFU denominator once per run, and say where it came from (config.json keeps
    both, so a resumed run's MFU compares with its first part)."""
    t = cfg.train
    if t.peak_flops > 0:
        source = t.peak_source or ("saved with the run" if resuming else "flag")
        return dataclasses.replace(cfg, train=dataclasses.replace(t, peak_source=source))
    peak = peak_flops(_peak_dtype(cfg))
    return dataclasses.replace(cfg, train=dataclasses.replace(
        t, peak_flops=peak.flops, peak_source=peak.source))


def _sampler(tokens, cfg: C.RunConfig, what: str) -> WindowSampler:
    t = cfg.train
    try:
        return WindowSampler(len(tokens), cfg.model.context_length, t.batch_size, t.sampler,
                             t.stride, t.seed)
    except GptjaxError as e:
        raise GptjaxError(f"{what}: {e}; use a larger corpus or a smaller --context-length") from None


class _CompilesTo:
    """The metrics log, which also takes the compile telemetry's records when asked (the
    loop asks at every log interval: a compile there is news). They go to metrics.jsonl
    only: a tracker's scalars per step cannot hold one record per function."""

    def __init__(self, log, compile_log: CompileLog):
        self._log, self.compile_log = log, compile_log
        self._jsonl = log.log if isinstance(log, trackers.Tracked) else log

    def __getattr__(self, name):
        return getattr(self._log, name)

    def write(self, record: dict) -> None:
        self._log.write(record)

    def write_compiles(self, step: int) -> list[dict]:
        records = self.compile_log.new_records(step)
        for r in records:
            self._jsonl.write(r)
        return records


class _NoLog:
    """Processes other than 0 keep no metrics file."""

    def write(self, record: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


def _check_data_position(extra: dict, data: PreparedData, step: int) -> None:
    if extra.get("data") != run_dir.data_fingerprint(data):
        raise GptjaxError(f"checkpoint at step {step} was trained on different data "
                          f"({extra.get('data')}); refusing to resume on {data.path}")
    if extra.get("data_position", {}).get("step") != step:
        raise GptjaxError(f"checkpoint data position {extra.get('data_position')} does not "
                          f"match its step {step}")


def _finish(out: Path, cfg: C.RunConfig, tokenizer, state: TrainState, val_loss, log: JsonlLog,
            echo, end: int) -> TrainResult:
    """Sample from the trained state (the latest checkpoint holds the same), plot the
    losses, and say where everything is."""
    if jax.process_count() > 1:
        # The state is spread over every process's devices; generate from the run instead.
        echo(f"(no sample from a {jax.process_count()}-process job: run `gptjax generate "
             f"--run {out}`)")
        return _report(TrainResult(out, end, val_loss), cfg, log, out, echo)
    step = int(host(state.step))
    result = TrainResult(out, step, val_loss)
    if step < cfg.train.max_steps:
        echo(f"stopped at step {step} of {cfg.train.max_steps}; "
             f"run `gptjax train --out {out}` to continue")
    if cfg.train.max_new_tokens:
        # Onto one device: the decoder lays parameters out for one device, not the mesh.
        params = jax.device_put(state.params, jax.devices()[0])
        ids = generate(params, cfg.model, [], cfg.train.max_new_tokens, seed=cfg.train.seed,
                       temperature=0.8, top_k=40, valid_vocab=tokenizer.vocab_size,
                       eot_id=tokenizer.eot_id, stop_at_eot=False)
        result.sample = tokenizer.decode(ids)
        (out / "sample.txt").write_text(result.sample)
        result.files["sample"] = out / "sample.txt"
        echo("sample (temperature 0.8, top-k 40, from end-of-text):\n" + result.sample.strip() + "\n")
    return _report(result, cfg, log, out, echo)


def _report(result: TrainResult, cfg: C.RunConfig, log: JsonlLog, out: Path,
            echo) -> TrainResult:
    m = cfg.model
    if isinstance(log, _CompilesTo):  # the end sample's decoder, a first checkpoint's hashing
        log.write_compiles(result.step)
    title = (f"{out.absolute().name}: {_short_count(model.param_count(m))} parameters "
             f"({m.n_layer} layers x {m.d_model} wide, {cfg.data.tokenizer} tokenizer)")
    records = log.read()
    result.files["loss curve"] = plot_losses(records, out / "loss.png", title)
    if (stats_png := plot_stats(records, out / "stats.png", title)) is not None:
        result.files["layer stats"] = stats_png
    else:  # none left (a resume trimmed them, or statistics are off now): no stale plot
        (out / "stats.png").unlink(missing_ok=True)
    result.files["metrics"] = log.path
    result.files["checkpoints"] = out / "checkpoints"
    result.files["config"] = out / "config.json"
    for what, path in result.files.items():
        echo(f"{what:>12}: {path}")
    return result


def _short_count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
