"""Classification fine-tuning: labelled texts in, a classifier run out.

finetune_cls reads and checks the data, splits it (stratified, seeded), trains with early
stopping on a validation metric, then reports the best checkpoint on the test split:
accuracy, per-class precision/recall/F1, macro F1 and the confusion matrix (table + PNG).
`classify` loads such a run and returns class probabilities for new texts.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np

from gptjax.errors import GptjaxError
from gptjax.finetune import batching, cls_data, cls_folds, cls_metrics, session
from gptjax.finetune.out_dir import check_out
from gptjax.finetune.settings import Tuning
from gptjax.model.classifier import LOSSES, POOLINGS, make_loss_sum, make_predict
from gptjax.model.parts import join
from gptjax.runs import finetuned
from gptjax.runs.load import Base, load_finetuned

METRICS = ("accuracy", "macro_f1", "loss")


@dataclass(frozen=True)
class ClsData:
    path: str
    text_column: str = "text"
    label_column: str = "label"
    format: str | None = None
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    balance: bool = False  # undersample the training split to the rarest class
    class_weights: bool = False  # weight the loss by inverse class frequency
    pooling: str = "last"
    metric: str = "accuracy"  # what early stopping watches on the validation split
    max_length: int = 0  # tokens kept per text; 0 = the model's context
    loss: str = "ce"  # ce (cross-entropy) or focal
    focal_gamma: float = 2.0  # focal loss's (1 - p_t)^gamma exponent; 0 = cross-entropy
    folds: int = 0  # 0 = one train/val/test split; K >= 2 = stratified K-fold cross-validation

    def check(self, context_length: int) -> "ClsData":
        cls_data.check_fractions(self.split)
        if self.pooling not in POOLINGS:
            raise GptjaxError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.metric not in METRICS:
            raise GptjaxError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not 0 <= self.max_length <= context_length:
            raise GptjaxError(f"--max-length must be 0 (the model's context) or at most the "
                              f"context length {context_length}, got {self.max_length}")
        if self.loss not in LOSSES:
            raise GptjaxError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not (math.isfinite(self.focal_gamma) and self.focal_gamma >= 0):
            raise GptjaxError(f"--focal-gamma must be >= 0, got {self.focal_gamma}")
        if self.folds == 1 or self.folds < 0:
            raise GptjaxError(f"--folds must be at least 2 (or 0 for one split), got {self.folds}")
        return self


@dataclass
class Prepared:
    """Texts as token ids with their labels, and the split into train/val/test rows."""

    ids: list[np.ndarray]
    labels: np.ndarray
    classes: tuple[str, ...]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    truncated: int
    teacher_logits: np.ndarray | None = None  # (texts, classes) when distilling (gptjax.finetune.distill)


def prepare(d: ClsData, tokenizer, context_length: int, seed: int) -> Prepared:
    """Read, encode and split (with --folds, cls_folds splits again per fold)."""
    d.check(context_length)
    data = cls_data.read_labeled(d.path, text_column=d.text_column, label_column=d.label_column,
                                 fmt=d.format)
    if d.folds:
        cls_folds.check_folds(data.labels, data.classes, d.folds)
        train = val = test = np.arange(0)
    else:
        train, val, test = cls_data.stratified_split(data.labels, d.split, seed)
    if d.balance and len(train):
        train = cls_data.balance(train, data.labels, seed)
    limit = d.max_length or context_length
    ids, truncated = batching.encode_all(data.texts, tokenizer, limit)
    return Prepared(ids, data.labels, data.classes, train, val, test, truncated)


def _class_weights(labels: np.ndarray, n_classes: int, on: bool) -> np.ndarray:
    if not on:
        return np.ones(n_classes, np.float32)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return (counts.sum() / (n_classes * np.maximum(counts, 1))).astype(np.float32)


def _batch(p: Prepared, rows: np.ndarray, size: int, context: int, pad_id: int, class_w: np.ndarray) -> dict:
    seqs = [p.ids[r] for r in rows]
    length = batching.bucket(max(len(s) for s in seqs), context)
    tokens, lengths = batching.pad_rows(seqs, size, length, pad_id)
    labels = np.zeros(size, np.int32)
    labels[:len(rows)] = p.labels[rows]
    weights = np.zeros(size, np.float32)
    weights[:len(rows)] = class_w[labels[:len(rows)]]
    batch = {"tokens": tokens, "lengths": lengths, "labels": labels, "weights": weights}
    if p.teacher_logits is not None:
        teacher = np.zeros((size, len(p.classes)), np.float32)
        teacher[:len(rows)] = p.teacher_logits[rows]
        batch["teacher_logits"] = teacher
    return batch


def predict_rows(predict, params: dict, p: Prepared, rows: np.ndarray, size: int, context: int,
                 pad_id: int) -> np.ndarray:
    """predict's (len(rows), classes) output (probabilities, or logits), in fixed-size batches."""
    ones = np.ones(len(p.classes), np.float32)
    probs = np.zeros((len(rows), len(p.classes)), np.float32)
    for chunk in batching.by_length(np.array([len(p.ids[r]) for r in rows]), size):
        b = _batch(p, rows[chunk], size, context, pad_id, ones)
        probs[chunk] = np.asarray(predict(params, b["tokens"], b["lengths"]))[:len(chunk)]
    return probs


