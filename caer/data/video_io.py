"""Video files through PyAV: a frame index read from the packets, frames picked by rate, chosen frames decoded.

Frames are numbered from 1 in presentation order, as a player shows them: packets that the file marks as never
shown (the lead-in that an MP4 edit list hides, as in clips cut with ``ffmpeg -ss T -i IN -c copy OUT``) get no
number. ``index_video`` reads every packet's timestamp and decodes only the first frame (for its display rotation),
so a frame's number, its time and the keyframe a decoder can start from are known before any decoding:
``decode_video`` seeks past the frames it does not need, and a variable frame rate is handled exactly (times come
from the timestamps, not from a nominal rate). Frames are turned as the file's display matrix says, as ffmpeg's
player does. ``caer.data.video`` builds the clip-level functions on top of this module.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

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


class Orientation(NamedTuple):
    """How a decoded frame is turned for display: transposed, then its rows and/or its columns reversed."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` ([H, W, C]) as displayed."""
        if not any(self):
            return rgb
        if self.transpose:
            rgb = rgb.transpose(1, 0, 2)
        if self.flip_rows:
            rgb = rgb[::-1]
        if self.flip_cols:
            rgb = rgb[:, ::-1]
        return np.ascontiguousarray(rgb)


def orientation(matrix: Sequence[int] | None) -> Orientation:
    """The turn a 3x3 display matrix (row-major, FFmpeg's and QuickTime's layout) asks for; None: as decoded.

    The matrix maps a stored pixel (x, y) to (a x + c y, b x + d y) on screen (y pointing down), so phones' portrait
    matrix (a, b, c, d) = (0, 1, -1, 0) is a quarter turn clockwise, as ffmpeg's player shows it. A mirrored matrix
    is mirrored the same way; any other angle is taken to the nearest quarter turn.
    """
    if matrix is None:
        return Orientation()
    a, b, c, d = (int(matrix[i]) for i in (0, 1, 3, 4))
    if abs(a) + abs(d) >= abs(b) + abs(c):
        return Orientation(False, d < 0, a < 0)
    return Orientation(True, b < 0, c < 0)  # screen row from the stored column (b x), screen column from the row (c y)


def _frame_orientation(frame: av.VideoFrame) -> Orientation:
    """The orientation of a decoded frame, from its display-matrix side data."""
    side = getattr(frame, "side_data", None)
    data = side.get("DISPLAYMATRIX") if side is not None else None
    return orientation(np.frombuffer(bytes(data), dtype=np.int32) if data is not None else None)


@dataclass(frozen=True)
class VideoIndex:
    """Where each frame of a video file is: its timestamp and the keyframes decoding can start from."""

    path: Path
    pts: tuple[int, ...]  # presentation timestamps of frames 1..n, ascending, in units of ``time_base``
    keyframes: tuple[int, ...]  # frames that decoding can start from, ascending; 1 is one: decoding from the file's start
    time_base: Fraction
    width: int  # as displayed (after ``orient``)
    height: int
    orient: Orientation = Orientation()  # how decoded frames are turned for display
    hidden: frozenset[int] = frozenset()  # timestamps of packets the file never shows (an edit list's lead-in)

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


def _declared_end(stream, start: int) -> Fraction | None:
    """When the video stream ends, in seconds, as its header states it (None when it states nothing)."""
    if stream.duration and stream.time_base:
        return (start + stream.duration) * stream.time_base
    found = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", str(stream.metadata.get("DURATION", "")))  # Matroska's tag
    if found:  # FFmpeg writes when the track ends, not its length: no start to add (a length is only smaller)
        hours, minutes, seconds = found.groups()
        return Fraction(int(hours) * 3600 + int(minutes) * 60) + Fraction(seconds)
    return None


def _listed_frames(stream) -> int:
    """How many packets the header lists (0: it does not say): its frame count, or fewer where the demuxer's index
    holds fewer (it drops unread the lead-in of an MP4 edit list that decoding does not need)."""
    entries = len(getattr(stream, "index_entries", None) or ())
    return min(stream.frames, entries) if stream.frames and entries else stream.frames


def _check_complete(path: Path, stream, pts: list[int], last_duration: int, packets: tuple[int, int]) -> None:
    """Refuse a file whose packets end well before its header says they should (cut off: truncated).

    ``packets``: (how many were read, how many the header lists). The last frame lasts as long as its packet says
    (a still at the end of a variable-rate video may last seconds), or, when it does not say, the median gap.
    """
    packets, listed = packets
    if listed and packets < listed:
        raise DataError(f"{path}: truncated: holds {packets} of the {listed} frames its header lists")
    start = stream.start_time if stream.start_time is not None else pts[0]
    declared = _declared_end(stream, start)
    if declared is None or len(pts) < 2:
        return
    gap = int(np.median(np.diff(pts)))
    end = pts[-1] + (last_duration if last_duration > 0 else gap)
    if (end + Fraction(3, 2) * gap) * stream.time_base < declared:
        ends, says = (end - start) * stream.time_base, declared - start * stream.time_base
        raise DataError(f"{path}: truncated: its frames end at {float(ends):.3f} s, its header says {float(says):.3f} s")


