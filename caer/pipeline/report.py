"""The report of an evaluation: WAR, UAR, per-class scores, confusion matrix; as tables, JSON and a PNG."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Group
from rich.table import Table
from sklearn.metrics import precision_recall_fscore_support

from ..files import replaced_atomically
from ..model.metrics import confusion_matrix, uar, uar_all_classes, war
from .display import confusion_table


@dataclass
class Report:
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
            "skipped_clips": self.skipped_clips,
            "predictions": [
                {"video_id": v, "label": int(y), "pred": int(p)} for v, y, p in zip(self.video_ids, self.labels, self.preds)
            ],
        }

    def tables(self) -> Group:
        d = self.as_dict()
        left_out = f"  ({d['skipped_clips']} skipped clip(s) left out)" if d["skipped_clips"] else ""
        origin = f", stage {self.stage} epoch {self.epoch + 1}" if self.stage is not None and self.epoch is not None else ""
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


def confusion_figure(cm: np.ndarray, classes: list[str], title: str):
    """A matplotlib figure (Agg) of the row-normalised confusion matrix, rows = true class, with each cell's share and count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.3 * n + 2.5, 1.1 * n + 2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=35, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * norm[i, j]:.0f}%\n({cm[i, j]})", ha="center", va="center", fontsize=9,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def picture_format(flag: str, path: Path) -> str:
    """The matplotlib format a picture path names by its suffix (``png``, ``pdf``, ``svg``, ...); refused when
    matplotlib writes no such format, or the name has no suffix (matplotlib would add ``.png`` to it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = Path(path).suffix[1:].lower()
    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        what = f"'.{fmt}' is not a picture format matplotlib writes" if fmt else "no suffix to name its format"
        raise ValueError(f"{flag} {path}: {what} (use .png, .pdf, .svg, ...)")
    return fmt


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Write a matplotlib figure in its suffix's format under a temporary name beside ``path``, then rename it (as
    ``write_atomically``); closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with replaced_atomically(path) as temp:
            fig.savefig(temp, format=picture_format("picture", path), dpi=dpi)
    finally:
        plt.close(fig)
    return path


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


def write_atomically(files: dict[Path, str]) -> None:
    """Write each text under a temporary name beside its path, then rename them all: a stopped or failed run leaves
    no half-written file, and the files that were there stay as they were until every new one is complete."""
    with contextlib.ExitStack() as renames:  # the files are renamed as the stack unwinds, once all are written
        for path, text in files.items():
            with open(renames.enter_context(replaced_atomically(path)), "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())


def check_outputs(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path]], overwrite: bool) -> None:
    """Refuse, before any work, an output (flag, path) that is one of the inputs (what it is, path) or inside an
    input folder (whatever --overwrite says), names the same file as another output, is a folder or lies under a
    file, or already exists (without ``overwrite``). Every command that writes files checks them here."""
    written: dict[Path, str] = {}
    for flag, path in outputs:
        for what, source in inputs:
            same = _same_file(path, source)
            if same or (source.is_dir() and source.resolve() in path.resolve().parents):
                raise ValueError(f"{flag} {path} {'is' if same else 'lies inside'} {what} {source}: write the output "
                                 "elsewhere")
        if path.resolve() in written:
            raise ValueError(f"{written[path.resolve()]} and {flag} name the same file, {path}")
        written[path.resolve()] = flag
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder: give the file to write")
        blocker = next((parent for parent in path.parents if parent.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise ValueError(f"{flag} {path}: {blocker} is a file, not a folder")
        if path.exists() and not overwrite:
            raise ValueError(f"{flag} {path} already exists: pass --overwrite to replace it")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (through links, too)."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