def evaluate_rows(predict, params, p: Prepared, rows, size, context, pad_id) -> dict:
    probs = predict_rows(predict, params, p, rows, size, context, pad_id)
    y = p.labels[rows]
    report = cls_metrics.classification_report(y, probs.argmax(-1), p.classes)
    loss = float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "loss": loss,
            "report": report}


def finetune_cls(base: Base, data: ClsData, tuning: Tuning, out: str | Path, *,
                 progress: bool = True, say=print) -> dict:
    """Fine-tune `base` as a classifier on `data`; returns the test report of the best
    checkpoint (with --folds, the cross-validation summary: cls_folds.run_folds)."""
    out = Path(out)
    check_out(out, "cls", cross_validation=data.folds > 0)  # new, or this run again: it resumes
    tuning.check()
    m = base.config.model
    p = prepare(data, base.tokenizer, m.context_length, tuning.seed)
    if p.truncated:
        warnings.warn(f"{p.truncated} of {len(p.ids)} texts are longer than {data.max_length or m.context_length} "
                      "tokens and were cut to that length")
    if data.folds:
        return cls_folds.run_folds(base, data, tuning, p, out, train_and_test, progress=progress, say=say)
    return train_and_test(base, data, tuning, p, out, progress=progress, say=say)


def train_and_test(base: Base, data: ClsData, tuning: Tuning, p: Prepared, out: Path, *,
                   progress: bool = True, say=print, fold: int | None = None, recipe=None) -> dict:
    """Fine-tune on p.train, validate on p.val, report the best checkpoint on p.test.
    With a `recipe` (gptjax.finetune.distill.ClsRecipe) the loss and the run's record are
    the recipe's."""
    m = base.config.model
    if len(p.train) < tuning.batch_size:
        raise GptjaxError(f"the training split has {len(p.train)} texts, fewer than --batch-size "
                          f"{tuning.batch_size}")
    settings = {"data": {**asdict(data), "path": str(Path(data.path).absolute())},
                "tuning": tuning.settings()}
    if fold is not None:
        settings["fold"] = fold
    if recipe is not None:
        settings["distill"] = recipe.settings
    s = session.setup(base, tuning, "distill" if recipe else "cls", classes=p.classes,
                      pooling=data.pooling, settings=settings)
    pad = base.tokenizer.eot_id if base.tokenizer.eot_id is not None else 0
    class_w = _class_weights(p.labels[p.train], len(p.classes), data.class_weights)
    predict = jax.jit(make_predict(s.spec.model, data.pooling, s.spec.lora))
    size, T = tuning.batch_size, m.context_length

    train_lengths = np.array([len(p.ids[i]) for i in p.train])

    def epoch_batches(epoch):
        rng = np.random.default_rng([tuning.seed, epoch])
        for chunk in batching.grouped_order(train_lengths, size, rng):
            yield _batch(p, p.train[chunk], size, T, pad, class_w)

    def evaluate(trainable):
        metrics = evaluate_rows(predict, join(trainable, s.frozen), p, p.val, size, T, pad)
        return {f"val_{k}" if k != "report" else k: v for k, v in metrics.items() if k != "report"}

    counts = np.bincount(p.labels, minlength=len(p.classes))
    say(f"data: {len(p.ids):,} texts, classes " + ", ".join(f"{c} ({n:,})" for c, n in zip(p.classes, counts))
        + f"; split {len(p.train):,} train{' (balanced)' if data.balance else ''} / {len(p.val):,} val / "
        f"{len(p.test):,} test (seed {tuning.seed})")
    loss_sum = recipe.loss_sum(s.spec, data.pooling) if recipe else make_loss_sum(
        s.spec.model, data.pooling, s.spec.lora, loss=data.loss, focal_gamma=data.focal_gamma)
    result = session.run(out, s, tuning, base, loss_sum,
                         epoch_batches, len(p.train) // size, evaluate, f"val_{data.metric}",
                         data.metric != "loss", progress, say)
    params = join(result.best, s.frozen)
    test = evaluate_rows(predict, params, p, p.test, size, T, pad)
    report = {**test["report"], "loss": test["loss"], "best_step": result.best_step,
              "steps": result.steps, "stopped_early": result.stopped_early,
              "val": {k: v for k, v in result.best_metrics.items()}}
    (out / "test_report.json").write_text(json.dumps(report, indent=2) + "\n")
    png = cls_metrics.plot_confusion(np.asarray(report["confusion"]), p.classes, out / "confusion.png")
    say(f"test split ({len(p.test):,} texts), best checkpoint (step {result.best_step}):")
    say(cls_metrics.format_report(report, p.classes))
    say(f"wrote {out / 'test_report.json'}, {png}, {out / 'metrics.jsonl'}, {out / 'checkpoints'}")
    return report


