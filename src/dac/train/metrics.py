"""The paper's metrics: accuracy, confusion matrix, one-vs-rest ROC and AUC per class, macro AUC.

Computed from predicted class probabilities with scikit-learn's ``sklearn.metrics``;
across folds: mean and sample standard deviation (``ddof = 1``; None for a single fold).

Examples:
    >>> labels = np.array([0, 1, 2, 2, 1])
    >>> probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .3, .6], [.5, .1, .4], [.6, .3, .1]])
    >>> m = classification_metrics(labels, probs)
    >>> m["accuracy"], m["confusion"][2], round(m["macro_auc"], 4)
    (0.6, [1, 0, 1], 0.9722)
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from .._checks import DACInputError

__all__ = ["classification_metrics", "mean_std", "roc_curve", "summarize_folds"]


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve of ``scores`` for a binary truth, one point per distinct score.

    scikit-learn's ``roc_curve(positive, scores, drop_intermediate=False)``, after a check
    that names the argument.

    Args:
        scores: array[N], higher means more likely positive.
        positive: array[N] of bool (or 0/1), the truth, with both classes present.

    Returns:
        (fpr, tpr, thresholds), each array[K + 1] for K distinct scores; the first point
        is (0, 0).

    Examples:
        >>> fpr, tpr, _ = roc_curve(np.array([0.9, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0]))
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive).astype(bool).ravel()
    if scores.shape != positive.shape or scores.size == 0:
        raise DACInputError(f"scores, positive: expected two non-empty arrays of one length, got {scores.shape} and {positive.shape}")
    if not np.isfinite(scores).all():
        raise DACInputError("scores: contains NaN or Inf values")
    if positive.all() or not positive.any():
        raise DACInputError("positive: a ROC curve needs both positive and negative samples")
    return skm.roc_curve(positive, scores, drop_intermediate=False)


def classification_metrics(labels: Sequence[int] | np.ndarray, probs: np.ndarray, num_classes: int | None = None) -> dict[str, Any]:
    """Accuracy, confusion matrix, per-class one-vs-rest ROC and AUC, and macro AUC.

    Args:
        labels: array[N] of true classes in ``0..C-1``.
        probs: array[N, C] of predicted class probabilities (any scores: only their
            order matters for ROC; the argmax is the prediction).
        num_classes: C (default: ``probs.shape[1]``).

    Returns:
        dict of plain Python values (JSON ready): ``n``, ``accuracy``, ``confusion``
        (C x C lists, rows true), ``per_class_auc`` (list[C]; None for a class with no
        positive or no negative sample), ``macro_auc`` (the mean of the defined
        per-class AUCs: scikit-learn's ``roc_auc_score(multi_class="ovr",
        average="macro")``), ``roc`` (list[C] of {"fpr": [...], "tpr": [...]}).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or probs.shape[0] == 0:
        raise DACInputError(f"labels, probs: expected shapes [N] and [N, C] with N >= 1, got {labels.shape} and {probs.shape}")
    c = probs.shape[1] if num_classes is None else int(num_classes)
    if probs.shape[1] != c:
        raise DACInputError(f"probs: expected {c} columns (num_classes), got shape {probs.shape}")
    if labels.min() < 0 or labels.max() >= c:
        raise DACInputError(f"labels: expected classes in 0..{c - 1}, got {labels.min()}..{labels.max()}")
    labels = labels.astype(np.int64)
    predicted = probs.argmax(1)
    per_class, roc = [], []
    for k in range(c):
        positive = labels == k
        if positive.all() or not positive.any():
            per_class.append(None)
            roc.append({"fpr": [], "tpr": []})
            continue
        fpr, tpr, _ = roc_curve(probs[:, k], positive)
        per_class.append(float(skm.auc(fpr, tpr)))
        roc.append({"fpr": fpr.tolist(), "tpr": tpr.tolist()})
    defined = [a for a in per_class if a is not None]
    return {
        "n": int(labels.size),
        "accuracy": float((predicted == labels).mean()),
        "confusion": skm.confusion_matrix(labels, predicted, labels=list(range(c))).tolist(),
        "per_class_auc": per_class,
        "macro_auc": float(np.mean(defined)) if defined else None,
        "roc": roc,
    }


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1) of the values that are not None.

    Examples:
        >>> [round(v, 4) for v in mean_std([0.9, 0.8, None])], mean_std([0.5])
        ([0.85, 0.0707], (0.5, None))
    """
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=np.float64)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def summarize_folds(folds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std across folds of :func:`classification_metrics` results.

    Args:
        folds: one dict per fold with ``accuracy``, ``macro_auc``, ``per_class_auc``,
            ``confusion`` (and any other keys, e.g. ``fold``, kept in ``folds``).

    Returns:
        dict with ``accuracy_mean``, ``accuracy_std``, ``macro_auc_mean``,
        ``macro_auc_std``, ``per_class_auc_mean`` and ``per_class_auc_std`` (lists),
        ``confusion`` (summed over folds) and ``folds`` (each fold's numbers, without
        its ROC points, confusion matrix and training history).

    Examples:
        >>> s = summarize_folds([{"accuracy": .5, "macro_auc": .7, "per_class_auc": [.7, .7], "confusion": [[1, 1], [0, 0]]},
        ...                      {"accuracy": .7, "macro_auc": .9, "per_class_auc": [.9, .9], "confusion": [[1, 0], [0, 1]]}])
        >>> round(s["accuracy_mean"], 6), round(s["macro_auc_std"], 6), s["confusion"]
        (0.6, 0.141421, [[2, 1], [0, 1]])
    """
    if not folds:
        raise DACInputError("folds: expected at least one fold's metrics")
    classes = len(folds[0]["per_class_auc"])
    acc_mean, acc_std = mean_std([f["accuracy"] for f in folds])
    auc_mean, auc_std = mean_std([f["macro_auc"] for f in folds])
    per_class = [mean_std([f["per_class_auc"][k] for f in folds]) for k in range(classes)]
    return {
        "accuracy_mean": acc_mean,
        "accuracy_std": acc_std,
        "macro_auc_mean": auc_mean,
        "macro_auc_std": auc_std,
        "per_class_auc_mean": [m for m, _ in per_class],
        "per_class_auc_std": [s for _, s in per_class],
        "confusion": np.sum([np.asarray(f["confusion"]) for f in folds], axis=0).tolist(),
        "folds": [{k: v for k, v in f.items() if k not in ("roc", "confusion", "history")} for f in folds],
    }
