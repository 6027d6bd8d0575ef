"""The fine-tuning loop: epochs of batches, periodic validation, early stopping with
patience, and the best trainable parameters kept (in memory and as a checkpoint).

Task code supplies the pieces: a compiled step, a function giving each epoch's batches,
and an evaluation returning a dict of metrics that includes the monitored one.
"""

from __future__ import annotations

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


def fit(state: FinetuneState, frozen: dict, step_fn, epoch_batches: Callable[[int], Iterable[dict]],
        evaluate: Callable[[dict], dict], schedule: Schedule, *, on_best=None, log: JsonlLog | None = None,
        progress: bool = True, say=print) -> FitResult:
    """Train until the epochs end or validation stops improving for `patience` evaluations.

    `evaluate(trainable)` returns the validation metrics; `on_best(trainable, step,
    metrics)` runs at each new best (e.g. to checkpoint it).
    """
    s = schedule
    if progress and say is print:
        say = tqdm.write  # keeps lines clear of the bar
    bar = tqdm(total=s.total_steps, desc="fine-tune", unit="step", dynamic_ncols=True,
               disable=not progress)
    best, best_value, best_step, best_metrics = None, None, 0, {}
    since_best, step, history, stopped = 0, 0, [], False
    losses, clock = [], time.perf_counter()

    def validate():
        nonlocal best, best_value, best_step, best_metrics, since_best
        metrics = {"step": step, **evaluate(state.trainable)}
        value = metrics[s.monitor]
        improved = best_value is None or (value > best_value if s.higher_is_better else value < best_value)
        if improved:
            best_value, best_step, best_metrics, since_best = value, step, metrics, 0
            best = jax.tree.map(lambda x: x.copy(), state.trainable)  # the state is donated
            if on_best is not None:
                on_best(best, step, metrics)
        else:
            since_best += 1
        history.append(metrics)
        if log is not None:
            log.write({"kind": "eval", **metrics})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        say(f"step {step}: {shown}{' (best)' if improved else ''}")
        return since_best >= s.patience > 0

    def flush(epoch):
        nonlocal losses, clock
        if not losses:
            return
        fetched = np.asarray(jax.device_get(losses), np.float64)
        now = time.perf_counter()
        if log is not None:
            log.write({"kind": "train", "step": step, "epoch": epoch, "loss": float(fetched.mean()),
                       "steps_per_s": len(fetched) / (now - clock)})
        bar.set_postfix(epoch=epoch + 1, loss=f"{fetched.mean():.4f}", refresh=False)
        bar.update(len(fetched))
        losses, clock = [], now

    epoch = 0
    try:
        for epoch in range(s.passes):
            for batch in epoch_batches(epoch):
                state, metrics = step_fn(state, frozen, batch)
                losses.append(metrics["loss"])
                step += 1
                if step % 10 == 0 or step % s.eval_every == 0:
                    flush(epoch)  # the only host syncs: every 10 steps
                if step % s.eval_every == 0:
                    # At the last step the run ends anyway: not an early stop.
                    stopped = validate() and step < s.total_steps
                    clock = time.perf_counter()  # keep validation out of steps/s
                    if stopped:
                        break
                if step == s.total_steps:
                    break
            if stopped:
                say(f"stopped early: no better {s.monitor} in {s.patience} validations")
                break
        flush(epoch)
        if step % s.eval_every:
            validate()
    finally:
        bar.close()
    return FitResult(best, best_step, best_metrics, step, stopped, history)


def steps_between_evals(eval_every: int, steps_per_epoch: int) -> int:
    """Validation cadence in steps: given, or once per epoch."""
    return eval_every if eval_every > 0 else max(1, steps_per_epoch)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