def classify(run_dir: str | Path, texts: list[str], *, checkpoint: str = "latest",
             gpt2_ranks: str | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, probabilities (len(texts), classes)) from a classifier run."""
    if not finetuned.is_finetuned(run_dir):
        raise GptjaxError(f"{run_dir} is not a classifier run (no {finetuned.FILE}); make one with "
                          "gptjax finetune-cls or gptjax distill")
    ft = load_finetuned(run_dir, checkpoint, gpt2_ranks)
    if not ft.spec.is_classifier:
        raise GptjaxError(f"{run_dir} is not a classifier (it was fine-tuned for {ft.spec.task}); "
                          "use gptjax generate --run")
    if not texts:
        raise GptjaxError("give at least one text to classify")
    for i, text in enumerate(texts):
        if not text.strip():
            raise GptjaxError(f"text {i + 1} is empty")
    m = ft.spec.model
    limit = ft.spec.settings.get("data", {}).get("max_length") or m.context_length
    ids, truncated = batching.encode_all(texts, ft.tokenizer, min(limit, m.context_length))
    if truncated:
        warnings.warn(f"{truncated} text(s) longer than {limit} tokens were cut to that length")
    p = Prepared(ids, np.zeros(len(ids), np.int32), ft.spec.classes, np.arange(len(ids)), np.arange(0),
                 np.arange(0), truncated)
    pad = ft.tokenizer.eot_id if ft.tokenizer.eot_id is not None else 0
    predict = jax.jit(make_predict(m, ft.spec.pooling, ft.spec.lora))
    probs = predict_rows(predict, ft.params, p, np.arange(len(ids)), min(len(ids), 32), m.context_length, pad)
    return ft.spec.classes, probs
