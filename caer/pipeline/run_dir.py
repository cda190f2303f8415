"""The files of a ``caer train`` run directory, named in one place (train writes them; eval, plot, compare and
demo read them)."""

from __future__ import annotations

from pathlib import Path


class RunDir:
    """A run directory: its config, metrics, checkpoints per stage, test report and pictures."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def lock(self) -> Path:
        """Held by the ``caer train`` writing the folder: a hidden file beside it (``runs/.raer.lock``, so that
        ``runs/*`` still names run directories only), by its real path (``.``, a link: one lock a folder)."""
        real = self.path.resolve()
        return real.parent / f".{real.name or 'root'}.lock"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        """One JSON line per epoch of every stage."""
        return self.path / "metrics.jsonl"

    @property
    def test_report(self) -> Path:
        return self.path / "test_report.json"

    @property
    def test_confusion(self) -> Path:
        return self.path / "test_confusion.png"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    def last(self, stage: int) -> Path:
        """The checkpoint of a stage's last finished epoch (what --resume continues from)."""
        return self.path / f"stage{stage}-last.pt"

    def best(self, stage: int) -> Path:
        """The checkpoint of a stage's best epoch by valid UAR (what the next stage starts from)."""
        return self.path / f"stage{stage}-best.pt"

    def tensorboard(self, stage: int) -> Path:
        return self.path / "tensorboard" / f"stage{stage}"
