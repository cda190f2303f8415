"""``caer eval``: WAR / UAR reports for a checkpoint, from the cache or from raw frames."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console, Group
from rich.table import Table
from sklearn.metrics import precision_recall_fscore_support

from .encoder import resolve_device
from .metrics import confusion_matrix, uar, war
from .train import (
    build_model, checkpoint_config, is_finetuned, load_checkpoint, make_loader, open_cache, predict, progress_bar,
    split_dataset,
)


@dataclass
class Report:
    classes: list[str]
    labels: np.ndarray
    preds: np.ndarray
    video_ids: list[str]
    checkpoint: str
    split: str
    source: str

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
            "uar": round(uar(cm), 2),
            "classes": self.classes,
            "per_class": [
                {"name": n, "recall": round(100 * r, 2), "precision": round(100 * p, 2), "f1": round(100 * f, 2), "support": int(s)}
                for n, p, r, f, s in zip(self.classes, precision, recall, f1, support)
            ],
            "confusion_matrix": cm.tolist(),
            "confusion_matrix_normalized": np.round(cm / rows, 4).tolist(),
            "checkpoint": self.checkpoint,
            "split": self.split,
            "source": self.source,
            "predictions": [
                {"video_id": v, "label": int(y), "pred": int(p)} for v, y, p in zip(self.video_ids, self.labels, self.preds)
            ],
        }

    def tables(self) -> Group:
        d = self.as_dict()
        head = Table(title=f"{d['split']} ({d['source']}): WAR {d['war']:.2f}  UAR {d['uar']:.2f}", title_justify="left")
        for col in ("class", "recall", "precision", "F1", "support"):
            head.add_column(col, justify="left" if col == "class" else "right")
        for row in d["per_class"]:
            head.add_row(row["name"], f"{row['recall']:.2f}", f"{row['precision']:.2f}", f"{row['f1']:.2f}", str(row["support"]))
        cm = Table(title="confusion matrix: counts (row %)", title_justify="left")
        cm.add_column("true \\ pred")
        for name in self.classes:
            cm.add_column(name[:12], justify="right")
        for i, (name, counts, norm) in enumerate(zip(self.classes, d["confusion_matrix"], d["confusion_matrix_normalized"])):
            cells = [f"{c} ({100 * r:.0f}%)" for c, r in zip(counts, norm)]
            cells[i] = f"[bold]{cells[i]}[/]"
            cm.add_row(name, *cells)
        return Group(head, cm)

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1))

    def plot(self, path: Path) -> None:
        """PNG of the row-normalised confusion matrix with class names and values in the cells."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cm = self.confusion
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        n = len(self.classes)
        fig, ax = plt.subplots(figsize=(1.3 * n + 2.5, 1.1 * n + 2))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), self.classes, rotation=35, ha="right")
        ax.set_yticks(range(n), self.classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        d = self.as_dict()
        ax.set_title(f"{self.split}: WAR {d['war']:.2f}%  UAR {d['uar']:.2f}%")
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{100 * norm[i, j]:.0f}%\n({cm[i, j]})", ha="center", va="center", fontsize=9,
                        color="white" if norm[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)


def evaluate(checkpoint: str | Path, split: str = "test", source: str = "cache", tta_flip: bool = False,
             overrides: dict | None = None, console: Console | None = None) -> Report:
    """Predict every clip of ``split`` with a checkpoint and build its report."""
    console = console or Console()
    if split not in ("train", "val", "test"):
        if not Path(split).is_file():
            raise ValueError(f"--split must be train, val, test or an annotation file, got {split!r}")
        overrides = {**(overrides or {}), "test_list": str(split)}
        split = "test"
    if source not in ("cache", "raw", "auto"):
        raise ValueError(f"--source must be cache or raw, got {source!r}")
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, overrides)
    if source == "auto":  # a fine-tuned encoder (stage 3) has no cache of its own unless one was re-extracted
        source = "raw" if is_finetuned(ckpt["encoder"]) or not cfg.cache else "cache"
    device = resolve_device(cfg.device)
    model, clip = build_model(cfg, device, ckpt)
    cache = open_cache(cfg, source, ckpt["encoder"])
    dataset = split_dataset(cfg, split, False, clip, cache, source)
    loader = make_loader(dataset, cfg, train=False)
    with progress_bar(console) as progress:
        labels, logits, _ = predict(model, loader, source, device, cfg.use_amp, progress=progress)
        if tta_flip:
            if source == "cache" and cache.views < 2:
                raise ValueError("--tta flip from the cache needs a cache extracted with --views 2 (or use --source raw)")
            dataset.eval_view = 1
            _, flipped, _ = predict(model, loader, source, device, cfg.use_amp, progress=progress)
            logits = (logits + flipped) / 2
    return Report(list(cfg.classes), labels, logits.argmax(1), dataset.video_ids, str(checkpoint), split, source)
