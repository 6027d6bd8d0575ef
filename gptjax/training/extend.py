"""Training a run for longer: `gptjax train --out RUN --extend-to STEPS`.

A run's learning rate warms up and decays along one cosine to `min_lr` at `max_steps`
(`decay_steps` when set). Extending it from step E to N adds a *tail*: from E the rate
decays again along a new cosine, from the value it had at E down to `min_lr` at N. The
steps before E keep the schedule they trained with, so the run's config still describes
every step it took, and the same config trains the same run from scratch.

Tails are written in the config as `train.lr_tails`, "E:N:LR[,E:N:LR...]", each with the
rate it starts from; `train.decay_steps` keeps the first cosine's length. The field's
format and its validation live in `gptjax.config`, the schedule in `optim`.
"""

from __future__ import annotations

import dataclasses

from gptjax.config import Tail, format_tails, parse_tails
from gptjax.errors import GptjaxError
from gptjax.training.optim import schedule


def extended(cfg, start: int, to: int):
    """`cfg` (a RunConfig) trained on to step `to`, with a new cosine tail from `start`
    (the step it resumes from) that begins at the rate the schedule has there."""
    t = cfg.train
    if to <= t.max_steps:
        raise GptjaxError(f"--extend-to {to} is not beyond the run's max_steps ({t.max_steps}); "
                          "to stop earlier, use --stop-at")
    lr = float(f"{float(schedule(t)(start)):.6g}")  # readable in config.json; float32 anyway
    tails = [*parse_tails(t.lr_tails), Tail(start, to, lr)]
    train = dataclasses.replace(t, max_steps=to, decay_steps=t.decay_steps or t.max_steps,
                                lr_tails=format_tails(tails))
    return dataclasses.replace(cfg, train=train)


def is_extension(saved, given, trained_to: int) -> bool:
    """`given` is `saved` (TrainConfigs) with one more tail, starting at or after the step
    trained to (`trained_to`, the latest checkpoint), and nothing else changed: the steps
    taken keep the schedule they had."""
    old, new = parse_tails(saved.lr_tails), parse_tails(given.lr_tails)
    return (len(new) == len(old) + 1 and new[:-1] == old and new[-1].start >= trained_to
            and given.decay_steps == (saved.decay_steps or saved.max_steps)
            and given.max_steps == new[-1].end)


def describe(tail: Tail, min_lr: float) -> str:
    if tail.lr <= min_lr * (1 + 1e-6):  # a finished run has decayed all the way
        return (f"from step {tail.start} the learning rate stays at min_lr {min_lr:.3g}, where "
                f"the run had decayed, until step {tail.end} (a warmer tail: set train.lr_tails "
                "by hand, docs/training.md)")
    return (f"from step {tail.start} the learning rate decays again along a cosine, from "
            f"{tail.lr:.3g} (its value there) to min_lr {min_lr:.3g} at step {tail.end}")
