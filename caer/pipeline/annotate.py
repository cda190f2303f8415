"""Videos written with PyAV: the labelled copy of an input (``caer predict --annotate``), and the demo's clip.

Annotated copies are H.264 (yuv420p, CRF 18), which every player reads; 4:2:0 needs even sides, so a frame with an
odd side gains one black row or column. ``lossless`` writes H.264 in RGB at CRF 0 (``libx264rgb``): its decoded
frames are the written pixels exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.raer import Box, Clip
from ..data.video import clip_images, frame_key
from ..files import replaced_atomically

# the container of each suffix we write: named to PyAV, as the temporary file being written has none of these
CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov"}
ANNOTATE_SUFFIXES = tuple(CONTAINERS)
FOLDER_RATE = 25  # frames/s of the copy of a frame folder, whose frames carry no times
# one colour per person (1, 2, ...): high contrast, distinguishable by most colour-blind viewers
COLOURS = ((255, 190, 0), (0, 200, 255), (255, 90, 160), (120, 230, 80), (200, 130, 255), (255, 255, 255))


def write_video(path: str | Path, images: Iterable[tuple[Image.Image, int]], rate: Fraction,
                time_base: Fraction | None = None, lossless: bool = False) -> int:
    """Write RGB ``images`` with their presentation times (``pts`` in ``time_base``, default 1 / ``rate``) as a
    video (.mp4, .mkv or .mov); returns the number of frames written. The file appears at ``path`` only once it is
    complete: a failure or a Ctrl-C part-way leaves any earlier file there as it was, and no partial one."""
    path = Path(path)
    container = CONTAINERS.get(path.suffix.lower())
    if container is None:
        raise ValueError(f"{path}: give a {', '.join(CONTAINERS)} file to write")
    with replaced_atomically(path) as temp:
        return _encode(temp, container, images, rate, time_base or 1 / Fraction(rate), lossless)


def _encode(path: Path, container: str, images: Iterable[tuple[Image.Image, int]], rate: Fraction,
            time_base: Fraction, lossless: bool) -> int:
    """Encode ``images`` into ``path``, a ``container`` file (H.264: see the module's docstring)."""
    written = 0
    with av.open(str(path), "w", format=container) as out:
        stream = None
        for image, pts in images:
            if stream is None:
                stream = out.add_stream("libx264rgb" if lossless else "libx264", rate=rate,
                                        options={"crf": "0" if lossless else "18"})
                even = not lossless  # 4:2:0 chroma needs even sides
                stream.width, stream.height = (image.width + image.width % 2, image.height + image.height % 2) if even \
                    else image.size
                stream.pix_fmt, stream.time_base = ("rgb24" if lossless else "yuv420p"), time_base
            if image.size != (stream.width, stream.height):
                canvas = Image.new("RGB", (stream.width, stream.height))
                canvas.paste(image, (0, 0))
                image = canvas
            frame = av.VideoFrame.from_ndarray(np.asarray(image.convert("RGB")), format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            out.mux(stream.encode(frame))
            written += 1
        if stream is not None:
            out.mux(stream.encode())
    return written


@functools.cache
def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except (TypeError, ImportError, OSError):  # a Pillow without FreeType has only its small bitmap font
        return ImageFont.load_default()


def draw_people(image: Image.Image, people: list[tuple[int, Box, str]]) -> Image.Image:
    """``image`` with each (person number, face box, text) drawn: the box outlined in the person's colour, the text
    on a band of that colour above it (below it at the top edge)."""
    draw = ImageDraw.Draw(image)
    font, line = _font(max(10, image.height // 25)), max(1, image.height // 200)
    for number, box, text in people:
        colour = COLOURS[(number - 1) % len(COLOURS)]
        left, top, right, bottom = box
        draw.rectangle((left, top, right, bottom), outline=colour, width=line)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        height = y1 - y0 + 4
        y = top - height - line if top - height - line >= 0 else bottom + line
        x = max(0, min(left, image.width - (x1 - x0 + 4)))  # the band stays inside the frame where it fits
        draw.rectangle((x, y, x + x1 - x0 + 4, y + height), fill=colour)
        draw.text((x + 2 - x0, y + 2 - y0), text, fill=(0, 0, 0), font=font)
    return image


def every_frame(clip: Clip) -> tuple[list[Path], list[int], Fraction, Fraction]:
    """All frames of an input (a video's, not only those its ``--fps`` keeps), their pts, the rate and time base."""
    if clip.video is None:
        return list(clip.frames), list(range(len(clip.frames))), Fraction(FOLDER_RATE), Fraction(1, FOLDER_RATE)
    index = clip.video
    frames = [Path(clip.video_id) / frame_key(n) for n in range(1, index.count + 1)]
    seconds = index.times()[-1]
    rate = (Fraction(index.count - 1) / seconds).limit_denominator(1001) if seconds > 0 else Fraction(FOLDER_RATE)
    return frames, [p - index.pts[0] for p in index.pts], rate, index.time_base


def write_annotated(path: Path, clip: Clip, used: list[Path], labels: list[dict[int, tuple[Box, str]]]) -> int:
    """A copy of every frame of ``clip`` with each person's face boxed and labelled: ``labels`` holds, per person,
    {position in ``used``: (box, text)}. A frame that the checkpoint skips (its --fps or --frame-stride) shows the
    boxes of the last frame it uses before it. Returns the number of frames written."""
    frames, pts, rate, time_base = every_frame(clip)
    position = {frame: i for i, frame in enumerate(used)}

    def drawn() -> Iterator[tuple[Image.Image, int]]:
        current = -1
        for k, (frame, image) in enumerate(clip_images(clip, frames)):
            current = position.get(frame, current)
            people = [(n, *person[current]) for n, person in enumerate(labels, start=1) if current in person]
            yield draw_people(image, people), pts[k]

    return write_video(path, drawn(), rate, time_base)
