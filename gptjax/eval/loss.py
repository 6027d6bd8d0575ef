"""Validation loss and perplexity of any run's checkpoint, over the batches training
evaluates on (the same windows, the micro-batch size that fitted in training)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jax

from gptjax.data.windows import eval_batches
from gptjax.errors import GptjaxError
from gptjax.runs.load import load, run_data
from gptjax.training.step import make_eval_step, mean_loss


@dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float
    tokens: int
    data: Path

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50))


def evaluate(run_dir: str | Path, data_dir: str | None = None, checkpoint: str = "latest",
             batches: int | None = None, gpt2_ranks: str | None = None) -> EvalResult:
    """Mean validation loss of a run's checkpoint on its own data (or `data_dir`)."""
    if batches is not None and batches < 1:
        raise GptjaxError(f"--batches must be positive, got {batches}")
    loaded = load(run_dir, checkpoint, gpt2_ranks)
    data = run_data(loaded, data_dir)
    m, t = loaded.config.model, loaded.config.train
    rows = t.batch_size // t.grad_accum  # the micro-batch: what training fitted in memory
    try:
        val = eval_batches(data.val, m.context_length, rows, (batches or t.eval_batches) * t.grad_accum)
    except GptjaxError as e:
        raise GptjaxError(f"validation split of {data.path}: {e}") from None
    loss = mean_loss(jax.jit(make_eval_step(m)), loaded.params, val)
    tokens = int(sum(b["weights"].sum() for b in val))
    return EvalResult(loaded.step, loss, tokens, data.path)
