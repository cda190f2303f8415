"""Training curves of a run: ``RUN_DIR/curves.png`` from ``metrics.jsonl``, and the same scalars in TensorBoard.

``curve_data`` turns the records into plain series (one point per epoch, one column of panels per
stage); ``plot_curves`` draws them; ``TensorBoardLog`` writes each epoch's scalars (and the valid confusion
matrix as an image) under ``RUN_DIR/tensorboard/stage{N}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..files import check_outputs
from .figures import confusion_figure, picture_format, pyplot, save_figure
from .run_dir import RunDir

# one row of panels per kind of series (the series' prefix): (prefix, panel title, y label)
PANELS = (("accuracy", "WAR / UAR", "%"), ("loss", "loss terms", "loss"), ("weight", "MI / DC weights", "weight"),
          ("lr", "learning rate per group", "rate"))
TENSORBOARD_HINT = "pip install -e '.[tensorboard]'"


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (one per line). A last line cut short (a run stopped while writing it,
    before that epoch's checkpoint) is left out; any other unreadable line is an error naming it."""
    text = Path(path).read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: not a metrics record ({err})") from None
    return records


def epoch_scalars(record: dict) -> dict[str, float]:
    """The scalars of one epoch record, by series name (``panel/what``): train and valid WAR/UAR, each loss
    term, the MI/DC weights and each group's learning rate."""
    out = {f"accuracy/{split}_{metric}": float(record[f"{split}_{metric}"])
           for split in ("train", "valid") for metric in ("war", "uar")}
    out |= {f"loss/{name}": float(value) for name, value in record["losses"].items()}
    out |= {f"weight/{name}": float(record[name]) for name in ("w_mi", "w_dc")}
    out |= {f"lr/{group}": float(rate) for group, rate in record["lr"].items()}
    return out


def curve_data(records: list[dict]) -> dict[int, dict]:
    """``{stage: {"epochs": [1, 2, ...], "series": {name: [one value per epoch]}, "best_epoch": n or None}}``.

    Epochs are 1-based, as the console prints them. A series missing from an epoch (a group without a rate)
    is NaN there. When an epoch was logged twice, its last record counts.
    """
    by_stage: dict[int, dict[int, dict]] = {}
    for r in records:
        by_stage.setdefault(int(r["stage"]), {})[int(r["epoch"])] = r
    data = {}
    for stage in sorted(by_stage):
        epochs = sorted(by_stage[stage])
        scalars = [epoch_scalars(by_stage[stage][e]) for e in epochs]
        names = list(dict.fromkeys(name for s in scalars for name in s))
        best = by_stage[stage][epochs[-1]].get("best_epoch", -1)
        data[stage] = {"epochs": [e + 1 for e in epochs],
                       "series": {n: [s.get(n, math.nan) for s in scalars] for n in names},
                       "best_epoch": best + 1 if best is not None and best >= 0 else None}
    return data


def _label(name: str) -> str:
    """``accuracy/train_war`` -> ``train WAR``, ``weight/w_mi`` -> ``MI weight``, ``lr/image_encoder`` -> ``image encoder``."""
    what = name.split("/", 1)[1]
    if name.startswith("accuracy/"):
        split, metric = what.split("_")
        return f"{split} {metric.upper()}"
    if name.startswith("weight/"):
        return f"{what[2:].upper()} weight"
    return what.replace("_", " ")


