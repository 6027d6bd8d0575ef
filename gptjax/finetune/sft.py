"""Instruction fine-tuning (SFT) on Alpaca-style records, and answering with the result.

Records are formatted with the book's prompt template, split train/val/test (seeded),
tokenized as prompt + response + end-of-text (cut to the context, with a count; data whose
responses the cut removes entirely is refused), and batched with end-of-text padding whose
targets carry no loss (the first end-of-text, the record's own, does). Validation scores
the response tokens only. The untuned model's validation loss is measured first, so the
report shows what fine-tuning changed. The test records are stored in the run for
`respond`, which writes the model's answers to JSON.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np

from gptjax.errors import GptjaxError
from gptjax.finetune import batching, session, sft_data
from gptjax.finetune.lm_loss import make_loss_sum, mean_loss
from gptjax.finetune.out_dir import check_out
from gptjax.finetune.settings import Tuning
from gptjax.finetune.step import make_eval
from gptjax.finetune.trainer import perplexity
from gptjax.model.parts import join
from gptjax.runs.load import Base

TEST_RECORDS = "test_records.json"


@dataclass(frozen=True)
class SftData:
    path: str
    split: tuple[float, float, float] = (0.85, 0.05, 0.10)
    mask_prompt: bool = False  # no loss on the prompt's tokens, only on the response


def _batch(examples, eot: int, rows: int, context: int, mask_prompt: bool) -> dict:
    """A collated batch of a fixed number of rows (extra rows carry zero weight)."""
    length = batching.bucket(max(len(e.ids) for e in examples) - 1, context)
    b = sft_data.collate(examples, eot, length, mask_prompt=mask_prompt)
    missing = rows - len(examples)
    if missing:
        b = {k: np.concatenate([v, np.zeros((missing, length), v.dtype)]) for k, v in b.items()}
    return b


def _check_responses_survive(examples, truncated: int, train, val, context: int) -> None:
    """Refuse data whose responses the context cuts away entirely; warn when most are."""
    lost = np.array([e.response_len == 0 for e in examples])
    n = len(examples)
    fix = ("the template and instruction fill it: use a base with a longer context, or "
           "shorter records")
    if lost[train].all():
        raise GptjaxError(f"no training record keeps any of its response within the context "
                          f"({context} tokens; {lost.sum()} of {n} records lose it): {fix}")
    if lost[val].all():
        raise GptjaxError(f"no validation record keeps any of its response within the context "
                          f"({context} tokens), so there is nothing to score: {fix}")
    if lost.sum() * 2 > n:
        warnings.warn(f"{lost.sum()} of {n} records ({lost.mean():.0%}) lose their whole response "
                      f"to the context ({context} tokens): they teach only the prompt, and "
                      "validation scores the responses that remain")
    elif truncated:
        warnings.warn(f"{truncated} of {n} records are longer than the context ({context} "
                      f"tokens) and were cut to fit ({lost.sum()} of them lose their whole response)")


def finetune_sft(base: Base, data: SftData, tuning: Tuning, out: str | Path, *,
                 progress: bool = True, say=print) -> dict:
    """Fine-tune `base` on instruction records; returns val losses before and after."""
    out = Path(out)
    check_out(out, "sft")  # new, or this run again: it resumes
    tuning.check()
    tokenizer, m = base.tokenizer, base.config.model
    if tokenizer.eot_id is None:
        raise GptjaxError("instruction tuning needs a tokenizer with an end-of-text id")
    records = sft_data.read_records(data.path)
    train, val, test = sft_data.split_records(len(records), data.split, tuning.seed)
    examples, truncated = sft_data.encode_examples(records, tokenizer.encode, tokenizer.eot_id,
                                                   m.context_length)
    _check_responses_survive(examples, truncated, train, val, m.context_length)
    if len(train) < tuning.batch_size:
        raise GptjaxError(f"the training split has {len(train)} records, fewer than --batch-size "
                          f"{tuning.batch_size}")
    s = session.setup(base, tuning, "sft", settings={
        "data": {**asdict(data), "path": str(Path(data.path).absolute())}, "tuning": tuning.settings()})
    loss_sum = make_loss_sum(s.spec.model, s.spec.lora)
    eval_fn = jax.jit(make_eval(loss_sum))
    size, T, eot = tuning.batch_size, m.context_length, tokenizer.eot_id
    val_lengths = np.array([len(examples[i].ids) for i in val])
    # Validation scores responses only, whatever trains: a prompt the model has memorised
    # (every record shares the template) is no sign it learned to answer.
    val_batches = [_batch([examples[i] for i in val[c]], eot, size, T, mask_prompt=True)
                   for c in batching.by_length(val_lengths, size)]
    val_tokens = int(sum(b["weights"].sum() for b in val_batches))

    train_lengths = np.array([len(examples[i].ids) for i in train])

    def epoch_batches(epoch):
        rng = np.random.default_rng([tuning.seed, epoch])
        for chunk in batching.grouped_order(train_lengths, size, rng):
            yield _batch([examples[i] for i in train[chunk]], eot, size, T, data.mask_prompt)

    def evaluate(trainable):
        loss = mean_loss(eval_fn, join(trainable, s.frozen), val_batches)
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    say(f"data: {len(records):,} records; split {len(train):,} train / {len(val):,} val / "
        f"{len(test):,} test (seed {tuning.seed}); loss on "
        + ("responses only" if data.mask_prompt else "prompts and responses")
        + f"; validation scores the {val_tokens:,} response tokens of its {len(val):,} records")
    before = evaluate(s.trainable)
    say(f"before fine-tuning: val loss {before['val_loss']:.4f}, perplexity {before['val_ppl']:.2f}")
    result = session.run(out, s, tuning, base, loss_sum, epoch_batches, len(train) // size,
                         evaluate, "val_loss", False, progress, say)
    (out / TEST_RECORDS).write_text(json.dumps([records[i] for i in test], indent=1,
                                               ensure_ascii=False) + "\n")
    report = {"val_loss_before": before["val_loss"], "val_ppl_before": before["val_ppl"],
              "val_loss": result.best_metrics["val_loss"], "val_ppl": result.best_metrics["val_ppl"],
              "best_step": result.best_step, "steps": result.steps,
              "stopped_early": result.stopped_early, "truncated": truncated,
              "val_response_tokens": val_tokens,
              "without_response": sum(1 for e in examples if e.response_len == 0)}
    (out / "sft_report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"val loss {report['val_loss_before']:.4f} -> {report['val_loss']:.4f} (perplexity "
        f"{report['val_ppl_before']:.2f} -> {report['val_ppl']:.2f}) over {val_tokens:,} response "
        f"tokens, best at step {result.best_step}")
    say(f"wrote {out / 'sft_report.json'}, {out / TEST_RECORDS}, {out / 'checkpoints'}; answer the "
        f"test records with: gptjax respond --run {out} --out responses.json")
    return report


def respond(run_dir: str | Path, records: list[dict], *, max_new_tokens: int = 256,
            checkpoint: str = "latest", gpt2_ranks: str | None = None, batch_size: int = 8,
            progress: bool = True) -> list[dict]:
    """Each record with the model's greedy "model_response" to its formatted prompt."""
    from tqdm import tqdm

    from gptjax.generation.sampling import Sampling, check_max_new_tokens
    from gptjax.generation.textgen import generate_text
    from gptjax.model.gpt import decode_params
    from gptjax.runs.load import load as load_run

    check_max_new_tokens(max_new_tokens)
    loaded = load_run(run_dir, checkpoint, gpt2_ranks)
    params = decode_params(loaded.params)
    context = loaded.config.model.context_length
    encoded = [loaded.tokenizer.encode(sft_data.format_prompt(r)) for r in records]
    long = sum(len(ids) > context for ids in encoded)
    if long:  # one line for all of them, not the decoder's one per prompt
        warnings.warn(f"{long} of {len(records)} prompts are longer than the context; each keeps "
                      f"its last {context} tokens")
    out = []
    bar = tqdm(total=len(records), desc="respond", unit="record", disable=not progress)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "prompt of .* tokens is longer than the context")
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            # The template's next section header ends an answer that forgot its end-of-text.
            texts = generate_text(params, loaded.config.model, loaded.tokenizer,
                                  encoded[start:start + batch_size],
                                  max_new_tokens, Sampling(0.0, None, None, 0), stop=["\n\n### "])
            out += [{**r, "model_response": t.strip()} for r, t in zip(chunk, texts)]
            bar.update(len(chunk))
    bar.close()
    return out


def test_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / TEST_RECORDS
    if not path.is_file():
        raise GptjaxError(f"{run_dir} has no {TEST_RECORDS} (not a finetune-sft run); pass --records FILE")
    return json.loads(path.read_text())
