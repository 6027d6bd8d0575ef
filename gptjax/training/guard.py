"""What a run does about non-finite losses and loss spikes (train.on_nonfinite,
train.spike_policy), decided on the host from per-step metrics fetched at log intervals
and before every checkpoint, so the hot loop never waits for it.

- abort (default): the first non-finite loss or gradient norm stops the run (RunFailed)
  before anything past the last finite checkpoint is saved.
- skip: the train step drops such updates itself (`step.make_step_parts`); here they are
  counted, and `max_skips` in a row stop the run.
- rollback: a loss above spike_factor x the median of the last SPIKE_WINDOW step losses
  asks the loop to restore the last checkpoint and skip the batches since then (PaLM's
  remedy for spikes). The history rides in each checkpoint, so a resumed run decides
  exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from gptjax.config import TrainConfig
from gptjax.errors import RunFailed

SPIKE_WINDOW = 100  # step losses the running median is taken over
SPIKE_MIN_HISTORY = 20  # no spike is called before this many finite steps


@dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    median: float


class Guard:
    def __init__(self, t: TrainConfig, saved: dict | None = None):
        self.t = t
        saved = saved or {}
        self.history = deque(saved.get("history", []), maxlen=SPIKE_WINDOW)
        self.skips_in_a_row = int(saved.get("skips_in_a_row", 0))
        self.skipped = int(saved.get("skipped", 0))

    def state(self) -> dict:
        """What a checkpoint records so that a resumed run decides alike."""
        return {"history": list(self.history), "skips_in_a_row": self.skips_in_a_row,
                "skipped": self.skipped}

    def check(self, first_step: int, metrics: list[dict]) -> Spike | None:
        """Look at the host metrics of steps first_step, first_step + 1, ...: raise
        RunFailed to stop, return a Spike to roll back, None to go on."""
        t = self.t
        for i, m in enumerate(metrics):
            step, loss, norm = first_step + i, float(m["loss"]), float(m["grad_norm"])
            if t.on_nonfinite == "skip" and bool(m.get("skipped", False)):
                self.skipped += 1
                self.skips_in_a_row += 1
                if self.skips_in_a_row >= t.max_skips:
                    raise RunFailed(f"{self.skips_in_a_row} updates in a row had a non-finite "
                                    f"loss or gradient norm (the last at step {step}); stopped. "
                                    "Lower --lr, or raise --max-skips")
                continue
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise RunFailed(f"non-finite loss ({loss}) or gradient norm ({norm}) at step "
                                f"{step}; stopped without saving it (the checkpoints hold "
                                "finite values). Lower --lr or lengthen --warmup-steps, or "
                                "resume with --on-nonfinite skip to drop such updates")
            self.skips_in_a_row = 0
            if t.spike_policy == "rollback" and len(self.history) >= SPIKE_MIN_HISTORY:
                median = float(np.median(self.history))
                if loss > t.spike_factor * median:
                    return Spike(step, loss, median)
            self.history.append(loss)
        return None
