"""WAR / UAR and the confusion matrix."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """Counts [C, C]; rows are true classes, columns predictions. Refuses empty input and indices outside 0..C-1
    (numpy would count -1 as class C-1)."""
    labels, preds = _indices(labels, "label", num_classes), _indices(preds, "prediction", num_classes)
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    if not len(labels):
        raise ValueError("no clips to score: WAR and UAR of an empty split are undefined")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def _indices(values, what: str, num_classes: int) -> np.ndarray:
    """``values`` as a 1-D int64 array, each a class index in 0..C-1."""
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what}s must be class indices (integers), got dtype {array.dtype}")
    array = array.astype(np.int64).reshape(-1)
    wrong = array[(array < 0) | (array >= num_classes)]
    if len(wrong):
        raise ValueError(f"{what} {int(wrong[0])} is not a class index 0..{num_classes - 1} ({len(wrong)} such "
                         f"{what}(s))")
    return array


def war(cm: np.ndarray) -> float:
    """Weighted average recall = overall accuracy, in percent; nan for an empty matrix."""
    total = int(cm.sum())
    return 100.0 * float(np.trace(cm)) / total if total else float("nan")


def uar(cm: np.ndarray) -> float:
    """Unweighted average recall = mean recall over the classes present, in percent; nan for an empty matrix."""
    support = cm.sum(1)
    present = support > 0
    return 100.0 * float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan")


def uar_all_classes(cm: np.ndarray) -> float:
    """Mean recall over every class of the label set, a class absent from the labels scoring 0 (the seed
    code's definition), in percent. Equal to ``uar`` whenever every class occurs; nan for an empty matrix."""
    support = cm.sum(1)
    if not support.any():
        return float("nan")
    recalls = np.diag(cm) / np.maximum(support, 1)
    return 100.0 * float(np.mean(recalls))