def _first_orientation(stream, packet) -> Orientation | None:
    """The orientation of the first frame the decoder gives for ``packet`` (None: it gave none yet)."""
    try:
        frames = stream.decode(packet)
    except av.FFmpegError:
        return Orientation()  # decode_video names the frame that cannot be decoded
    return _frame_orientation(frames[0]) if frames else None


def _scan(path: Path, container, stream) -> tuple[list[tuple[int | None, bool, bool, int]], int, Orientation]:
    """(pts, keyframe, never shown, duration) of each packet with data, the number of packets, and the orientation
    of the first frame (only packets up to it are decoded)."""
    found: list[tuple[int | None, bool, bool, int]] = []
    packets, orient = 0, None
    try:
        for packet in container.demux(stream):
            packets += packet.pts is not None or packet.dts is not None  # the last, empty flush packet has neither
            if packet.size:
                found.append((packet.pts, packet.is_keyframe, packet.is_discard, packet.duration or 0))
            if orient is None:
                orient = _first_orientation(stream, packet)
    except av.FFmpegError as err:
        shown = sum(not hidden for _, _, hidden, _ in found)  # the frames a player shows: no edit-list lead-in
        raise DataError(f"{path}: frame {shown + 1}: damaged ({_reason(err)})") from None
    return found, packets, orient or Orientation()


def index_video(path: str | Path) -> VideoIndex:
    """The frame index of a video file from its packets (only the first frame is decoded); bad files are a
    DataError naming it."""
    path = Path(path)
    with open_video(path) as (container, stream):
        listed = _listed_frames(stream)
        found, packets, orient = _scan(path, container, stream)
        shown = [(pts, key, duration) for pts, key, hidden, duration in found if not hidden]
        if not shown:
            raise DataError(f"{path}: the video stream holds no frames")
        if any(pts is None for pts, *_ in found):
            raise DataError(f"{path}: its frames carry no timestamps; {REENCODE}")
        pts = sorted(p for p, _, _ in shown)
        if len(set(pts)) < len(pts):
            raise DataError(f"{path}: two frames share a timestamp; {REENCODE}")
        _check_complete(path, stream, pts, max(shown, key=lambda s: s[0])[2], (packets, listed))
        number = {p: n for n, p in enumerate(pts, start=1)}
        keyframes = sorted({1} | {number[p] for p, key, _ in shown if key})
        hidden = frozenset(p for p, _, never, _ in found if never)
        size = (stream.height, stream.width) if orient.transpose else (stream.width, stream.height)
        return VideoIndex(path, tuple(pts), tuple(keyframes), Fraction(stream.time_base), *size, orient, hidden)


def frames_at_rate(index: VideoIndex, fps: float) -> list[int]:
    """Numbers of the frames kept when resampling to ``fps`` frames/s (0: every frame).

    At each time k / fps (k = 0, 1, ...; seconds from frame 1, up to frame n's start) the frame on screen is kept:
    the last frame that starts at or before that time. A frame is kept once, so an ``fps`` above the video's own
    rate keeps every frame. Times come from the timestamps, so a variable frame rate is resampled exactly. Each time
    k / fps is rounded to the file's time base first, as the frames' own times were: in whole milliseconds
    (Matroska), 30 frames/s at 15 keeps frames 1, 3, 5, ... although frame 3 starts at 67 ms, after 1/15 s.
    """
    if not fps:
        return list(range(1, index.count + 1))
    step = 1 / Fraction(str(fps)) / index.time_base  # str: 29.97 means 2997/100, not its binary approximation
    starts = [p - index.pts[0] for p in index.pts]

    def tick(k: int) -> int:  # time k / fps in units of the time base, to the nearest
        return math.floor(k * step + Fraction(1, 2))

    picked, k = [], 0
    while tick(k) <= starts[-1]:
        shown = bisect.bisect_right(starts, tick(k))  # frames 1..shown start at or before tick k
        picked.append(shown)
        if shown == len(starts):
            break
        k = max(k + 1, math.ceil((starts[shown] - Fraction(1, 2)) / step))  # the first tick with frame shown + 1 on
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
        if frame.pts in index.hidden:  # a decoder that outputs what the file never shows
            continue
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
    """(number, RGB uint8 [H, W, 3], as displayed) for frames ``numbers`` of an indexed video, in ascending order.

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
                rgb = index.orient.apply(frame.to_ndarray(format="rgb24"))
            except av.FFmpegError as err:
                raise DataError(f"{index.path}: frame {number}: cannot convert to RGB ({_reason(err)})") from None
            yield number, rgb