def _draw_panel(ax, prefix: str, stage: dict) -> None:
    """The series of one prefix in one stage; accuracy also marks the best epoch (the star: its valid UAR)."""
    epochs = stage["epochs"]
    colours = {"war": "tab:blue", "uar": "tab:orange"}
    for name, values in stage["series"].items():
        if name.split("/", 1)[0] != prefix:
            continue
        style = {"linestyle": "--" if "/train_" in name else "-"}
        if prefix == "accuracy":
            style["color"] = colours[name.rsplit("_", 1)[1]]
        ax.plot(epochs, values, marker="o", markersize=2.5, linewidth=1.3, label=_label(name), **style)
    values = np.array([v for n, s in stage["series"].items() if n.startswith(prefix + "/") for v in s], dtype=float)
    values = values[np.isfinite(values)]
    best = stage["best_epoch"]
    if prefix == "accuracy":
        ax.set_ylim(0, 100)
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", linewidth=1)
            ax.plot([best], [stage["series"]["accuracy/valid_uar"][epochs.index(best)]], "*", color="black",
                    markersize=9, label=f"best (epoch {best})")
    elif prefix == "weight":
        ax.set_ylim(0, 1.2 * values.max() if values.size and values.max() > 0 else 1)
    elif prefix == "lr" and values.size and np.all(values > 0) and values.max() > 10 * values.min():
        from matplotlib.ticker import NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot_curves(data: dict[int, dict], path: Path, title: str = "training curves") -> Path:
    """Draw ``curve_data`` into a PNG: one column per stage, one row per panel (``PANELS``)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    stages = sorted(data)
    fig, axes = plt.subplots(len(PANELS), max(1, len(stages)), figsize=(4.2 * max(1, len(stages)), 9.6),
                             squeeze=False)
    for col, stage in enumerate(stages):
        for row, (prefix, what, unit) in enumerate(PANELS):
            ax = axes[row][col]
            _draw_panel(ax, prefix, data[stage])
            ax.set_title(f"stage {stage}: {what}", fontsize=10)
            ax.set_xlabel("epoch", fontsize=9)
            ax.set_ylabel(unit, fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    # fixed margins: tight_layout would cost about a second per picture, at the end of every stage
    width = fig.get_figwidth()
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.05, top=0.93, wspace=0.3, hspace=0.45)
    return save_figure(fig, path, dpi=80)


def write_curves(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """``caer plot``: the curves of a run directory's ``metrics.jsonl`` into ``out`` (default RUN_DIR/curves.png,
    which is redrawn as caer train does; any other existing file only with ``overwrite``). ``out`` is checked
    (``files.check_outputs``) before anything is read: never the metrics file, and a picture format."""
    run = RunDir(run_dir)
    run_dir, metrics = run.path, run.metrics
    if not metrics.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it a caer train run directory?)")
    default = run.curves
    path = Path(out) if out else default
    check_outputs([("--out", path)], [("the run's metrics", metrics)], overwrite or path.resolve() == default.resolve())
    picture_format("--out", path)
    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics}: no epochs recorded yet")
    return plot_curves(curve_data(records), path, f"{run_dir.name}: training curves")


# ------------------------------------------------------------------------------------------ TensorBoard

def check_tensorboard() -> None:
    """``--tensorboard`` needs the optional ``tensorboard`` package: a one-line error before anything trains."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ValueError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from None


class TensorBoardLog:
    """Each epoch of one stage in ``RUN_DIR/tensorboard/stage{N}``: the curves' scalars (tag = series name,
    step = 1-based epoch) and the valid confusion matrix as an image. Events of epochs at or after the one
    the stage starts from (a fresh start, or a resume) are purged, as ``metrics.jsonl`` drops their lines."""

    def __init__(self, run_dir: RunDir, stage: int, start_epoch: int, classes: list[str]):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir.tensorboard(stage)
        self.classes = classes
        self.writer = SummaryWriter(str(self.path), purge_step=start_epoch + 1)

    def epoch(self, record: dict) -> None:
        step = int(record["epoch"]) + 1
        for name, value in epoch_scalars(record).items():
            self.writer.add_scalar(name, value, step)
        cm = np.array(record["valid_confusion"])
        title = f"valid, epoch {step}: WAR {record['valid_war']:.2f}%  UAR {record['valid_uar']:.2f}%"
        self.writer.add_figure("valid/confusion_matrix", confusion_figure(cm, self.classes, title), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
