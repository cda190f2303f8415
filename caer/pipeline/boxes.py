"""``caer boxes``: face (and body) boxes for clips that have none, in the RAER box-file format.

Every frame of every clip goes through the face detector (``--workers`` processes, or this one); each clip's
detections are linked into tracks and its person's face track becomes its face boxes, and a body box derived
from it (``caer.data.faces``). Both files are written at the end, each atomically.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..config import BoxesConfig
from ..data.errors import DataError
from ..data.faces import PersonBoxes, clip_person, detect_in_worker, detector_pool, make_detector
from ..data.raer import Box, Clip, clip_frames, read_annotations
from ..data.video import is_video, iter_clip_images
from ..files import check_outputs, write_atomically
from .display import progress_bar


@dataclass
class BoxesSummary:
    """What `caer boxes` found: clips and frames read, faces found, the clips without one, the files written."""

    detector: str
    clips: int = 0
    frames: int = 0
    frames_detected: int = 0  # frames where the detector found the clip's person
    frames_filled: int = 0  # frames whose box was interpolated across a short gap
    faceless: list[str] = field(default_factory=list)  # the clips where no face was found at all
    faces: int = 0  # every face found, the clip's person or not
    most_faces: int = 0  # in one frame
    tracks: int = 0
    seconds: float = 0.0
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # with --skip-bad: the clips left out, each with its reason

    @property
    def frames_without_face(self) -> int:
        return self.frames - self.frames_detected - self.frames_filled

    def add(self, video_id: str, person: PersonBoxes, detections: list[np.ndarray]) -> None:
        self.frames += len(detections)
        self.faces += sum(len(d) for d in detections)
        self.most_faces = max([self.most_faces, *map(len, detections)])
        self.frames_detected += person.detected
        self.frames_filled += len(person.faces) - person.detected
        if not person.faces:
            self.faceless.append(video_id)
        self.tracks += person.tracks

    def table(self) -> Table:
        t = Table(title="caer boxes", show_header=False)
        t.add_row("detector", self.detector)
        t.add_row("clips", str(self.clips))
        if self.skipped:
            t.add_row("clips skipped (bad input)", str(len(self.skipped)))
        first = f" (first: {', '.join(self.faceless[:3])}{', ...' if len(self.faceless) > 3 else ''})"
        t.add_row("clips with no face at all", f"{len(self.faceless)}{first if self.faceless else ''}")
        t.add_row("frames", str(self.frames))
        t.add_row("frames with the person's face found", _share(self.frames_detected, self.frames))
        t.add_row("frames with a box filled in a short gap", _share(self.frames_filled, self.frames))
        t.add_row("frames with no face (no box)", _share(self.frames_without_face, self.frames))
        t.add_row("faces per frame (mean, most)", f"{self.faces / max(self.frames, 1):.2f}, {self.most_faces}")
        t.add_row("tracks per clip", f"{self.tracks / max(self.clips, 1):.2f}")
        t.add_row("seconds", f"{self.seconds:.1f}")
        t.add_row("frames/s", f"{self.frames / self.seconds if self.seconds > 0 else 0.0:.1f}")
        for path in self.written:
            t.add_row("written", path)
        return t


def _share(count: int, total: int) -> str:
    return f"{count} ({100 * count / max(total, 1):.1f}%)"


def find_boxes(cfg: BoxesConfig, root: str | None = None, workers: int = 0, console: Console | None = None,
               skip_bad: bool = False) -> BoxesSummary:
    """Detect, track and choose each clip's person in every clip of ``cfg.annotations``; write the box files.
    ``root`` defaults to the first annotation file's folder; ``workers`` = 0 detects in this process; with
    ``skip_bad`` a clip with bad input (a missing folder, an unreadable frame) is left out and listed, instead of
    stopping the run."""
    console = console or Console()
    if not cfg.annotations:
        raise ValueError("caer boxes needs at least one annotation file")
    _check_outputs(cfg)  # before reading any clip (indexing videos reads every packet)
    clips, bad = read_clips(cfg.annotations, Path(root or Path(cfg.annotations[0]).parent), skip_bad)
    outputs = _check_outputs(cfg, clips)
    detect = make_detector(cfg.detector, cfg.upsample)  # a wrong name or a missing model file fails here, before any work
    summary = BoxesSummary(cfg.detector, skipped=bad)
    faces: dict[str, dict[str, list[int]]] = {}
    bodies: dict[str, list[int]] = {}
    start = time.perf_counter()
    stream = _detections(_frames(clips, skip_bad), detect, cfg, workers)
    # closing: an interrupt or an error stops the workers here, not whenever the generator is collected
    with progress_bar(console) as progress, closing(stream):
        task = progress.add_task("boxes", total=sum(len(c.frames) for c in clips), info="")
        for index, rows in itertools.groupby(stream, key=itemgetter(0)):
            clip, keys, sizes, detections = clips[index], [], [], []
            progress.update(task, info=clip.video_id)
            error = None
            for _, key, size, found in rows:
                if key is None:  # the clip's bad frame (--skip-bad): ``found`` is its error
                    error = found
                    break
                keys.append(key)
                sizes.append(size)
                detections.append(found)
                progress.advance(task)
            if error is not None:
                summary.skipped.append(f"{clip.source}: {error}")
                progress.advance(task, len(clip.frames) - len(keys))
                continue
            height, width = np.max(sizes, axis=0).tolist()  # a folder's frames may differ in size: its largest
            person = clip_person(detections, width, height, cfg.min_iou, cfg.max_gap)
            faces[clip.video_id] = {keys[f]: _pixels(box) for f, box in person.faces.items()}
            bodies[clip.video_id] = _pixels(person.body)
            summary.add(clip.video_id, person, detections)
    summary.seconds, summary.clips = time.perf_counter() - start, len(faces)  # the clips with boxes
    written = dict(zip(outputs, (faces, bodies)))  # the body boxes only when --body-boxes named a file
    write_atomically({path: json.dumps(boxes) for path, boxes in written.items()})
    summary.written += [str(path) for path in written]
    return summary


def read_clips(inputs: list[str], root: Path, skip_bad: bool = False) -> tuple[list[Clip], list[str]]:
    """Every clip of the inputs, once (a clip listed in two files needs its boxes once): an annotation file's clips,
    or a video file or frame folder given itself, keyed by its path from ``root``; and, with ``skip_bad``, the clips
    left out for bad input (else that is an error)."""
    clips: dict[str, Clip] = {}
    bad: list[str] = []
    for path in inputs:
        if is_clip(path):
            found, skipped = _given_clip(Path(path), root, skip_bad)
        else:  # any label will do: boxes ignore labels
            found, skipped = read_annotations(path, root, num_classes=sys.maxsize, skip_bad=skip_bad)
        bad += [str(b) for b in skipped]
        for clip in found:
            clips.setdefault(clip.video_id, clip)
    return list(clips.values()), bad


def is_clip(path: str) -> bool:
    """Whether an input of ``caer boxes`` is a clip itself (a video file or a folder), not an annotation file."""
    return is_video(path) or Path(path).is_dir()


def _given_clip(path: Path, root: Path, skip_bad: bool) -> tuple[list[Clip], list[str]]:
    """A video file or frame folder given as an input: ([its clip], []), or with ``skip_bad`` ([], [why it is bad])."""
    key = Path(os.path.relpath(path.absolute(), root.absolute()))
    if ".." in key.parts:
        raise DataError(f"{path} is not under --root {root}, which the box file's keys start from: give a --root "
                        "that holds every input")
    try:
        frames, video = clip_frames(path)
    except DataError as err:
        if not skip_bad:
            raise
        return [], [f"{path}: {err}"]
    return [Clip(key.as_posix(), 0, tuple(frames), str(path), len(frames), video)], []


def _check_outputs(cfg: BoxesConfig, clips: list[Clip] = ()) -> list[Path]:
    """The files to write (face boxes, then body boxes if asked for), checked (``files.check_outputs``): neither an
    input list nor a clip's video file, nor inside a clip's frame folder."""
    named = [("--out", Path(cfg.out))] + ([("--body-boxes", Path(cfg.body_boxes))] if cfg.body_boxes else [])
    inputs = [(f"the input {'video' if is_video(path) else 'frame folder' if is_clip(path) else 'list'}", Path(path))
              for path in cfg.annotations]
    inputs += [(f"the clip {clip.video_id}'s {'video' if clip.video else 'frame folder'}",
                clip.video.path if clip.video else clip.frames[0].parent) for clip in clips if clip.frames]
    check_outputs(named, inputs, cfg.overwrite)
    return [path for _, path in named]


def _frames(clips: list[Clip], skip_bad: bool = False) -> Iterator[tuple[int, str | None, np.ndarray | str]]:
    """(clip index, box-file key, RGB array) of every frame of every clip, in order. With ``skip_bad`` a clip's bad
    frame ends the clip with (its index, None, the error) instead of stopping the run."""
    for index, clip in enumerate(clips):
        try:
            for key, image in iter_clip_images(clip):
                yield index, key, np.asarray(image)
        except DataError as err:
            if not skip_bad:
                raise
            yield index, None, str(err)


def _detections(frames: Iterator[tuple[int, str, np.ndarray]], detect, cfg: BoxesConfig,
                workers: int) -> Iterator[tuple[int, str, tuple[int, int], np.ndarray]]:
    """(clip index, key, (height, width), faces) of every frame, in order: by ``detect`` in this process, or with
    workers (each building ``cfg``'s detector), this process decodes and the workers detect, with a few frames in
    flight per worker (so memory stays bounded). Closed early (an interrupt, an error), it drops the frames not yet
    detected and waits for the workers to end."""
    if workers == 0:
        for index, key, rgb in frames:
            yield (index, key, rgb.shape[:2], detect(rgb)) if key is not None else (index, None, None, rgb)
        return
    pool = detector_pool(workers, cfg.detector, cfg.upsample)
    try:
        pending: deque = deque()
        for index, key, rgb in frames:  # a bad clip's (index, None, error) passes through in its place
            pending.append((index, key, rgb.shape[:2], pool.submit(detect_in_worker, rgb)) if key is not None
                           else (index, None, None, rgb))
            if len(pending) > 2 * workers:
                yield _done(pending.popleft())
        for entry in pending:
            yield _done(entry)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _done(entry: tuple) -> tuple:
    """A frame handed to a worker, with its faces once found (a bad clip's error entry as it is)."""
    index, key, size, future = entry
    return (index, key, size, future.result()) if key is not None else entry


def _pixels(box: Box) -> list[int]:
    return [round(v) for v in box]
