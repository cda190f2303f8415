"""Video files through PyAV: a frame index read from the packets, frames picked by rate, chosen frames decoded.

Frames are numbered from 1 in presentation order, the order in which the decoder returns them. ``index_video`` reads
every packet's timestamp without decoding anything, so a frame's number, its time and the keyframe a decoder can
start from are known before any decoding: ``decode_video`` seeks past the frames it does not need, and a variable
frame rate is handled exactly (times come from the timestamps, not from a nominal rate). ``caer.data.video`` builds
the clip-level functions on top of this module.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .errors import DataError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")
REENCODE = "re-encode it with constant timestamps, e.g. `ffmpeg -i IN -c:v libx264 -crf 18 -pix_fmt yuv420p OUT.mp4`"


def is_video(path: str | Path) -> bool:
    """Whether an annotation's clip path names a video file (by its suffix; a folder is never a video)."""
    path = Path(path)
    return path.suffix.lower() in VIDEO_SUFFIXES and not path.is_dir()


def frame_key(number: int) -> str:
    """The box-file key of a video's frame ``number`` (1-based, presentation order): 5 digits or more, "00001"."""
    return f"{number:05d}"


def frame_number(frame: str | Path) -> int:
    """The number of a video frame from its path ``<video>/<frame_key>``."""
    return int(Path(frame).name)


def _reason(err: Exception) -> str:
    """FFmpeg's own words for an error, without the errno and file name PyAV adds."""
    return getattr(err, "strerror", None) or str(err)


@dataclass(frozen=True)
class VideoIndex:
    """Where each frame of a video file is: its timestamp and the keyframes decoding can start from."""

    path: Path
    pts: tuple[int, ...]  # presentation timestamps of frames 1..n, ascending, in units of ``time_base``
    keyframes: tuple[int, ...]  # numbers of the frames that decoding can start from, ascending (1 is one)
    time_base: Fraction
    width: int
    height: int

    @property
    def count(self) -> int:
        return len(self.pts)

    def times(self) -> list[Fraction]:
        """Each frame's start, in seconds from frame 1."""
        return [(p - self.pts[0]) * self.time_base for p in self.pts]

    def keyframe_before(self, number: int) -> int:
        """The last keyframe at or before frame ``number``."""
        return self.keyframes[bisect.bisect_right(self.keyframes, number) - 1]


@contextlib.contextmanager
def open_video(path: Path):
    """(container, its first video stream); a file FFmpeg cannot open, or one without video, is a DataError."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read video ({_reason(err)})") from None
    try:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream in the file")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _declared_end(stream) -> Fraction | None:
    """The video stream's duration in seconds as its header states it (None when it states none)."""
    if stream.duration and stream.time_base:
        return stream.duration * stream.time_base
    found = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", str(stream.metadata.get("DURATION", "")))  # Matroska's tag
    if found:
        hours, minutes, seconds = found.groups()
        return Fraction(int(hours) * 3600 + int(minutes) * 60) + Fraction(seconds)
    return None


def _check_complete(path: Path, stream, pts: list[int], packets: int) -> None:
    """Refuse a file whose packets end well before its header says they should (cut off: truncated)."""
    listed = stream.frames
    if listed and packets < listed:
        raise DataError(f"{path}: truncated: holds {packets} of the {listed} frames its header lists")
    declared, start = _declared_end(stream), stream.start_time if stream.start_time is not None else pts[0]
    if declared is None or len(pts) < 2:
        return
    gap = Fraction(int(np.median(np.diff(pts)))) * stream.time_base
    end = (pts[-1] - start) * stream.time_base + gap
    if end + Fraction(3, 2) * gap < declared:
        raise DataError(f"{path}: truncated: its frames end at {float(end):.3f} s, its header says {float(declared):.3f} s")


