"""Clips that are video files, wherever frame folders are accepted (README, "Data format").

A video's frames are numbered from 1 in presentation order, and a box file keys frame ``n`` as ``frame_key(n)``
("00001"); a clip holds them as paths ``<video>/<key>`` (see ``raer.Clip``), so every rule of the frame-folder
format (box lookups, crops, missing boxes) carries over. Decoding is PyAV's (``video_io``); frames come turned as
a player shows them (the file's display matrix).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .raer import Clip, read_image
from .video_io import VIDEO_SUFFIXES, VideoIndex, decode_video, frame_key, frame_number, frames_at_rate, index_video, is_video

__all__ = ["VIDEO_SUFFIXES", "VideoIndex", "clip_arrays", "clip_images", "frame_key", "frame_number", "frames_at_rate",
           "index_video", "is_video", "iter_clip_images"]


def clip_arrays(clip: Clip, frames: Sequence[Path]) -> Iterator[tuple[Path, np.ndarray]]:
    """(frame, RGB uint8 [H, W, 3]) for ``frames`` (ascending) of a video clip, decoded in one pass that seeks past
    the frames not asked for."""
    if clip.video is None:
        raise ValueError(f"{clip.video_id} is not an indexed video clip")
    by_number = {frame_number(f): Path(f) for f in frames}
    for number, rgb in decode_video(clip.video, by_number):
        yield by_number[number], rgb


def clip_images(clip: Clip, frames: Sequence[Path]) -> Iterator[tuple[Path, Image.Image]]:
    """(frame, RGB image) for ``frames`` of ``clip``, in order (ascending for a video): the folder's files, read
    one at a time, or the video's frames, decoded as ``clip_arrays`` does."""
    if clip.video is None:
        for frame in frames:
            yield Path(frame), read_image(frame)
        return
    for frame, rgb in clip_arrays(clip, frames):
        yield frame, Image.fromarray(rgb)


def iter_clip_images(clip: Clip) -> Iterator[tuple[str, Image.Image]]:
    """(box-file key, RGB image) of every frame of ``clip`` in time order: a folder's file names, or a video's
    ``frame_key`` numbers decoded in one pass. Bad input is a DataError naming the file (and frame)."""
    for frame, image in clip_images(clip, clip.frames):
        yield frame.name, image
