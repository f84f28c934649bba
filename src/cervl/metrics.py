"""Evaluation metrics: pure functions over integer label arrays (class indices 0..K-1, -1 = invalid)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of true class i predicted as j; invalid predictions (-1) are not counted."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ok = y_pred >= 0
    c = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(c, (y_true[ok], y_pred[ok]), 1)
    return c


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def per_class_f1(y_true, y_pred, num_classes: int) -> np.ndarray:
    """F1 per class; a class absent from both truth and predictions gets F1 = 0."""
    c = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(c).astype(float)
    support = np.bincount(np.asarray(y_true), minlength=num_classes).astype(float)
    predicted = c.sum(0).astype(float)
    denom = support + predicted
    return np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    return float(per_class_f1(y_true, y_pred, num_classes).mean())
