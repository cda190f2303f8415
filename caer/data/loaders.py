"""From a run config to data loaders: the cache (or raw frames) of a split, with TSN sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import runtime
from ..cache import CacheError, FeatureCache
from ..cache.schema import skipped_source
from ..config import Decode, RunConfig, Source
from ..model.encoder import Preprocess
from .ahead import prepared_ahead
from .datasets import CachedClips, EpochSampler, RawClips
from .raer import Clip, DataError, ViewMaker, check_disjoint, read_annotations, read_lines
from .tensor_views import TensorViews


def open_cache(cfg: RunConfig, source: Source, encoder: dict) -> FeatureCache | None:
    """The cache to read features from (checked against the ``encoder`` identity), or, for raw frames,
    the run's cache if there is one (raw frames are then sampled with its frame stride)."""
    path = cfg.data.cache
    if source == Source.cache:
        if not path:
            raise ValueError("--source cache needs --cache (or use --source raw)")
        cache = FeatureCache.open(path)
        cache.check_encoder(encoder)
        if cfg.data.cache_in_memory:
            cache.load_into_memory()
        return cache
    return FeatureCache.open(path) if path and Path(path).exists() else None


def with_cache_geometry(cfg: RunConfig, cache: FeatureCache | None, device=None) -> RunConfig:
    """The run config with one crop geometry for everything: the cache's margin, crop-body, frame stride and decode
    path (a flag that contradicts them is refused) and, unless given, its box files and root; without a cache, the
    flags' or the declared fallbacks (``--decode auto`` by ``device``: ``tensor_views.auto_decode_device``)."""
    if cache is None:
        return dataclasses.replace(cfg, crop=cfg.crop.resolved(device=device))
    return dataclasses.replace(cfg, crop=cfg.crop.resolved(cache.fingerprint, cache.inputs, where=str(cache.path),
                                                           device=device))


def check_boxes_match(cache: FeatureCache, view_maker: ViewMaker, clips: list[Clip]) -> None:
    """Raw frames must be cut with the boxes the cache was cut with (per-clip digests), or cache and raw disagree."""
    for clip in clips:
        stored = cache.boxes_digest(clip.video_id) if clip.video_id in cache else None
        if stored is not None and stored != view_maker.boxes_digest(clip):
            raise CacheError(
                f"{clip.source}: the face/body boxes of clip {clip.video_id!r} differ from those {cache.path} was "
                f"extracted with ({cache.inputs.get('face_boxes') or 'its box files'}); pass the same box files, "
                "or re-extract the cache"
            )


def check_box_files_match(cfg: RunConfig) -> None:
    """Box files given beside a cache must be those it was cut with, for every split of the run: checked before the
    first stage, though only raw frames (stage 3, ``--source raw``) read them, so that a staged run does not train
    stages 1 and 2 before finding out."""
    if not (cfg.data.cache and (cfg.crop.face_boxes or cfg.crop.body_boxes) and Path(cfg.data.cache).exists()):
        return
    cache = FeatureCache.open(cfg.data.cache)
    cfg = with_cache_geometry(cfg, cache)
    root = cfg.dataset_root("train")
    view_maker = ViewMaker.from_config(cfg.crop, root)
    for split in ("train", "val", "test"):
        if getattr(cfg.data, f"{split}_list"):
            clips, _ = read_annotations(cfg.list_for(split), root, len(cfg.model.classes), skip_bad=True,
                                        need_frames=False, fps=cfg.crop.fps)
            check_boxes_match(cache, view_maker, clips)


def recorded_skips(cache: FeatureCache | None) -> set[str]:
    """Video ids that ``caer extract --skip-bad`` left out of ``cache``: its ``skipped_clips`` attribute, or, for a
    store without one, the clips on the annotation lines that its ``skipped`` entries ("file:line: reason") name."""
    if cache is None:
        return set()
    if "skipped_clips" in cache.attrs:
        return set(cache.attrs["skipped_clips"])
    ids, files = set(), {}
    for entry in cache.attrs.get("skipped") or []:
        if (source := skipped_source(entry)) is None:
            continue
        path, lineno = source
        if path not in files:
            files[path] = read_lines(Path(path)) if Path(path).is_file() else []
        line = files[path][lineno - 1].split() if lineno <= len(files[path]) else []
        if line:
            ids.add(line[0])
    return ids


def split_clips(cfg: RunConfig, split: str, cache: FeatureCache | None, source: Source,
                root: str | None = None) -> tuple[list[Clip], list[str]]:
    """The clips of a split, and the ids of those left out because the cache records that extraction skipped them
    (bad input with ``--skip-bad``). Any other clip that is bad on disk (raw frames) or missing from the cache
    (``source`` cache) is an error."""
    list_path = cfg.list_for(split)
    from_cache = source == Source.cache
    clips, bad = read_annotations(list_path, root if root is not None else cfg.crop.root, len(cfg.model.classes),
                                  skip_bad=True, need_frames=not from_cache, fps=cfg.crop.fps)
    skipped = {v for v in recorded_skips(cache) if v not in cache}
    for b in bad:
        if b.video_id not in skipped:
            raise DataError(str(b))
    left_out = [b.video_id for b in bad] + [c.video_id for c in clips if c.video_id in skipped]
    clips = [c for c in clips if c.video_id not in skipped]
    if not clips:
        raise DataError(f"{list_path}: no usable clips ({len(left_out)} left out as skipped by caer extract --skip-bad)")
    missing = [c.video_id for c in clips if from_cache and c.video_id not in cache]
    if missing:
        raise CacheError(
            f"{cache.path}: {len(missing)} clip(s) of {list_path} are not in the cache (first: {missing[0]!r}); "
            f"run caer extract on {list_path}"
        )
    return clips, left_out


