"""Stratified K-fold cross-validation of a classifier: K fine-tunes, each tested on one
fold, validated on a stratified slice of the rest and trained on the remainder.

Every fold is a complete classifier run in OUT/fold-K (usable with `gptjax classify`);
OUT/folds.json holds each fold's test report and the mean and sample standard deviation
of every metric, and the console shows the same table and each fold's confusion matrix.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from gptjax.errors import GptjaxError
from gptjax.finetune import cls_data, cls_metrics
from gptjax.finetune.settings import Tuning


def check_folds(labels: np.ndarray, classes: tuple[str, ...], k: int) -> None:
    """Every fold needs at least one text of every class in its test part."""
    counts = np.bincount(labels, minlength=len(classes))
    rarest = int(counts.argmin())
    if counts[rarest] < k:
        raise GptjaxError(f"--folds {k} needs at least {k} texts of every class, but class "
                          f"{classes[rarest]!r} has {counts[rarest]}")


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """K disjoint index sets covering every row, each class dealt round the folds after a
    seeded shuffle, so each fold holds floor or ceil of the class's count / K."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0  # where the next class begins dealing, so fold sizes stay within one
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        for j, row in enumerate(members):
            folds[(start + j) % k].append(int(row))
        start = (start + len(members)) % k
    return [rng.permutation(np.array(f, dtype=np.int64)) for f in folds]


def split_rest(rest: np.ndarray, labels: np.ndarray, val_share: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) of the rows outside the test fold: `val_share` of each class, at least
    one row of it, goes to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels[rest]):
        members = rng.permutation(rest[labels[rest] == cls])
        n_val = min(max(1, round(len(members) * val_share)), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def summarize(reports: list[dict], classes: tuple[str, ...]) -> dict:
    """Mean and sample standard deviation (ddof 1) over folds of every scalar metric."""
    rows = {"accuracy": [r["accuracy"] for r in reports], "macro_f1": [r["macro_f1"] for r in reports],
            "loss": [r["loss"] for r in reports]}
    for c in classes:
        for m in ("precision", "recall", "f1"):
            rows[f"{c}/{m}"] = [r["per_class"][c][m] for r in reports]
    return {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "folds": [float(x) for x in v]}
            for name, v in rows.items()}


def format_summary(summary: dict) -> str:
    k = len(next(iter(summary.values()))["folds"])
    width = max(len(n) for n in summary)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"fold {i + 1:<2}" for i in range(k)) + "  mean ± std"]
    for name, s in summary.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:7.4f}" for v in s["folds"])
                     + f"  {s['mean']:.4f} ± {s['std']:.4f}")
    return "\n".join(lines)


def run_folds(base, data, tuning: Tuning, p, out: Path, train_and_test, *, progress: bool = True,
              say=print) -> dict:
    """Cross-validate with `train_and_test` (cls.train_and_test, passed in: cls calls this
    module); returns {"folds": [test reports], "summary": {...}} and writes folds.json."""
    k = data.folds
    folds = stratified_folds(p.labels, k, tuning.seed)
    train_share, val_share = data.split[0], data.split[1]
    plans = []
    for i, test in enumerate(folds):
        rest = np.concatenate([f for j, f in enumerate(folds) if j != i])
        train, val = split_rest(rest, p.labels, val_share / (train_share + val_share), tuning.seed + i)
        if data.balance:
            train = cls_data.balance(train, p.labels, tuning.seed + i)
        if len(train) < tuning.batch_size:  # before any fold trains, not after the first
            raise GptjaxError(f"fold {i + 1}'s training part has {len(train)} texts, fewer than "
                              f"--batch-size {tuning.batch_size}")
        plans.append(dataclasses.replace(p, train=train, val=val, test=test))
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for i, fold in enumerate(plans):
        say(f"== fold {i + 1} of {k}: test on {len(fold.test):,} texts, validate on {len(fold.val):,}, "
            f"train on {len(fold.train):,}")
        reports.append(train_and_test(base, data, tuning, fold, out / f"fold-{i + 1}", progress=progress,
                                      say=say, fold=i + 1))
    summary = summarize(reports, p.classes)
    # Row numbers count the data file's records from 0: which texts each fold tested on.
    result = {"k": k, "seed": tuning.seed, "folds": reports, "summary": summary,
              "test_rows": [sorted(int(r) for r in fold.test) for fold in plans]}
    (out / "folds.json").write_text(json.dumps(result, indent=2) + "\n")
    say(f"== {k}-fold cross-validation (stratified, seed {tuning.seed}); test metrics of each fold's best "
        "checkpoint, mean ± sample std:")
    say(format_summary(summary))
    for i, r in enumerate(reports):
        say(f"fold {i + 1} confusion matrix (rows: true class, columns: predicted class):")
        say(cls_metrics.format_confusion(r["confusion"], p.classes))
    say(f"wrote {out / 'folds.json'} and one classifier run per fold in {out}/fold-1 .. fold-{k}")
    return result
