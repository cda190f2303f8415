"""Training and evaluation inputs: TSN frame sampling over cached features or raw frames.

Sampling (SPEC section 7): T segments, one random frame per segment when training and the middle
frame of each segment when evaluating; clips shorter than T repeat their last frame. All
randomness of an item comes from (seed, epoch, clip index), so the data order and the sampled
frames are the same with any number of workers and after ``--resume``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from ..cache import FeatureCache
from ..model.encoder import Preprocess
from ..runtime import to_device
from .raer import Clip, DataError, ViewMaker
from .tensor_views import TensorViews
from .video import clip_images


class RawPart(NamedTuple):
    """One raw clip as a worker reads it for decoding on a device: ``inputs`` (``TensorViews.read``: bytes and
    boxes of the sampled frames, each file once), ``order`` (which of them make the T frames), the rotation angle
    (stage 3), and the item's flip, label and index."""

    inputs: dict
    order: list[int]
    angle: float
    flip: bool
    label: int
    index: int


class Batch(NamedTuple):
    """Clips for the model, with the same fields from the cache and from raw frames (one item, or collated).

    ``face``, ``context``: cached features [B, T, D] float16, or frames [B, T, 3, S, S] uint8;
    ``flip``: mirror the frames (raw frames only: a cached item's view is chosen when it is read);
    ``label``: 0-based class; ``index``: the item's index in its dataset.
    """

    face: torch.Tensor
    context: torch.Tensor
    flip: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return self._replace(face=self.face.to(device, non_blocking=True),
                             context=self.context.to(device, non_blocking=True),
                             flip=to_device(self.flip, device), label=to_device(self.label, device))


