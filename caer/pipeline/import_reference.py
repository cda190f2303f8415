"""``caer import-reference``: the authors' released CLIP-CAER weights as a caer checkpoint (see ``caer.model.reference``)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..config import ImportReferenceConfig, RunConfig
from ..files import check_outputs
from ..model.checkpoint import save_checkpoint
from ..model.reference import COMPUTED, Imported, Official, convert, read_official, reference_config
from .display import progress_bar


def import_reference(cfg: ImportReferenceConfig, overrides: dict | None = None, console: Console | None = None) -> Table:
    """Read the official checkpoint ``cfg.source``, map it onto caer's reference model and write ``cfg.out``;
    ``overrides`` (``IMPORT_OVERRIDES``: data lists, root, boxes, crops) go into its run config. Its summary table."""
    console = console or Console()
    out = Path(cfg.out)
    check_outputs([("--out", out)], [("the official checkpoint", Path(cfg.source))], cfg.overwrite)
    with progress_bar(console) as progress:
        task = progress.add_task("reading the official checkpoint", total=3, info=cfg.source)
        official = read_official(cfg.source)
        progress.update(task, advance=1, description="mapping its tensors onto caer's reference model")
        run_cfg = reference_config(official, overrides)
        imported = convert(official, run_cfg)
        progress.update(task, advance=1, description="writing", info=str(out))
        save_checkpoint(imported.checkpoint, out)
        progress.advance(task)
    return summary(official, imported, run_cfg, out)


def summary(official: Official, imported: Imported, cfg: RunConfig, out: Path) -> Table:
    """What was read, mapped, left out and written."""
    m, encoder = cfg.model, imported.checkpoint["encoder"]
    t = Table(title="caer import-reference", show_header=False)
    t.add_row("official checkpoint", f"{official.path} (sha256 {imported.sha256[:16]}...)")
    if official.epoch is not None:
        best = f", best_acc {official.best_acc:.2f} in its log" if official.best_acc is not None else ""
        t.add_row("saved after", f"epoch {official.epoch}{best}")
    t.add_row("tensors mapped", str(imported.mapped))
    t.add_row("left out", f"{len(imported.repeats)} (clip_model_.* repeating the mapped towers, checked equal)")
    t.add_row("computed", ", ".join(COMPUTED))
    t.add_row("classes", f"{len(m.classes)}: {', '.join(m.classes)}")
    t.add_row("prompts", f"{m.contexts_number} context vectors {'per class' if m.class_specific_contexts else 'shared'}, "
              "in front of the file's own embedded class sentences")
    t.add_row("temporal", f"{m.temporal_layers} layer(s), {m.num_frames} frames, MLP {m.temporal_mlp}")
    t.add_row("encoder", f"{encoder['model']}, fine-tuned from {encoder['finetuned_from']}, "
              f"preprocess {cfg.encoder.preprocess}")
    t.add_row("written", f"{out} (a stage-3 caer checkpoint)")
    return t
