"""Validation loss and perplexity of any run's checkpoint: over the whole validation split
(every non-overlapping window), or over the batches training evaluates on (the first
`eval_batches` of those windows), at the micro-batch size that fitted in training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jax

from gptjax import model
from gptjax.data.windows import eval_batches, window_count
from gptjax.errors import GptjaxError
from gptjax.model.quantize import fake_quantize, quantized_config
from gptjax.runs.load import load, run_data
from gptjax.training.step import make_eval_step, mean_loss

# The whole split is the default while its forward pass stays under this many FLOPs (2 per
# parameter per token): about 3 s at a 2-core CPU's 0.3 TFLOP/s, far less on an accelerator.
FULL_BY_DEFAULT_FLOPS = 1e12


@dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float
    tokens: int  # tokens scored
    split_tokens: int  # tokens in the whole validation split
    full: bool  # every window of the split (else the first `batches`)
    batches: int
    data: Path

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50))

    def describe(self) -> str:
        if self.full:
            return f"the whole validation split ({self.tokens:,} tokens) of {self.data}"
        return (f"the first {self.batches} validation batches, as training evaluates "
                f"({self.tokens:,} of the split's {self.split_tokens:,} tokens; --full for all) "
                f"of {self.data}")


def evaluate(run_dir: str | Path, data_dir: str | None = None, checkpoint: str = "latest",
             batches: int | None = None, gpt2_ranks: str | None = None,
             full: bool | None = None, quantize: str = "none", quant_group: int = 64) -> EvalResult:
    """Mean validation loss of a run's checkpoint on its own data (or `data_dir`).

    `quantize` int8 or int4 scores the weights a quantized decode would use: rounded
    through the quantization grid and back (gptjax.model.quantize.fake_quantize).

    `full=True` scores every window of the split; `batches` (default: the run's
    eval_batches) the first ones only. Unset, the whole split is scored when it is small
    (FULL_BY_DEFAULT_FLOPS) and `batches` is not given."""
    if batches is not None and batches < 1:
        raise GptjaxError(f"--batches must be positive, got {batches}")
    if full and batches is not None:
        raise GptjaxError("--full scores every window; it takes no --batches")
    loaded = load(run_dir, checkpoint, gpt2_ranks)
    data = run_data(loaded, data_dir)
    m, t = loaded.config.model, loaded.config.train
    rows = t.batch_size // t.grad_accum  # the micro-batch: what training fitted in memory
    try:
        windows = window_count(len(data.val), m.context_length)
    except GptjaxError as e:
        raise GptjaxError(f"validation split of {data.path}: {e}") from None
    if full is None:
        full = batches is None and 2 * model.param_count(m) * len(data.val) <= FULL_BY_DEFAULT_FLOPS
    wanted = -(-windows // rows) if full else (batches or t.eval_batches) * t.grad_accum
    val = eval_batches(data.val, m.context_length, rows, wanted)
    params = loaded.params
    if quantize != "none":
        params = fake_quantize(params, quantized_config(m, quantize, quant_group))
    loss = mean_loss(jax.jit(make_eval_step(m)), params, val)
    tokens = int(sum(b["weights"].sum() for b in val))
    full = full or len(val) * rows >= windows  # asked-for batches may cover the split
    return EvalResult(loaded.step, loss, tokens, len(data.val), full, len(val), data.path)