def split_dataset(cfg: RunConfig, split: str, train: bool, preprocess: Preprocess, cache: FeatureCache | None,
                  source: Source, augment: bool = False, eval_view: int = 0,
                  device: torch.device | None = None) -> CachedClips | RawClips:
    """The dataset of one split ("train", "val" or "test") from the cache or from raw frames.

    ``augment`` (stage 3) draws a random flip and rotation per clip; ``eval_view`` 1 evaluates on the
    mirror image (flip TTA). Its ``left_out`` lists the clips that extraction skipped (see ``split_clips``).
    ``device``: the model's; with ``--decode tensor`` on CUDA, raw frames are decoded and cut there (``make_loader``).
    """
    cfg = with_cache_geometry(cfg, cache)
    segments, seed = cfg.model.num_frames, cfg.run.seed
    if source == Source.cache:
        clips, left_out = split_clips(cfg, split, cache, source)
        dataset = CachedClips(cache, [c.video_id for c in clips], [c.label for c in clips], segments, train, seed,
                              eval_view)
        dataset.left_out = left_out
        return dataset
    if not cfg.crop.face_boxes:
        raise ValueError("--source raw needs --face-boxes (or a cache that records them)")
    root = cfg.dataset_root(split)
    clips, left_out = split_clips(cfg, split, cache, source, root)
    view_maker = ViewMaker.from_config(cfg.crop, root)
    if cache is not None:
        check_boxes_match(cache, view_maker, clips)
    # training on raw frames picks a random view per clip: the cache's views, or (stage 3) always a random flip
    views = 2 if augment else (cache.views if cache is not None else 1)
    tensor_views = TensorViews(view_maker, preprocess) if cfg.crop.decode == Decode.tensor else None
    dataset = RawClips(clips, view_maker, preprocess, segments, train, views=views, frame_stride=cfg.crop.frame_stride,
                       seed=seed, rotate=cfg.stages.rotate_degrees if augment else 0.0, eval_view=eval_view,
                       tensor_views=tensor_views, decode_device=device if device and device.type == "cuda" else None)
    dataset.left_out = left_out
    return dataset


def check_splits_disjoint(cfg: RunConfig) -> None:
    """Refuse a clip listed in two of the run's splits (naming both places)."""
    lists = [p for p in (cfg.data.train_list, cfg.data.val_list, cfg.data.test_list) if p]
    check_disjoint([read_annotations(p, cfg.crop.root, len(cfg.model.classes), need_frames=False)[0] for p in lists])


def class_counts(dataset: CachedClips | RawClips, num_classes: int) -> np.ndarray:
    return np.bincount(dataset.labels, minlength=num_classes)


class DecodingLoader:
    """A DataLoader whose workers only read raw clips' bytes and boxes (``RawClips.decode_device`` set): its batches
    are decoded and cut on that device by a thread ahead of the consumer (``ahead.prepared_ahead``). It stands in for
    the DataLoader in the training and evaluation loops (``len``, ``sampler``, iteration)."""

    def __init__(self, loader: DataLoader, dataset: RawClips):
        self.loader, self.dataset, self.sampler = loader, dataset, loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        device = self.dataset.decode_device
        return prepared_ahead(self.loader, lambda parts: self.dataset.assemble(parts, device), device)


Loader = DataLoader | DecodingLoader  # what the training and evaluation loops iterate


def make_loader(dataset, cfg: RunConfig, train: bool, weighted: bool = False, rank: int = 0,
                world: int = 1) -> Loader:
    """Batches of ``dataset`` in a seeded order (``weighted``: drawn with inverse class frequency), this rank's share."""
    weights = None
    if train and weighted:
        counts = class_counts(dataset, len(cfg.model.classes))
        weights = torch.tensor(1.0 / np.maximum(counts, 1))[dataset.labels].double()
    sampler = EpochSampler(len(dataset), cfg.run.seed, shuffle=train, weights=weights, rank=rank, world=world)
    workers = cfg.runtime.num_workers()
    on_device = getattr(dataset, "decode_device", None) is not None
    pin = runtime.resolve_device(cfg.runtime.device).type == "cuda"  # pinned batches copy to the GPU in the background
    # its own generator: workers' seeds are drawn from it, not from the global RNG, which a resumed run would
    # otherwise draw from at another point than an uninterrupted one (the data's randomness has seeds of its own)
    loader = DataLoader(dataset, batch_size=cfg.optim.batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=pin,
                        collate_fn=list if on_device else None,  # on the device: a list of RawPart per batch
                        generator=torch.Generator().manual_seed(cfg.run.seed))
    return DecodingLoader(loader, dataset) if on_device else loader
