"""Classification metrics: confusion matrix, per-class precision/recall/F1, text and PNG reports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Counts as int64 (n_classes, n_classes): rows are true classes, columns predicted ones."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    for name, y in (("true label", y_true), ("prediction", y_pred)):
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"a {name} lies outside 0..{n_classes - 1}")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return matrix


def _ratio(num, den) -> float:
    return float(num) / float(den) if den else 0.0


def classification_report(y_true, y_pred, classes: Sequence[str]) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    A ratio whose denominator is zero (a class never predicted, never present, or an
    empty input) is reported as 0.0; macro F1 is the unweighted mean over all `classes`.
    """
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    hits = np.diag(matrix)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    per_class = {}
    for i, name in enumerate(classes):
        precision, recall = _ratio(hits[i], predicted[i]), _ratio(hits[i], support[i])
        per_class[str(name)] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": int(support[i]),
        }
    n = int(matrix.sum())
    return {
        "accuracy": _ratio(hits.sum(), n),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])) if classes else 0.0,
        "per_class": per_class,
        "confusion": matrix.tolist(),
        "n": n,
    }


def format_report(report: dict, classes: Sequence[str]) -> str:
    """A plain-text table of a classification_report for the console."""
    names = [str(c) for c in classes]
    width = max([len(n) for n in names] + [len("class")])
    lines = [f"examples  {report['n']}",
             f"accuracy  {report['accuracy']:.4f}",
             f"macro F1  {report['macro_f1']:.4f}",
             "",
             f"{'class':<{width}}  precision  recall      f1  support"]
    for name in names:
        c = report["per_class"][name]
        lines.append(f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  "
                     f"{c['f1']:6.4f}  {c['support']:7d}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              format_confusion(report["confusion"], classes)]
    return "\n".join(lines)


def format_confusion(matrix, classes: Sequence[str]) -> str:
    """The confusion matrix as aligned text, class names on both axes."""
    names = [str(c) for c in classes]
    width = max([len(n) for n in names] + [len("class")])
    cell = max([len(n) for n in names] + [len(str(v)) for row in matrix for v in row])
    lines = [" " * (width + 2) + "  ".join(f"{n:>{cell}}" for n in names)]
    for name, row in zip(names, matrix):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path) -> Path:
    """Save the confusion matrix as a PNG heat map with the count in every cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    path = Path(path)
    n = len(classes)
    side = 2.5 + 0.6 * n
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=110)
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    names = [str(c) for c in classes]
    tilt = n > 4  # long rows of names would overlap on the x axis
    ax.set_xticks(range(n), names, rotation=45 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    # Dark cells get white digits so every count stays legible.
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if matrix[i, j] > threshold else "black")
    fig.tight_layout()
    # Written under a temporary name and renamed, so a reader never sees half a PNG.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