def index_video(path: str | Path) -> VideoIndex:
    """The frame index of a video file from its packets (nothing is decoded); bad files are a DataError naming it."""
    path = Path(path)
    with open_video(path) as (container, stream):
        found: list[tuple[int | None, bool]] = []
        packets = 0
        try:
            for packet in container.demux(stream):
                packets += packet.pts is not None or packet.dts is not None  # the last, empty flush packet has neither
                if packet.size:
                    found.append((packet.pts, packet.is_keyframe))
        except av.FFmpegError as err:
            raise DataError(f"{path}: frame {len(found) + 1}: damaged ({_reason(err)})") from None
        if not found:
            raise DataError(f"{path}: the video stream holds no frames")
        if any(pts is None for pts, _ in found):
            raise DataError(f"{path}: its frames carry no timestamps; {REENCODE}")
        pts = sorted(p for p, _ in found)
        if len(set(pts)) < len(pts):
            raise DataError(f"{path}: two frames share a timestamp; {REENCODE}")
        _check_complete(path, stream, pts, packets)
        number = {p: n for n, p in enumerate(pts, start=1)}
        keyframes = sorted({1} | {number[p] for p, key in found if key})
        return VideoIndex(path, tuple(pts), tuple(keyframes), Fraction(stream.time_base), stream.width, stream.height)


def frames_at_rate(index: VideoIndex, fps: float) -> list[int]:
    """Numbers of the frames kept when resampling to ``fps`` frames/s (0: every frame).

    At each time k / fps (k = 0, 1, ...; seconds from frame 1, up to frame n's start) the frame on screen is kept:
    the last frame that starts at or before that time. A frame is kept once, so an ``fps`` above the video's own
    rate keeps every frame. Times come from the timestamps, so a variable frame rate is resampled exactly.
    """
    if not fps:
        return list(range(1, index.count + 1))
    step = 1 / Fraction(str(fps))  # str: 29.97 means 2997/100, not its binary approximation
    times = index.times()
    picked, k = [], 0
    while k * step <= times[-1]:
        shown = bisect.bisect_right(times, k * step)  # frames 1..shown start at or before k * step
        picked.append(shown)
        if shown == len(times):
            break
        k = max(k + 1, math.ceil(times[shown] / step))  # the first time at which frame shown + 1 is on screen
    return picked


def _decoded(container, stream, index: VideoIndex, number_of: dict[int, int]) -> Iterator[tuple[int, av.VideoFrame]]:
    """(number, frame) for each frame decoded from the container's current position; errors name the frame."""
    frames, last = container.decode(stream), 0
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.FFmpegError as err:
            raise DataError(f"{index.path}: frame {last + 1}: cannot decode ({_reason(err)})") from None
        last = number_of.get(frame.pts, -1)
        if last < 0:
            raise DataError(f"{index.path}: a decoded frame has timestamp {frame.pts}, which no packet of the file "
                            "lists (the file is damaged)")
        yield last, frame


def _seek(container, stream, index: VideoIndex, number: int) -> None:
    try:
        container.seek(index.pts[number - 1], stream=stream, backward=True, any_frame=False)
    except av.FFmpegError as err:
        raise DataError(f"{index.path}: frame {number}: cannot seek there ({_reason(err)})") from None


def _take(frames: Iterator[tuple[int, av.VideoFrame]], index: VideoIndex, number: int) -> av.VideoFrame:
    """Frame ``number`` from the decoder's next frames (the earlier ones are dropped)."""
    for got, frame in frames:
        if got == number:
            return frame
        if got > number:
            raise DataError(f"{index.path}: frame {number}: the decoder skipped it (the file is damaged)")
    raise DataError(f"{index.path}: frame {number}: the video ends before it (truncated or damaged)")


def decode_video(index: VideoIndex, numbers: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(number, RGB uint8 [H, W, 3]) for frames ``numbers`` of an indexed video, in ascending order.

    Decoding goes on from the last frame decoded, or seeks to the keyframe before the next wanted frame when that
    skips frames; asking for every frame is one pass. A frame that cannot be decoded is a DataError naming it.
    """
    wanted = sorted(set(numbers))
    if wanted and not 1 <= wanted[0] <= wanted[-1] <= index.count:
        raise DataError(f"{index.path}: frames {wanted[0]}..{wanted[-1]} asked for; the video has 1..{index.count}")
    number_of = {p: n for n, p in enumerate(index.pts, start=1)}
    with open_video(index.path) as (container, stream):
        frames, last = None, 0
        for number in wanted:
            start = index.keyframe_before(number)
            if frames is None or start > last + 1:
                if start > 1 or frames is not None:
                    _seek(container, stream, index, start)
                frames = _decoded(container, stream, index, number_of)
            frame = _take(frames, index, number)
            last = number
            try:
                rgb = frame.to_ndarray(format="rgb24")
            except av.FFmpegError as err:
                raise DataError(f"{index.path}: frame {number}: cannot convert to RGB ({_reason(err)})") from None
            yield number, rgb
