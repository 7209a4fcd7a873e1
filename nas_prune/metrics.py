"""Task metrics on numpy arrays of predictions and labels: accuracy, F1, Matthews correlation
and Spearman correlation (the GLUE metrics), by name in :data:`METRICS`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    predictions, labels = _check_pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 score of the positive class 1; 0.0 when there are no positives at all."""
    predictions, labels = _check_pair(predictions, labels)
    tp = np.sum((predictions == 1) & (labels == 1))
    wrong = np.sum(predictions != labels)
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong > 0 else 0.0


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (multi-class form); 0.0 when it is undefined."""
    predictions, labels = _check_pair(predictions, labels)
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (encoded[: len(labels)], encoded[len(labels) :]), 1)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    total, correct = confusion.sum(), np.trace(confusion)
    numerator = correct * total - true_counts @ pred_counts
    denominator = np.sqrt(
        (total**2 - pred_counts @ pred_counts) * (total**2 - true_counts @ true_counts)
    )
    return float(numerator / denominator) if denominator > 0 else 0.0


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (ties get their average rank); 0.0 if either side is constant."""
    predictions, labels = _check_pair(predictions, labels)
    x = _average_ranks(predictions.astype(np.float64)) - (len(labels) + 1) / 2
    y = _average_ranks(labels.astype(np.float64)) - (len(labels) + 1) / 2
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def _check_pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"metrics need equally long, non-empty inputs; got {len(predictions)} predictions "
            f"and {len(labels)} labels"
        )
    return predictions, labels


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "spearman": spearman,
}
