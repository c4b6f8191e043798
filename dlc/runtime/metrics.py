"""Classification metrics beyond accuracy, computed in numpy from a model's outputs and the
labels (`dlc eval`, `Model.classification_report`): top-k accuracy, precision, recall and F1
per class and their macro averages, and the confusion matrix."""
from __future__ import annotations

import numpy as np

from dlc.core.diagnostics import ArgumentError


def predicted_classes(outputs: np.ndarray, kind: str, from_logits: bool = False) -> np.ndarray:
    """Class ids: the argmax for `cross_entropy` models, a threshold for `bce` (0.5 on
    probabilities, 0 on logits), element by element."""
    if kind == "cross_entropy":
        return outputs.argmax(axis=-1)
    return (outputs > (0.0 if from_logits else 0.5)).astype(np.int64).ravel()


def true_classes(labels: np.ndarray, kind: str) -> np.ndarray:
    if kind == "cross_entropy":
        return labels.astype(np.int64) if labels.ndim == 1 else labels.argmax(axis=-1)
    return (labels > 0.5).astype(np.int64).ravel()


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """[classes, classes] counts: row = true class, column = predicted class."""
    m = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(m, (truth, predicted), 1)
    return m


def top_k_accuracy(outputs: np.ndarray, truth: np.ndarray, k: int) -> float:
    """The share of samples whose true class is among the k highest outputs."""
    if len(truth) == 0:
        return 0.0
    top = np.argpartition(-outputs, kth=min(k, outputs.shape[-1]) - 1, axis=-1)[:, :k]
    return float(np.mean(np.any(top == truth[:, None], axis=1)))


def per_class(confusion: np.ndarray) -> list[dict]:
    """Precision, recall and F1 of each class (0 where undefined: no predictions or no samples)."""
    rows = []
    for c in range(len(confusion)):
        tp = confusion[c, c]
        predicted, actual = confusion[:, c].sum(), confusion[c, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": c, "precision": float(precision), "recall": float(recall),
                     "f1": float(f1), "support": int(actual)})
    return rows


def classification_report(outputs: np.ndarray, labels: np.ndarray, kind: str, from_logits: bool = False,
                          top_k: int = 5) -> dict:
    """Everything above for one data set. `kind` says how outputs give classes: cross_entropy
    (the argmax over the last axis) or bce (a threshold, two classes)."""
    if kind not in ("cross_entropy", "bce"):
        raise ArgumentError("classification metrics need a classification loss (`cross_entropy` or `bce`)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ArgumentError(f"top_k must be a positive integer, got {top_k!r}")
    outputs, labels = np.asarray(outputs), np.asarray(labels)
    if kind == "cross_entropy" and outputs.ndim > 2:  # per step ([B, T, K]): every position is a sample
        labels = labels.reshape(-1, outputs.shape[-1]) if labels.ndim == outputs.ndim else labels.reshape(-1)
        outputs = outputs.reshape(-1, outputs.shape[-1])
    truth = true_classes(labels, kind)
    predicted = predicted_classes(outputs, kind, from_logits)
    classes = outputs.shape[-1] if kind == "cross_entropy" else 2
    confusion = confusion_matrix(truth, predicted, classes)
    rows = per_class(confusion)
    report = {"samples": int(len(truth)), "classes": classes,
              "accuracy": float(np.mean(truth == predicted)) if len(truth) else 0.0}
    if kind == "cross_entropy" and classes > top_k:
        report[f"top_{top_k}_accuracy"] = top_k_accuracy(outputs, truth, top_k)
    for name in ("precision", "recall", "f1"):  # macro averages: every class counts the same
        report[name] = float(np.mean([r[name] for r in rows]))
    report["per_class"] = rows
    report["confusion"] = confusion.tolist()
    return report


def format_report(report: dict) -> str:
    """The per-class table and the confusion matrix, as `dlc eval` prints them."""
    lines = [f"{'class':>5}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}"]
    for r in report["per_class"]:
        lines.append(f"{r['class']:>5}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}  "
                     f"{r['support']:>7}")
    lines.append(f"{'macro':>5}  {report['precision']:>9.4f}  {report['recall']:>6.4f}  {report['f1']:>6.4f}  "
                 f"{report['samples']:>7}")
    m = np.asarray(report["confusion"])
    width = max(len(str(m.max())) if m.size else 1, len(str(len(m) - 1)), 2)
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    lines.append(" " * (width + 3) + " ".join(f"{c:>{width}}" for c in range(len(m))))
    for c, row in enumerate(m):
        lines.append(f"{c:>{width}} | " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines) + "\n"