def sample_indices(num_frames: int, segments: int, train: bool, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of the T frames to use (TSN style)."""
    if num_frames <= segments:
        return np.minimum(np.arange(segments), num_frames - 1)
    edges = np.linspace(0, num_frames, segments + 1).astype(np.int64)
    lo, hi = edges[:-1], edges[1:]
    if train:
        return rng.integers(lo, hi)
    return lo + (hi - lo) // 2


class EpochSampler(Sampler):
    """Yields ``(index, epoch)``: a seeded shuffle (or class-weighted draw) that depends only on seed and epoch.

    Under DDP each of ``world`` ranks takes every ``world``-th item of the same order, padded by
    wrapping around so that all ranks run the same number of steps.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, weights: torch.Tensor | None = None,
                 rank: int = 0, world: int = 1):
        self.size, self.seed, self.shuffle, self.weights = size, seed, shuffle, weights
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def own_items(self, rank: int) -> int:
        """How many of ``rank``'s items come first in the order; the rest only repeat it to even out the ranks."""
        return max(0, -(-(self.size - rank) // self.world))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        order = order.tolist()
        # every rank the same number of items (DDP steps together): the order repeated, even past itself when there
        # are fewer clips than processes
        order = (order * -(-len(self) * self.world // max(len(order), 1)))[: len(self) * self.world]
        return iter([(i, self.epoch) for i in order[self.rank :: self.world]])


class _Clips(Dataset):
    """Shared by both sources: which frames and which view an item uses.

    ``eval_view`` is the view used when not training (1 = the mirror image, for flip TTA).
    """

    def __init__(self, video_ids: list[str], labels: list[int], segments: int, train: bool, views: int, seed: int,
                 eval_view: int = 0):
        self.video_ids, self.labels = video_ids, labels
        self.segments, self.train, self.views, self.seed = segments, train, views, seed
        self.eval_view = eval_view
        self.left_out: list[str] = []  # clips of the split that extraction skipped (see data.loaders.split_clips)

    def __len__(self) -> int:
        return len(self.video_ids)

    def _choose(self, key: tuple[int, int], num_frames: int) -> tuple[np.ndarray, int]:
        """Frame indices and view for item ``key = (index, epoch)``."""
        index, epoch = key
        rng = np.random.default_rng([self.seed, epoch, index])
        frames = sample_indices(num_frames, self.segments, self.train, rng)
        view = int(rng.integers(self.views)) if self.train and self.views > 1 else self.eval_view
        return frames, view


class CachedClips(_Clips):
    """Items ``Batch(face [T, D] float16, context [T, D] float16, ...)`` read from the feature cache."""

    def __init__(self, cache: FeatureCache, video_ids, labels, segments, train, seed=0, eval_view: int = 0):
        super().__init__(video_ids, labels, segments, train, cache.views, seed, eval_view)
        self.cache = cache

    def __getitem__(self, key):
        index = key[0]
        feats = self.cache.clip(self.video_ids[index])  # [2, views, frames, D]
        frames, view = self._choose(key, feats.shape[2])
        chosen = torch.from_numpy(feats[:, view, frames])
        return Batch(chosen[0], chosen[1], False, self.labels[index], index)


class RawClips(_Clips):
    """Items ``Batch(face [T, 3, S, S] uint8, context [T, 3, S, S] uint8, flip, ...)`` decoded from frame files.

    The same frames and views as ``CachedClips`` for the same key; ``flip`` = view 1, the mirror image. With
    ``tensor_views`` (``--decode tensor``) the workers decode and cut frames with tensor operations on the CPU; with
    ``decode_device`` too, they only read each clip's bytes and boxes (a ``RawPart``), and ``assemble`` decodes and
    cuts a batch of them on that device (``loaders.make_loader`` does it in a thread ahead of the consumer).
    """

    def __init__(self, clips: list[Clip], view_maker: ViewMaker, preprocess: Preprocess, segments, train,
                 views: int = 1, frame_stride: int = 1, seed=0, rotate: float = 0.0, eval_view: int = 0,
                 tensor_views: TensorViews | None = None, decode_device: torch.device | None = None):
        super().__init__([c.video_id for c in clips], [c.label for c in clips], segments, train, views, seed, eval_view)
        self.clips, self.view_maker, self.preprocess, self.stride = clips, view_maker, preprocess, frame_stride
        self.rotate = rotate  # stage-3 augmentation: one random angle in [-rotate, rotate] degrees per clip
        self.tensor_views = tensor_views
        self.decode_device = decode_device if tensor_views is not None else None

    def __getitem__(self, key):
        index = key[0]
        clip = self.clips[index]
        files = clip.frames[:: self.stride]
        frames, view = self._choose(key, len(files))
        angle = float(np.random.default_rng([self.seed, key[1], index, 1]).uniform(-self.rotate, self.rotate)) if self.rotate else 0.0
        used = sorted(set(frames.tolist()))  # each sampled file is decoded once
        order = [used.index(i) for i in frames.tolist()]
        used_files = [files[i] for i in used]
        if self.tensor_views is None:
            pixels = self._pil_views(clip, used_files, angle)[order]  # [T, 2, 3, S, S]
            return Batch(pixels[:, 0], pixels[:, 1], bool(view), self.labels[index], index)
        part = RawPart(self.tensor_views.read(clip, used_files), order, angle, bool(view), self.labels[index], index)
        if self.decode_device is not None:
            return part
        return self._finish(part, self.tensor_views.pixels(part.inputs, "cpu"))

    def assemble(self, parts: list[RawPart], device: torch.device) -> Batch:
        """A batch of what the workers read (``decode_device`` set), decoded (in one call) and cut on ``device``."""
        pixels = self.tensor_views.pixels_of([part.inputs for part in parts], device)
        items = [self._finish(part, views) for part, views in zip(parts, pixels)]
        return Batch(torch.stack([b.face for b in items]), torch.stack([b.context for b in items]),
                     to_device([b.flip for b in items], device), to_device([b.label for b in items], device),
                     torch.tensor([b.index for b in items]))

    def _finish(self, part: RawPart, pixels: torch.Tensor) -> Batch:
        """One item from the ``pixels`` of its frames (``TensorViews.pixels``): the sampled frames' views, rotated
        by the clip's angle."""
        if part.angle:  # PIL rotates the crops before the resize; here the finished views turn (an augmentation)
            turned = v2.functional.rotate(pixels.flatten(0, 1), part.angle, v2.InterpolationMode.BILINEAR)
            pixels = turned.view_as(pixels)
        pixels = pixels[to_device(part.order, pixels.device)]
        return Batch(pixels[:, 0], pixels[:, 1], part.flip, part.label, part.index)

    def _pil_views(self, clip: Clip, files: list, angle: float) -> torch.Tensor:
        """uint8 [len(files), 2 (face, context), 3, S, S] with PIL, rotated by ``angle`` degrees."""
        out = []
        for frame, image in clip_images(clip, files):  # a video's frames: decoded with seeks past the others
            views = self.view_maker.views(clip, frame, image)[:2]
            if angle:
                views = [v.rotate(angle, resample=Image.BICUBIC) for v in views]
            out.append(torch.stack([self.preprocess.to_uint8(v) for v in views]))
        return torch.stack(out)


class ClipFrames(Dataset):
    """Extraction's items: every frame of one clip, ``{"pixels": uint8 [frames, 2 (face, context), 3, S, S]}``.

    With ``tensor_views`` the frames are decoded and cut with tensor operations; with ``defer`` too, the item carries
    ``{"inputs": ...}`` (the frames' bytes and boxes) instead of pixels, for the main process to decode on the encoder's
    device (``TensorViews.pixels``). Bad input does not raise across the worker-process boundary: the item carries
    the error instead.
    """

    def __init__(self, clips: list[Clip], view_maker: ViewMaker, preprocess: Preprocess, frame_stride: int,
                 tensor_views: TensorViews | None = None, defer: bool = False):
        self.clips, self.view_maker, self.preprocess, self.stride = clips, view_maker, preprocess, frame_stride
        self.tensor_views, self.defer = tensor_views, defer

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        clip = self.clips[i]
        frames = clip.frames[:: self.stride]
        item = {"index": i, "frame_names": [f.name for f in frames]}
        try:
            if self.tensor_views is None:
                return item | self._pil_pixels(clip, frames)
            inputs = self.tensor_views.read(clip, list(frames))
            item["no_face"] = sum(box is None for box in inputs["faces"])
            if self.defer:
                return item | {"inputs": inputs}
            return item | {"pixels": self.tensor_views.pixels(inputs, "cpu")}
        except DataError as err:
            return {"index": i, "error": str(err)}

    def _pil_pixels(self, clip: Clip, frames) -> dict:
        pixels, no_face = [], 0
        for frame, image in clip_images(clip, frames):
            face, context, has_box = self.view_maker.views(clip, frame, image)
            no_face += not has_box
            pixels.append(torch.stack([self.preprocess.to_uint8(face), self.preprocess.to_uint8(context)]))
        return {"pixels": torch.stack(pixels), "no_face": no_face}
