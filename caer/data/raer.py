"""The RAER data layout: annotation files, face and body boxes, and the two views of a frame.

Layout (README, "Data format"):
  annotation file  one clip per line: ``<clip_dir> <num_frames> <label>`` with 1-based labels
  face boxes JSON  ``{clip_dir: {frame_file: [left, top, right, bottom]}}``; a clip may be a video file, whose
                   frames are keyed by number (``video.frame_key``)
  body boxes JSON  ``{clip_dir: [left, top, right, bottom]}``
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..config import CropConfig
from ..files import missing
from .errors import DataError
from .video_io import VIDEO_SUFFIXES, VideoIndex, frame_key, frames_at_rate, index_video, is_video

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Clip:
    """One annotated clip: its id as written in the annotation file, 0-based label and frames.

    A frame folder's frames are its image files. A video file's are ``<video>/<frame_key(n)>`` for the frames it
    uses (all, or those ``--fps`` picks), so that ``Path(frame).name`` is the frame's box-file key either way.
    """

    video_id: str
    label: int
    frames: tuple[Path, ...]
    source: str  # "file:line" it came from, for error messages
    listed_frames: int = -1  # the annotation's num_frames column (many public datasets disagree with the disk)
    video: VideoIndex | None = None  # a video file's frame index; None for a frame folder

    @property
    def frame_count(self) -> int:
        """Frames in the folder or in the video file (with ``--fps`` a video's clip uses fewer)."""
        return self.video.count if self.video is not None else len(self.frames)


@dataclass
class BadClip:
    source: str
    video_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def list_frames(clip_dir: Path) -> list[Path]:
    """Image files of a clip directory, sorted by name (= time order), numbers by value: ``2.jpg`` before
    ``10.jpg``, as ``ffmpeg ... %d.jpg`` numbers them (zero-padded names sort as they always did).

    Hidden files (``.00001.jpg``, macOS's ``._00001.jpg``) are not frames.
    """
    return sorted(
        (p for p in clip_dir.iterdir()
         if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=_name_order)


def _name_order(path: Path) -> tuple:
    # re.split with a group alternates text and digit runs, so keys compare text with text and numbers with numbers
    parts = re.split(r"(\d+)", path.name)
    return tuple(int(part) if k % 2 else part for k, part in enumerate(parts)), path.name


def read_text(path: Path) -> str:
    """A text file's text (UTF-8, a byte-order mark dropped); a file in another encoding is a DataError naming the
    file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); save the file as UTF-8") from None


def read_lines(path: Path) -> list[str]:
    """``read_text``'s lines."""
    return read_text(path).splitlines()


def read_annotations(
    path: str | Path, root: str | Path | None, num_classes: int, skip_bad: bool = False, need_frames: bool = True,
    fps: float = 0.0,
) -> tuple[list[Clip], list[BadClip]]:
    """Parse an annotation file into clips; ``root`` defaults to the file's folder.

    Every problem raises :class:`DataError` naming ``file:line``; with ``skip_bad`` the bad
    clips are returned in the second list instead. ``need_frames=False`` (training from the
    cache) skips looking for the frame files, which may not be on this machine. A clip path may
    name a video file, which is indexed here; ``fps`` (0: all) picks its frames (``frames_at_rate``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(missing(path, "annotation file"))
    if is_video(path):
        raise DataError(f"{path}: a video, not an annotation file (a text file of lines '<clip> <frames> <label>', "
                        "each clip a video file or a frame folder)")
    root = Path(root) if root is not None else path.parent
    clips: list[Clip] = []
    bad: list[BadClip] = []
    seen: dict[str, str] = {}  # each clip's one spelling (``clip_dir_key``) -> where it was listed
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            clip = _parse_line(line, where, root, num_classes, need_frames, fps)
            if clip_dir_key(clip.video_id) in seen:
                raise DataError(f"clip {clip.video_id!r} is listed twice (first at {seen[clip_dir_key(clip.video_id)]})")
        except DataError as err:
            if not skip_bad:
                raise DataError(f"{where}: {err}") from None
            bad.append(BadClip(where, line.split()[0], str(err)))
            continue
        seen[clip_dir_key(clip.video_id)] = where
        clips.append(clip)
    if not clips:
        raise DataError(f"{path}: no usable clips ({len(bad)} bad line(s) skipped; first: {bad[0]})" if bad
                        else f"{path}: no clips listed")
    return clips, bad


def _parse_line(line: str, where: str, root: Path, num_classes: int, need_frames: bool, fps: float = 0.0) -> Clip:
    """One annotation line -> a clip (a DataError says what is wrong with it)."""
    parts = line.split()
    if len(parts) > 3:
        raise DataError(f"expected '<clip_dir> <num_frames> <label>', got {line.strip()!r}: the line has "
                        f"{len(parts)} fields instead of 3 (clip paths cannot contain spaces)")
    if len(parts) != 3:
        raise DataError(f"expected '<clip_dir> <num_frames> <label>', got {line.strip()!r}")
    video_id = parts[0]
    try:
        listed, label = int(parts[1]), int(parts[2])
    except ValueError:
        raise DataError(f"num_frames and label must be integers, got {line.strip()!r}") from None
    if listed < 0:
        raise DataError(f"num_frames must not be negative, got {listed}")
    if not 1 <= label <= num_classes:
        raise DataError(f"label {label} is outside 1..{num_classes} (labels are 1-based)")
    if Path(video_id).is_absolute() or ".." in Path(video_id).parts:
        raise DataError(f"clip path {video_id!r} must be relative to the dataset root and stay inside it")
    frames, video = clip_frames(root / video_id, fps) if need_frames else ([], None)
    return Clip(video_id, label - 1, tuple(frames), where, listed, video)


def clip_frames(path: Path, fps: float = 0.0) -> tuple[list[Path], VideoIndex | None]:
    """The frames of a clip (a video file: ``<video>/<frame_key>`` of those ``fps`` picks, and its index; a frame
    folder: its image files, and None); a DataError says what is wrong with ``path``."""
    if is_video(path):
        if not path.is_file():
            raise DataError(f"video file {path} does not exist")
        video = index_video(path)
        return [path / frame_key(n) for n in frames_at_rate(video, fps)], video
    if path.is_file():
        raise DataError(f"{path} is a file, neither a clip directory nor a video (video files end in "
                        f"{', '.join(VIDEO_SUFFIXES)})")
    if not path.is_dir():
        raise DataError(f"clip directory {path} does not exist")
    frames = list_frames(path)
    if not frames:
        videos = sorted(p.name for p in path.iterdir() if is_video(p))
        hint = f"; it holds videos: give each as a clip (e.g. {path / videos[0]})" if videos else ""
        raise DataError(f"clip directory {path} holds no image files{hint}")
    return frames, None


def check_disjoint(splits: list[list[Clip]]) -> None:
    """A clip may be listed in one split only: evaluating a training clip inflates the reported numbers."""
    seen: dict[str, Clip] = {}
    for clips in splits:
        for clip in clips:
            first = seen.setdefault(clip_dir_key(clip.video_id), clip)
            if first is not clip:
                other_label = f" with another label ({clip.label + 1} vs {first.label + 1})" if clip.label != first.label else ""
                raise DataError(f"{clip.source}: clip {clip.video_id!r} is also listed at {first.source}{other_label}; "
                                "a clip belongs to one split")


def clip_dir_key(path: str, roots: list[str] = ()) -> str:
    """The one spelling of a clip directory used for lookups: normalised and root-relative.

    Box files may key clips by the root-relative dir or by the dir joined to the root; ``roots``
    are the root's spellings to strip.
    """
    norm = os.path.normpath(path)
    for r in roots:
        if norm == r:
            return "."
        if norm.startswith(r + os.sep):
            return norm[len(r) + 1 :]
    return norm


def _roots(root: Path) -> list[str]:
    return [os.path.normpath(str(root)), os.path.normpath(os.path.abspath(root))]


def _check_box(value, where: str) -> Box:
    """A box as four floats; JSON's ``NaN`` and ``Infinity`` (which Python's json reads) are refused here."""
    numbers = isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers:
        raise DataError(f"{where}: a box must be [left, top, right, bottom] numbers, got {value!r}")
    try:
        box = tuple(float(v) for v in value)
    except OverflowError:  # an integer too large for a float
        box = (math.inf,)
    if not all(math.isfinite(v) for v in box):
        raise DataError(f"{where}: a box must be finite numbers, got {list(value)!r}")
    return box  # type: ignore[return-value]


def _load_json(path: Path):
    if not path.is_file():
        raise DataError(missing(path, "box file"))
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by clip directory")
    return data


def load_face_boxes(path: str | Path, root: str | Path) -> dict[str, dict[str, Box]]:
    """Face boxes as ``{root-relative clip dir: {frame file name: box}}``."""
    path = Path(path)
    roots = _roots(Path(root))
    boxes: dict[str, dict[str, Box]] = {}
    spelled: dict[str, str] = {}
    for key, frames in _load_json(path).items():
        if not isinstance(frames, dict):
            raise DataError(f"{path}: entry {key!r} must map frame file names to boxes")
        clip = _one_spelling(clip_dir_key(key, roots), key, spelled, path)
        boxes[clip] = {name: _check_box(box, f"{path}: {key}/{name}") for name, box in frames.items()}
    return boxes


def _one_spelling(clip: str, key: str, spelled: dict[str, str], path: Path) -> str:
    """``clip`` (a box file's ``key``, normalised), refused when another key of the file names the same clip."""
    if clip in spelled:
        raise DataError(f"{path}: the entries {spelled[clip]!r} and {key!r} name the same clip; merge them")
    spelled[clip] = key
    return clip


def load_body_boxes(path: str | Path, root: str | Path) -> dict[str, Box]:
    """Body boxes as ``{root-relative clip dir: box}``, one box per clip."""
    path = Path(path)
    roots = _roots(Path(root))
    spelled: dict[str, str] = {}
    return {_one_spelling(clip_dir_key(k, roots), k, spelled, path): _check_box(v, f"{path}: {k}")
            for k, v in _load_json(path).items()}


def clip_box(box: Box, width: int, height: int, margin: float, where: str) -> tuple[int, int, int, int]:
    """Grow ``box`` by ``margin`` pixels and clip it to the image.

    A box that overhangs the edge is normal and is clipped; one that lies wholly outside the
    image, or has no area once clipped, is an error naming ``where``.
    """
    left, top, right, bottom = box
    if right <= left or bottom <= top:
        raise DataError(f"{where}: box {list(box)} is not [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
    grown = (max(0, round(left - margin)), max(0, round(top - margin)),
             min(width, round(right + margin)), min(height, round(bottom + margin)))
    # checked before and after rounding: a box outside the image can round to one pixel on its edge, and one inside
    # by less than half a pixel to nothing
    if (min(right, width) - max(left, 0) <= 0 or min(bottom, height) - max(top, 0) <= 0
            or grown[2] <= grown[0] or grown[3] <= grown[1]):
        raise DataError(f"{where}: box {list(box)} has no area inside the {width}x{height} image")
    return grown


def letterbox(img: Image.Image) -> Image.Image:
    """Pad to a square with black, keeping the aspect ratio and centring the image."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def read_image(path: Path) -> Image.Image:
    """A frame as RGB; a file PIL cannot (or, past its size limit, will not) decode is a DataError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


@dataclass
class ViewMaker:
    """Turns a frame into its face crop and context view (SPEC section 3)."""

    face_boxes: dict[str, dict[str, Box]] = field(default_factory=dict)
    body_boxes: dict[str, Box] = field(default_factory=dict)
    margin: float = CropConfig().resolved().margin  # the declared fallback (CropConfig.margin itself is "unset")
    crop_body: bool = False

    @classmethod
    def from_config(cls, crop: CropConfig, root: str | Path) -> ViewMaker:
        """The view maker of a crop configuration, its box files read relative to ``root``."""
        if crop.crop_body and not crop.body_boxes:
            raise ValueError("--crop-body needs --body-boxes")
        return cls(
            load_face_boxes(crop.face_boxes, root) if crop.face_boxes else {},
            load_body_boxes(crop.body_boxes, root) if crop.body_boxes else {},
            crop.margin, crop.crop_body,
        )

    def has_face_boxes(self, clip: Clip) -> bool:
        return clip_dir_key(clip.video_id) in self.face_boxes

    def unknown_box_keys(self, clip: Clip) -> tuple[int, list[str]]:
        """(the number of keys in the clip's face-box entry, those that name none of its frames: a video's
        ``frame_key`` 1..count, a folder's file names)."""
        entry = self.face_boxes.get(clip_dir_key(clip.video_id), {})
        names = ({frame_key(n) for n in range(1, clip.video.count + 1)} if clip.video is not None
                 else {frame.name for frame in clip.frames})
        return len(entry), [key for key in entry if key not in names]

    def boxes_digest(self, clip: Clip) -> str:
        """SHA-256 of the boxes that shape this clip's views (recorded per clip in the cache)."""
        key = clip_dir_key(clip.video_id)
        boxes = {"face": self.face_boxes.get(key), "body": self.body_boxes.get(key) if self.crop_body else None}
        return hashlib.sha256(json.dumps(boxes, sort_keys=True).encode()).hexdigest()

    def frame_boxes(self, clip: Clip, frame: Path) -> tuple[Box | None, Box | None]:
        """(the frame's face box or None, the clip's body box with --crop-body else None); no body box is an error."""
        key = clip_dir_key(clip.video_id)
        body = None
        if self.crop_body:
            body = self.body_boxes.get(key)
            if body is None:
                raise DataError(f"{frame}: --crop-body is on but clip {clip.video_id!r} has no body box")
        return self.face_boxes.get(key, {}).get(Path(frame).name), body

    def views(self, clip: Clip, frame: Path, image: Image.Image | None = None) -> tuple[Image.Image, Image.Image, bool]:
        """(face crop, letterboxed context view, whether the frame had a face box); ``image`` is the frame already
        decoded (a video's frame), else the frame file is read."""
        box, body = self.frame_boxes(clip, frame)
        img = read_image(frame) if image is None else image
        face = img if box is None else img.crop(clip_box(box, img.width, img.height, self.margin, f"face box of {frame}"))
        context = img if body is None else img.crop(clip_box(body, img.width, img.height, 0, f"body box of {clip.video_id}"))
        return face, letterbox(context), box is not None
