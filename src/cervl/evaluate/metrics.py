"""Evaluation metrics: pure functions over integer label arrays.

Class indices are 0..K-1; a prediction of -1 means "invalid" (an unparseable generated answer).
Invalid predictions count as wrong for accuracy and F1 (they are never a true positive) and are
reported separately as the invalid rate.
"""

from __future__ import annotations

import numpy as np

INVALID = -1


def _arrays(y_true, y_pred):
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred {y_pred.shape}")
    return y_true, y_pred


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of true class i predicted as j; invalid predictions are not counted."""
    y_true, y_pred = _arrays(y_true, y_pred)
    ok = y_pred >= 0
    c = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(c, (y_true[ok], y_pred[ok]), 1)
    return c


def row_normalize(c: np.ndarray, support=None) -> np.ndarray:
    """Each row divided by ``support`` (true-class counts, so invalid answers leave a row short of 1),
    or by the row sums when no support is given. Rows of absent classes stay 0."""
    c = np.asarray(c)
    rows = (c.sum(1) if support is None else np.asarray(support)).astype(float)[:, None]
    return np.divide(c, rows, out=np.zeros_like(c, dtype=float), where=rows > 0)


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = _arrays(y_true, y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def per_class_accuracy(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Recall per class (NaN for classes with no samples)."""
    y_true, y_pred = _arrays(y_true, y_pred)
    support = np.bincount(y_true, minlength=num_classes)
    hits = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    return np.divide(hits, support, out=np.full(num_classes, np.nan), where=support > 0)


def per_class_f1(y_true, y_pred, num_classes: int) -> np.ndarray:
    """F1 per class; a class absent from both truth and predictions gets F1 = 0."""
    y_true, y_pred = _arrays(y_true, y_pred)
    c = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(c).astype(float)
    support = np.bincount(y_true, minlength=num_classes).astype(float)
    predicted = c.sum(0).astype(float)
    denom = support + predicted
    return np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    return float(per_class_f1(y_true, y_pred, num_classes).mean())


def weighted_f1(y_true, y_pred, num_classes: int) -> float:
    y_true, _ = _arrays(y_true, y_pred)
    support = np.bincount(y_true, minlength=num_classes).astype(float)
    return float((per_class_f1(y_true, y_pred, num_classes) * support).sum() / max(support.sum(), 1))


def invalid_rate(y_pred) -> float:
    y_pred = np.asarray(y_pred, dtype=int)
    return float((y_pred == INVALID).mean()) if len(y_pred) else 0.0


def top_k_accuracy(y_true, probs, k: int = 2) -> float:
    """Fraction of samples whose true class is among the k most probable."""
    y_true, probs = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float)
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == y_true[:, None]).any(1).mean()) if len(y_true) else float("nan")


def mean_confidence(probs) -> float:
    probs = np.asarray(probs, dtype=float)
    return float(probs.max(1).mean()) if len(probs) else float("nan")


def reliability(y_true, probs, bins: int = 10) -> dict:
    """Per confidence bin: mean confidence, accuracy and count; plus the expected calibration error."""
    y_true, probs = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float)
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    out = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    ece = 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[sel].mean()) if n else None)
        out["accuracy"].append(float((pred[sel] == y_true[sel]).mean()) if n else None)
        if n:
            ece += n / len(y_true) * abs(conf[sel].mean() - (pred[sel] == y_true[sel]).mean())
    out["ece"] = float(ece)
    return out


def abaw_cer_score(y_true, y_pred) -> float:
    """The ABAW compound-expression challenge metric: mean F1 over the 7 C-EXPR-DB classes."""
    return macro_f1(y_true, y_pred, 7)


def summarize(y_true, y_pred, num_classes: int, probs=None) -> dict:
    """All metrics of one evaluation as a JSON-able dict."""
    c = confusion_matrix(y_true, y_pred, num_classes)
    out = {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
        "weighted_f1": weighted_f1(y_true, y_pred, num_classes),
        "invalid_rate": invalid_rate(y_pred),
        "per_class_accuracy": [None if np.isnan(v) else float(v) for v in per_class_accuracy(y_true, y_pred, num_classes)],
        "per_class_f1": per_class_f1(y_true, y_pred, num_classes).tolist(),
        "confusion": c.tolist(),
        "confusion_normalized": row_normalize(c, np.bincount(np.asarray(y_true, dtype=int),
                                                             minlength=num_classes)).round(4).tolist(),
    }
    if probs is not None:
        out.update(top2_accuracy=top_k_accuracy(y_true, probs, 2), mean_confidence=mean_confidence(probs),
                   reliability=reliability(y_true, probs))
    return out


def per_au_f1(predicted: list[set], truth: list[set], aus: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support of each AU, from per-sample sets of predicted and true AUs."""
    out = {}
    for au in aus:
        tp = sum(au in p and au in t for p, t in zip(predicted, truth))
        fp = sum(au in p and au not in t for p, t in zip(predicted, truth))
        fn = sum(au not in p and au in t for p, t in zip(predicted, truth))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        out[au] = {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                   "support": tp + fn}
    return out

