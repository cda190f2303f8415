"""What the recipes show on the console: progress bars and confusion tables (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    import numpy as np


def progress_bar(console: Console) -> Progress:
    """A transient bar with a free ``info`` field (e.g. the running loss)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )


def confusion_table(cm: np.ndarray, classes: list[str], title: str, row_share: bool = False) -> Table:
    """Counts (rows = true class), the diagonal in bold; ``row_share`` adds each cell's row percentage."""
    import numpy as np  # here: the CLI imports this module, and its --help need not wait for numpy

    t = Table(title=title, title_justify="left")
    t.add_column("true \\ pred")
    for name in classes:
        t.add_column(name[:12], justify="right")
    rows = np.maximum(cm.sum(1, keepdims=True), 1)
    for i, (name, counts) in enumerate(zip(classes, cm)):
        cells = [f"{c} ({100 * c / rows[i, 0]:.0f}%)" if row_share else str(c) for c in counts]
        cells[i] = f"[bold]{cells[i]}[/]"
        t.add_row(name, *cells)
    return t


def print_unfolded(console: Console, *tables: Table) -> None:
    """Print each table at its full width, even past a narrow console's (or a log file's 80 columns): a terminal
    then wraps the long lines, but no cell is folded, cut or dropped."""
    for table in tables:
        needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
        width = console.width
        console.width = max(width, needed)
        try:
            console.print(table)
        finally:
            console.width = width
