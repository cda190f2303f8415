"""Pictures: matplotlib (its Agg back end: no screen) for confusion matrices and training curves, written whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import replaced_atomically


def pyplot():
    """matplotlib.pyplot on the Agg back end (files only: caer runs on machines with no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(cm: np.ndarray, classes: list[str], title: str):
    """A matplotlib figure of the row-normalised confusion matrix, rows = true class, with each cell's share and count."""
    plt = pyplot()
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
    ``files.write_atomically``); closes the figure."""
    plt = pyplot()
    path = Path(path)
    try:
        with replaced_atomically(path) as temp:
            fig.savefig(temp, format=picture_format("picture", path), dpi=dpi)
    finally:
        plt.close(fig)
    return path
