"""The report of an evaluation: WAR, UAR, per-class scores, confusion matrix; as tables, JSON and a PNG."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Group
from rich.table import Table
from sklearn.metrics import precision_recall_fscore_support

from ..files import check_outputs, write_atomically
from ..model.metrics import confusion_matrix, uar, uar_all_classes, war
from .display import confusion_table
from .figures import confusion_figure, picture_format, save_figure


@dataclass
class Report:
    """One evaluation: per-clip labels and predictions of a split, with where they came from; the scores follow."""

    classes: list[str]
    labels: np.ndarray
    preds: np.ndarray
    video_ids: list[str]
    checkpoint: str
    split: str
    source: str
    skipped_clips: int = 0  # clips of the split left out because caer extract --skip-bad skipped them
    stage: int | None = None  # the checkpoint's training stage
    epoch: int | None = None  # the checkpoint's epoch within its stage, 0-based as in metrics.jsonl
    tta: str = "none"  # test-time augmentation: none, or flip (the plain and mirrored views' logits averaged)

    @property
    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.labels, self.preds, len(self.classes))

    def as_dict(self) -> dict:
        cm = self.confusion
        precision, recall, f1, support = precision_recall_fscore_support(
            self.labels, self.preds, labels=list(range(len(self.classes))), zero_division=0
        )
        rows = np.maximum(cm.sum(1, keepdims=True), 1)
        return {
            "war": round(war(cm), 2),
            "uar": round(uar(cm), 2),  # mean recall over the classes present: what the tables show
            "uar_all_classes": round(uar_all_classes(cm), 2),  # absent classes score 0 (the seed code's)
            "uar_definition": "uar: mean recall over the classes present in the labels; uar_all_classes: over "
                              "every class, an absent class scoring 0",
            "classes": self.classes,
            "per_class": [
                {"name": n, "recall": round(100 * r, 2), "precision": round(100 * p, 2), "f1": round(100 * f, 2), "support": int(s)}
                for n, p, r, f, s in zip(self.classes, precision, recall, f1, support)
            ],
            "confusion_matrix": cm.tolist(),
            "confusion_matrix_normalized": np.round(cm / rows, 4).tolist(),
            "checkpoint": self.checkpoint,
            "checkpoint_stage": self.stage,
            "checkpoint_epoch": self.epoch,
            "split": self.split,
            "source": self.source,
            "tta": self.tta,
            "skipped_clips": self.skipped_clips,
            "predictions": [
                {"video_id": v, "label": int(y), "pred": int(p)} for v, y, p in zip(self.video_ids, self.labels, self.preds)
            ],
        }

    def tables(self) -> Group:
        d = self.as_dict()
        left_out = f"  ({d['skipped_clips']} skipped clip(s) left out)" if d["skipped_clips"] else ""
        origin = f", stage {self.stage} epoch {self.epoch + 1}" if self.stage is not None and self.epoch is not None else ""
        origin += f", TTA {self.tta}" if self.tta != "none" else ""
        head = Table(title=f"{d['split']} ({d['source']}{origin}): WAR {d['war']:.2f}  UAR {d['uar']:.2f}{left_out}",
                     title_justify="left")
        for col in ("class", "recall", "precision", "F1", "support"):
            head.add_column(col, justify="left" if col == "class" else "right")
        for row in d["per_class"]:
            head.add_row(row["name"], f"{row['recall']:.2f}", f"{row['precision']:.2f}", f"{row['f1']:.2f}", str(row["support"]))
        return Group(head, confusion_table(self.confusion, self.classes, "confusion matrix: counts (row %)", row_share=True))

    def write_json(self, path: Path) -> None:
        write_atomically({path: json.dumps(self.as_dict(), indent=1)})

    def plot(self, path: Path) -> None:
        """PNG of the row-normalised confusion matrix with class names and values in the cells."""
        d = self.as_dict()
        fig = confusion_figure(self.confusion, self.classes, f"{self.split}: WAR {d['war']:.2f}%  UAR {d['uar']:.2f}%")
        save_figure(fig, path, dpi=120)





def check_eval_outputs(cfg, overrides: dict, overwrite: bool) -> None:
    """``caer eval``'s ``--json`` and ``--plot`` (``cfg``: its EvalConfig), checked before anything is loaded: never
    the checkpoint, the split's list file or a file or folder given as --cache, --face-boxes or --pretrained
    (``overrides``), nor inside one; a picture format matplotlib writes; an existing file only with ``overwrite``."""
    outputs = [(flag, Path(value)) for flag, value in (("--json", cfg.json), ("--plot", cfg.plot)) if value]
    inputs = [("the checkpoint", Path(cfg.checkpoint))]
    if cfg.split not in ("train", "val", "test"):
        inputs.append(("the split's list", Path(cfg.split)))
    for name, what in (("cache", "the cache"), ("face_boxes", "the face boxes"), ("pretrained", "the CLIP weights")):
        if overrides.get(name) and (name != "pretrained" or Path(overrides[name]).exists()):  # else an open_clip tag
            inputs.append((what, Path(overrides[name])))
    check_outputs(outputs, inputs, overwrite)
    if cfg.plot:
        picture_format("--plot", Path(cfg.plot))


