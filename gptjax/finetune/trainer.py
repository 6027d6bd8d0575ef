"""The fine-tuning loop: epochs of batches, periodic validation, early stopping with
patience, and the best trainable parameters kept (in memory and as a checkpoint).

Task code supplies the pieces: a compiled step, a function giving each epoch's batches,
and an evaluation returning a dict of metrics that includes the monitored one.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import jax
import numpy as np
from tqdm import tqdm

from gptjax.finetune.step import FinetuneState
from gptjax.training.metrics import JsonlLog


@dataclass(frozen=True)
class Schedule:
    epochs: int
    steps_per_epoch: int
    eval_every: int  # steps between validations
    patience: int  # validations without improvement before stopping; 0 = never stop early
    monitor: str  # key of the evaluation dict
    higher_is_better: bool
    max_steps: int = 0  # 0 = `epochs` whole passes; else this many steps, epochs repeating

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch

    @property
    def passes(self) -> int:
        """Epochs started: the last may end part-way when max_steps is set."""
        return -(-self.total_steps // max(self.steps_per_epoch, 1))

    def describe(self) -> str:
        if not self.max_steps:
            return f"{self.epochs} epoch(s) of {self.steps_per_epoch} steps"
        return (f"{self.max_steps} steps ({self.max_steps / max(self.steps_per_epoch, 1):.2g} "
                f"epochs of {self.steps_per_epoch} steps)")


@dataclass
class FitResult:
    best: dict  # trainable parameters at the best validation
    best_step: int
    best_metrics: dict
    steps: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)


@dataclass
class Progress:
    """Where a fit stands, besides its arrays: position in the data, and early stopping's
    memory. It is all a resumed fit needs to continue exactly where it was saved."""

    step: int = 0
    epoch: int = 0
    in_epoch: int = 0  # batches of `epoch` done
    since_best: int = 0
    best_value: float | None = None
    best_step: int = 0
    best_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    stopped: bool = False


@dataclass
class Start:
    """A fit to continue: its state, best trainable parameters so far, and progress."""

    state: FinetuneState
    best: dict
    progress: Progress


def fit(state: FinetuneState, frozen: dict, step_fn, epoch_batches: Callable[[int], Iterable[dict]],
        evaluate: Callable[[dict], dict], schedule: Schedule, *, on_best=None, on_validated=None,
        start: Start | None = None, log: JsonlLog | None = None, progress: bool = True,
        say=print) -> FitResult:
    """Train until the epochs end or validation stops improving for `patience` evaluations.

    `evaluate(trainable)` returns the validation metrics; `on_best(trainable, step,
    metrics)` runs at each new best (e.g. to checkpoint it), after `on_validated(state,
    best, progress)`, which runs after every validation (the last is at the last step) to
    save what `start` needs to continue; a fit started from the last one has nothing left
    to do. The state passed to it is donated by the next step: save it before returning.
    Each epoch's batches must depend on the epoch number alone, so that a resumed fit
    skips to the same batch.
    """
    s = schedule
    if progress and say is print:
        say = tqdm.write  # keeps lines clear of the bar
    p, best = (start.progress, start.best) if start else (Progress(), None)
    if start is not None:
        state = start.state
    bar = tqdm(total=s.total_steps, initial=p.step, desc="fine-tune", unit="step", dynamic_ncols=True,
               disable=not progress)
    losses, clock = [], time.perf_counter()

    def validate(final=False):
        nonlocal best
        metrics = {"step": p.step, **evaluate(state.trainable)}
        value = metrics[s.monitor]
        improved = p.best_value is None or (
            value > p.best_value if s.higher_is_better else value < p.best_value)
        if improved:
            p.best_value, p.best_step, p.best_metrics, p.since_best = value, p.step, metrics, 0
            best = jax.tree.map(lambda x: x.copy(), state.trainable)  # the state is donated
        else:
            p.since_best += 1
        p.history.append(metrics)
        if log is not None:
            log.write({"kind": "eval", **metrics})
        if not final:  # at the last step the run ends anyway: not an early stop
            p.stopped = p.since_best >= s.patience > 0 and p.step < s.total_steps
        if on_validated is not None:  # first: a best checkpoint never runs ahead of it
            on_validated(state, best, p)
        if improved and on_best is not None:
            on_best(best, p.step, metrics)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        say(f"step {p.step}: {shown}{' (best)' if improved else ''}")

    def flush():
        nonlocal losses, clock
        if not losses:
            return
        fetched = np.asarray(jax.device_get(losses), np.float64)
        now = time.perf_counter()
        if log is not None:
            log.write({"kind": "train", "step": p.step, "epoch": p.epoch, "loss": float(fetched.mean()),
                       "steps_per_s": len(fetched) / (now - clock)})
        bar.set_postfix(epoch=p.epoch + 1, loss=f"{fetched.mean():.4f}", refresh=False)
        bar.update(len(fetched))
        losses, clock = [], now

    try:
        while p.epoch < s.passes and p.step < s.total_steps and not p.stopped:
            for batch in itertools.islice(epoch_batches(p.epoch), p.in_epoch, None):
                state, metrics = step_fn(state, frozen, batch)
                losses.append(metrics["loss"])
                p.step, p.in_epoch = p.step + 1, p.in_epoch + 1
                if p.step % 10 == 0 or p.step % s.eval_every == 0:
                    flush()  # the only host syncs: every 10 steps
                if p.step % s.eval_every == 0:
                    validate()
                    clock = time.perf_counter()  # keep validation out of steps/s
                if p.stopped or p.step == s.total_steps:
                    break
            if p.stopped:
                say(f"stopped early: no better {s.monitor} in {s.patience} validations")
            elif p.step < s.total_steps:
                p.epoch, p.in_epoch = p.epoch + 1, 0
        flush()
        if not p.history or p.history[-1]["step"] != p.step:  # a resumed fit may have done it
            validate(final=True)
    finally:
        bar.close()
    return FitResult(best, p.best_step, p.best_metrics, p.step, p.stopped, p.history)


def steps_between_evals(eval_every: int, steps_per_epoch: int) -> int:
    """Validation cadence in steps: given, or once per epoch."""
    return eval_every if eval_every > 0 else max(1, steps_per_epoch)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
