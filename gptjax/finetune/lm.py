"""Continued pretraining: more next-token training of a pretrained model on prepared
data, fully or through LoRA adapters (the base frozen, only adapters saved)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import jax

from gptjax.data.prepared import PreparedData, load_prepared
from gptjax.data.windows import WindowSampler, eval_batches, gather
from gptjax.errors import GptjaxError
from gptjax.finetune import session
from gptjax.finetune.lm_loss import make_loss_sum, mean_loss
from gptjax.finetune.out_dir import check_out
from gptjax.finetune.settings import Tuning
from gptjax.finetune.step import make_eval
from gptjax.finetune.trainer import perplexity
from gptjax.model.parts import join
from gptjax.runs.load import Base

VAL_BATCHES = 20


@dataclass
class LmData:
    """Prepared data as fine-tuning batches: an epoch of sliding windows and fixed val batches."""

    data: PreparedData
    steps_per_epoch: int
    val: list
    epoch_batches: Callable[[int], Iterator[dict]]


def lm_data(base: Base, data_dir: str, tuning: Tuning) -> LmData:
    """The prepared data in `data_dir`, checked against `base`'s tokenizer and vocabulary."""
    data = load_prepared(data_dir)
    if data.meta["tokenizer"] != base.tokenizer.spec():
        raise GptjaxError(f"{data_dir} was prepared with a different tokenizer "
                          f"({data.meta['tokenizer']['kind']}) than the starting model's "
                          f"({base.tokenizer.spec()['kind']}); prepare it with the model's tokenizer")
    if data.vocab_size > base.config.model.vocab_size:
        raise GptjaxError(f"{data_dir} has ids up to {data.vocab_size - 1}, beyond the model's "
                          f"vocabulary of {base.config.model.vocab_size}")
    T, size = base.config.model.context_length, tuning.batch_size
    try:
        sampler = WindowSampler(len(data.train), T, size, "sliding", 0, tuning.seed)
        val = eval_batches(data.val, T, size, VAL_BATCHES)
    except GptjaxError as e:
        raise GptjaxError(f"{data_dir}: {e}") from None
    steps_per_epoch = max(1, sampler.n_windows // size)

    def epoch_batches(epoch):
        for i in range(steps_per_epoch):
            yield gather(data.train, sampler.starts(epoch * steps_per_epoch + i), T)

    return LmData(data, steps_per_epoch, val, epoch_batches)


def finetune_lm(base: Base, data_dir: str, tuning: Tuning, out: str | Path, *,
                progress: bool = True, say=print) -> dict:
    """Train `base` on the prepared data in `data_dir` (gptjax prepare, same tokenizer)."""
    out = Path(out)
    check_out(out, "lm")  # new, or this run again: it resumes
    tuning.check()
    d = lm_data(base, data_dir, tuning)
    s = session.setup(base, tuning, "lm", settings={"data": str(Path(data_dir).absolute()),
                                                    "tuning": tuning.settings()})
    loss_sum = make_loss_sum(s.spec.model, s.spec.lora)
    eval_fn = jax.jit(make_eval(loss_sum))

    def evaluate(trainable):
        loss = mean_loss(eval_fn, join(trainable, s.frozen), d.val)
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    before = evaluate(s.trainable)
    say(f"data: {len(d.data.train):,} train / {len(d.data.val):,} val tokens; before training: "
        f"val loss {before['val_loss']:.4f}")
    result = session.run(out, s, tuning, base, loss_sum, d.epoch_batches, d.steps_per_epoch, evaluate,
                         "val_loss", False, progress, say)
    say(f"val loss {before['val_loss']:.4f} -> {result.best_metrics['val_loss']:.4f}, best at step "
        f"{result.best_step}; generate with: gptjax generate --run {out}")
    return {"val_loss_before": before["val_loss"], **result.best_metrics}
