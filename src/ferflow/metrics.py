"""ABAW metrics: macro F1 over the 8 expression classes and Lin's concordance correlation (CCC).

Both follow the challenge conventions: statistics over all valid frames of all videos
concatenated; CCC with population (biased) variances; F1 of a class that is neither present
nor predicted counts as 0 in the unweighted mean over all 8 classes.
"""

from __future__ import annotations

import numpy as np

from .labels import NUM_EXPRESSIONS


def _paired(a, b, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as arrays of ``dtype``; a ValueError when their shapes differ."""
    a = np.asarray(a, dtype=dtype)
    b = np.asarray(b, dtype=dtype)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return a, b


def confusion_matrix(y_true, y_pred, num_classes: int = NUM_EXPRESSIONS) -> np.ndarray:
    y_true, y_pred = _paired(y_true, y_pred, np.int64)
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} has labels outside 0..{num_classes - 1}")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def per_class_f1(y_true, y_pred, num_classes: int = NUM_EXPRESSIONS) -> np.ndarray:
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    tp = np.diag(cm)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # = 2 tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    return f1


def macro_f1(y_true, y_pred, num_classes: int = NUM_EXPRESSIONS) -> float:
    """Unweighted mean of the per-class F1 over all ``num_classes`` classes."""
    return float(per_class_f1(y_true, y_pred, num_classes).mean())


def ccc(x, y) -> float:
    """Concordance correlation coefficient with population statistics, computed in float64."""
    x, y = _paired(x, y, np.float64)
    if x.size == 0:
        return float("nan")
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()
    cov = ((x - mx) * (y - my)).mean()
    denom = vx + vy + (mx - my) ** 2
    if denom == 0:
        return 1.0 if np.array_equal(x, y) else 0.0
    return float(2 * cov / denom)


def accuracy(y_true, y_pred) -> float:
    """Fraction of frames whose predicted class equals the true one (NaN when there are none)."""
    y_true, y_pred = _paired(y_true, y_pred, np.int64)
    if y_true.size == 0:
        return float("nan")
    return float((y_true == y_pred).mean())


def va_ccc(va_true, va_pred) -> tuple[float, float, float]:
    """CCC of valence (column 0) and arousal (column 1) and their mean, the ABAW VA score."""
    va_true = np.asarray(va_true)
    va_pred = np.asarray(va_pred)
    if va_true.ndim != 2 or va_true.shape[1] != 2 or va_true.shape != va_pred.shape:
        raise ValueError(f"expected two (N, 2) arrays, got {va_true.shape} and {va_pred.shape}")
    c_v = ccc(va_true[:, 0], va_pred[:, 0])
    c_a = ccc(va_true[:, 1], va_pred[:, 1])
    return c_v, c_a, (c_v + c_a) / 2
