"""``caer eval``: WAR / UAR reports for a checkpoint, from the cache or from raw frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from ..cache import stored_fingerprint
from ..cache.schema import differences
from ..config import EvalSource, RunConfig, Source
from ..data.loaders import Loader, make_loader, open_cache, split_dataset, with_cache_geometry
from ..data.tensor_views import auto_decode_device
from ..model.caer_model import CAERModel
from ..model.checkpoint import model_from_checkpoint
from ..runtime import autocast, gather
from .display import progress_bar
from .report import Report


@torch.no_grad()
def loader_logits(model: CAERModel, loader: Loader, device: torch.device, use_amp: bool = False,
                  progress: Progress | None = None, text=None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits [N, C]) over a loader, in dataset order; ``text``: precomputed text features. A loader that
    gives each torchrun rank a share (``EpochSampler`` with ``world`` > 1) gives every rank the whole split."""
    model.eval()
    text = text if text is not None else model.text_features()
    labels, logits, indices = [], [], []
    task = progress.add_task("eval", total=len(loader), info="") if progress else None
    for batch in loader:
        batch = batch.to(device)
        with autocast(device, use_amp):
            out = model(batch.face, batch.context, text, batch.flip).float()
        labels.append(batch.label.cpu().numpy())
        logits.append(out.cpu().numpy())
        indices.append(batch.index.numpy())
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    if not indices:
        raise ValueError("no clips to evaluate: the split is empty (or all its clips were left out)")
    mine = [np.concatenate(x) for x in (labels, logits, indices)]
    shares = gather(mine) if getattr(loader.sampler, "world", 1) > 1 else [mine]
    labels, logits, indices = (np.concatenate([share[i] for share in shares]) for i in range(3))
    indices, first = np.unique(indices, return_index=True)  # in order; a share's padding repeats some clips
    labels, logits = labels[first], logits[first]
    check_finite(logits, indices, getattr(loader.dataset, "video_ids", None), use_amp)
    return labels, logits


def check_finite(logits: np.ndarray, indices: np.ndarray, video_ids: list[str] | None, use_amp: bool) -> None:
    """Refuse NaN/inf logits, naming the clips: their argmax would silently be class 0."""
    bad = np.sort(indices[~np.isfinite(logits).all(1)])
    if not len(bad):
        return
    names = ", ".join(repr(video_ids[i]) if video_ids is not None else f"#{i}" for i in bad[:5])
    amp = " (or the half-precision forward pass of use_amp overflowed)" if use_amp else ""
    raise ValueError(f"non-finite logits (NaN/inf) for {len(bad)} clip(s) (first: {names}): the features or the "
                     f"checkpoint hold NaN/inf{amp}; re-extract those clips or retrain rather than score them as class 0")


def pick_source(cfg: RunConfig, encoder: dict) -> Source:
    """``--source auto``: the run's cache when it holds this encoder's features, else raw frames (e.g. for a
    stage-3 checkpoint, whose fine-tuned encoder has no cache unless one was re-extracted with it)."""
    stored = stored_fingerprint(cfg.data.cache) if cfg.data.cache else None  # the root attributes only, not every clip
    return Source.cache if stored is not None and not differences(encoder, stored["encoder"]) else Source.raw


def evaluate(checkpoint: str | Path, split: str = "test", source: EvalSource = EvalSource.auto, tta_flip: bool = False,
             overrides: dict | None = None, console: Console | None = None) -> Report:
    """Predict every clip of ``split`` (a split name or an annotation file) with a checkpoint; its report."""
    console = console or Console()
    label = str(split)  # what the report calls the split: the file's path for an annotation file
    if split not in ("train", "val", "test"):
        if not Path(split).is_file():
            raise ValueError(f"--split must be train, val, test or an annotation file, got {split!r}")
        overrides = {**(overrides or {}), "test_list": str(split)}
        split = "test"  # read through the test slot of the config
    ckpt, cfg, model, backbone = model_from_checkpoint(checkpoint, overrides)
    cfg.list_for(split, "caer eval takes it from the checkpoint's run, which had none: give an annotation file with "
                        "--split FILE")
    if source == EvalSource.auto and cfg.data.cache and not Path(cfg.data.cache).exists():
        console.print(f"[yellow]note:[/] the run's cache {cfg.data.cache} is not there (give --cache if it moved): "
                      "evaluating from raw frames", highlight=False, soft_wrap=True)
    source = pick_source(cfg, ckpt["encoder"]) if source == EvalSource.auto else Source(source)
    device = backbone.device
    cache = open_cache(cfg, source, ckpt["encoder"])
    cfg = with_cache_geometry(cfg, cache, auto_decode_device(backbone))
    if tta_flip and source == Source.cache and cache.views < 2:
        raise ValueError("--tta flip from the cache needs a cache extracted with --views 2 (or use --source raw)")
    views = (0, 1) if tta_flip else (0,)
    logits = 0.0
    dataset = split_dataset(cfg, split, False, backbone.preprocess, cache, source, device=device)  # read once
    with progress_bar(console) as progress:
        for view in views:
            dataset.eval_view = view  # 1: the mirror image (flip TTA)
            labels, view_logits = loader_logits(model, make_loader(dataset, cfg, train=False), device, cfg.runtime.use_amp,
                                          progress)
            logits = logits + view_logits / len(views)
    note_left_out(console, cfg.list_for(split), dataset.left_out)
    return Report(list(cfg.model.classes), labels, logits.argmax(1), dataset.video_ids, str(checkpoint), label, source,
                  len(dataset.left_out), ckpt.get("stage"), ckpt.get("epoch"), "flip" if tta_flip else "none")


def note_left_out(console: Console, list_path: str, left_out: list[str]) -> None:
    """Say how many clips of an annotation file are left out because extraction skipped them (bad input)."""
    if left_out:
        console.print(f"[yellow]note:[/] left out {len(left_out)} clip(s) of {escape(str(list_path))} that caer "
                      f"extract --skip-bad skipped (first: {escape(repr(left_out[0]))}); fix their input and re-run "
                      "caer extract to include them", highlight=False, soft_wrap=True)
