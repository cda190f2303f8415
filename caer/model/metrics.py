"""WAR / UAR and the confusion matrix."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """Counts [C, C]; rows are true classes, columns predictions."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def war(cm: np.ndarray) -> float:
    """Weighted average recall = overall accuracy, in percent."""
    return 100.0 * float(np.trace(cm)) / max(int(cm.sum()), 1)


def uar(cm: np.ndarray) -> float:
    """Unweighted average recall = mean recall over the classes present, in percent."""
    support = cm.sum(1)
    present = support > 0
    return 100.0 * float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else 0.0


def uar_all_classes(cm: np.ndarray) -> float:
    """Mean recall over every class of the label set, a class absent from the labels scoring 0 (the seed
    code's definition), in percent. Equal to ``uar`` whenever every class occurs."""
    support = cm.sum(1)
    recalls = np.diag(cm) / np.maximum(support, 1)
    return 100.0 * float(np.mean(recalls))
