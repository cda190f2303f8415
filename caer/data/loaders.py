"""From a run config to data loaders: the cache (or raw frames) of a split, with TSN sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..cache import CacheError, FeatureCache
from ..config import RunConfig, Source
from ..model.encoder import Preprocess
from .datasets import CachedClips, EpochSampler, RawClips
from .raer import Clip, ViewMaker, check_disjoint, read_annotations


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


def with_cache_geometry(cfg: RunConfig, cache: FeatureCache | None) -> RunConfig:
    """The run config with one crop geometry for everything: the cache's margin, crop-body and frame stride (a
    flag that contradicts them is refused) and, unless given, its box files and root; without a cache, the
    flags' or the declared fallbacks."""
    if cache is None:
        return dataclasses.replace(cfg, crop=cfg.crop.resolved())
    return dataclasses.replace(cfg, crop=cfg.crop.resolved(cache.fingerprint, cache.inputs, where=str(cache.path)))


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


def split_dataset(cfg: RunConfig, split: str, train: bool, preprocess: Preprocess, cache: FeatureCache | None,
                  source: Source, augment: bool = False, eval_view: int = 0) -> CachedClips | RawClips:
    """The dataset of one split ("train", "val" or "test") from the cache or from raw frames.

    ``augment`` (stage 3) draws a random flip and rotation per clip; ``eval_view`` 1 evaluates on the
    mirror image (flip TTA).
    """
    cfg = with_cache_geometry(cfg, cache)
    list_path = cfg.list_for(split)
    num_classes, segments, seed = len(cfg.model.classes), cfg.model.num_frames, cfg.run.seed
    if source == Source.cache:
        clips, _ = read_annotations(list_path, cfg.crop.root, num_classes, need_frames=False)
        missing = [c.video_id for c in clips if c.video_id not in cache]
        if missing:
            raise CacheError(
                f"{cache.path}: {len(missing)} clip(s) of {list_path} are not in the cache (first: {missing[0]!r}); "
                f"run caer extract on {list_path}"
            )
        return CachedClips(cache, [c.video_id for c in clips], [c.label for c in clips], segments, train, seed, eval_view)
    if not cfg.crop.face_boxes:
        raise ValueError("--source raw needs --face-boxes (or a cache that records them)")
    root = cfg.crop.root or str(Path(list_path).parent)
    clips, _ = read_annotations(list_path, root, num_classes)
    view_maker = ViewMaker.from_config(cfg.crop, root)
    if cache is not None:
        check_boxes_match(cache, view_maker, clips)
    # training on raw frames picks a random view per clip: the cache's views, or (stage 3) always a random flip
    views = 2 if augment else (cache.views if cache is not None else 1)
    return RawClips(clips, view_maker, preprocess, segments, train, views=views, frame_stride=cfg.crop.frame_stride, seed=seed,
                    rotate=cfg.stages.rotate_degrees if augment else 0.0, eval_view=eval_view)


def check_splits_disjoint(cfg: RunConfig) -> None:
    """Refuse a clip listed in two of the run's splits (naming both places)."""
    lists = [p for p in (cfg.data.train_list, cfg.data.val_list, cfg.data.test_list) if p]
    check_disjoint([read_annotations(p, cfg.crop.root, len(cfg.model.classes), need_frames=False)[0] for p in lists])


def class_counts(dataset: CachedClips | RawClips, num_classes: int) -> np.ndarray:
    return np.bincount(dataset.labels, minlength=num_classes)


def make_loader(dataset, cfg: RunConfig, train: bool, weighted: bool = False, rank: int = 0, world: int = 1) -> DataLoader:
    """Batches of ``dataset`` in a seeded order (``weighted``: drawn with inverse class frequency), this rank's share."""
    weights = None
    if train and weighted:
        counts = class_counts(dataset, len(cfg.model.classes))
        weights = torch.tensor(1.0 / np.maximum(counts, 1))[dataset.labels].double()
    sampler = EpochSampler(len(dataset), cfg.run.seed, shuffle=train, weights=weights, rank=rank, world=world)
    workers = cfg.runtime.num_workers()
    return DataLoader(dataset, batch_size=cfg.optim.batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
