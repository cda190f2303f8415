"""``caer predict``: the emotion of the people in videos or frame folders, window by window, with any checkpoint.

For each input: the frames the checkpoint uses (its ``--fps`` and ``--frame-stride``, as in training); its people
(the box file's person, or a face detector's tracks: the clip's person, or with ``--all-faces`` every track);
windows of ``--window`` frames every ``--stride`` frames, each read as ``caer eval`` reads a clip (TSN sampling,
the middle frame of each of the model's T segments); class probabilities per window and person, and their mean
per person. The image encoder runs on the frames directly (no cache), with the checkpoint's own preprocessing and
crop geometry; a frame that several windows sample is cut and encoded once per person.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ..config import BoxesConfig, CropConfig, Decode, PredictConfig, from_flat
from ..data.datasets import sample_indices
from ..data.faces import body_box, choose_person, make_detector, person_boxes, track_faces
from ..data.raer import Box, Clip, DataError, ViewMaker, clip_dir_key, clip_frames, load_body_boxes, load_face_boxes
from ..data.tensor_views import TensorViews, auto_decode_device
from ..data.video import clip_images, frame_number
from ..files import check_outputs, write_atomically
from ..model.caer_model import CAERModel
from ..model.checkpoint import model_from_checkpoint
from ..model.encoder import Preprocess
from ..runtime import autocast
from .annotate import ANNOTATE_SUFFIXES, write_annotated
from .display import print_unfolded, progress_bar

FRAMES_PER_CHUNK = 32  # frames decoded, cut (for every person) and encoded together
WINDOWS_PER_BATCH = 256  # windows through the temporal model at once


# ------------------------------------------------------------------------------------------ the model

@dataclass
class Predictor:
    """A checkpoint's model, ready to classify raw frames, with the geometry and preprocessing it was trained with."""

    model: CAERModel
    preprocess: Preprocess
    crop: CropConfig
    classes: list[str]
    segments: int  # T: frames per window the model sees
    stage: int
    device: torch.device
    use_amp: bool
    text: tuple[torch.Tensor, torch.Tensor]


def load_predictor(path: str, overrides: dict) -> Predictor:
    """The model of checkpoint ``path`` (``overrides``: run-config options, e.g. ``pretrained``, ``device``). Every
    failure is one line naming the checkpoint."""
    ckpt, cfg, model, backbone = model_from_checkpoint(path, overrides)
    device = backbone.device
    model.eval()
    with torch.no_grad():
        text = tuple(t.detach() for t in model.text_features())
    return Predictor(model, backbone.preprocess, cfg.crop.resolved(device=auto_decode_device(backbone)), list(cfg.model.classes),
                     cfg.model.num_frames, int(ckpt.get("stage", 0)), device, cfg.runtime.use_amp, text)


# ------------------------------------------------------------------------------------------ inputs and faces

def open_input(path: str, fps: float) -> Clip:
    """An input as a clip: a video file (its frames at ``fps``, 0: all) or a frame folder (``raer.clip_frames``)."""
    frames, video = clip_frames(Path(path), fps)
    return Clip(path, 0, tuple(frames), path, video=video)


@dataclass
class Window:
    start: int  # positions in the input's frames: [start, end)
    end: int
    sampled: list[int]  # the positions the model sees (TSN: the middle frame of each of T segments)
    probabilities: list[float] = field(default_factory=list)


@dataclass
class Person:
    """One person of an input: face box per frame position, the span their windows cover, and the predictions."""

    boxes: dict[int, Box]  # detected, interpolated across a short gap, or from the box file
    detected: int  # frames whose box the detector (or the box file) gave
    chosen: bool  # the clip's person (faces.choose_person; a box file's person is the clip's)
    span: tuple[int, int]
    body: Box
    windows: list[Window] = field(default_factory=list)
    note: str = ""

    def probabilities(self) -> np.ndarray:
        """The clip-level probabilities: the mean over the person's windows."""
        return np.mean([w.probabilities for w in self.windows], axis=0)


@dataclass
class Faces:
    """Where the inputs' faces come from: a box file (keys root-relative, as ``load_face_boxes`` reads them) or a
    face detector with tracking (``detection``: caer boxes' options)."""

    detection: BoxesConfig
    detect: Callable | None = None  # the detector, built once (dlib loads its model each time)
    box_file: str | None = None
    root: Path = Path(".")
    boxes: dict = field(default_factory=dict)
    bodies: dict = field(default_factory=dict)

    @classmethod
    def from_options(cls, overrides: dict, detection: dict) -> Faces:
        """The box file's faces, or the detector (``check_face_options`` has refused flags of the other mode)."""
        face_boxes, body_boxes = overrides.get("face_boxes"), overrides.get("body_boxes")
        settings = from_flat(BoxesConfig, {k: v for k, v in detection.items() if v is not None}, "flag")
        if not face_boxes:  # a wrong detector name fails here, before any work
            return cls(settings, make_detector(settings.detector, settings.upsample))
        root = Path(overrides.get("root") or Path(face_boxes).parent)
        bodies = load_body_boxes(body_boxes, root) if body_boxes else {}
        return cls(settings, None, face_boxes, root, load_face_boxes(face_boxes, root), bodies)

    def describe(self) -> dict:
        if self.box_file:
            return {"face_boxes": self.box_file, "root": str(self.root)}
        d = self.detection
        return {"detector": d.detector, "upsample": d.upsample, "min_iou": d.min_iou, "max_gap": d.max_gap}

    def key(self, path: str) -> str:
        """The box file's key of an input: its path relative to the root, or as given."""
        relative = clip_dir_key(os.path.abspath(path), [os.path.abspath(self.root)])
        for candidate in (relative, os.path.normpath(path)):
            if candidate in self.boxes:
                return candidate
        example = next(iter(self.boxes), None)
        raise DataError(f"{self.box_file}: no entry for {path} (looked up as {relative!r}: keys are clip paths relative "
                        f"to --root {self.root}"
                        f"{f', e.g. {example!r}' if example else ''}); give --root, or find its boxes with "
                        "--detector instead")


def frame_size(clip: Clip) -> tuple[int, int]:
    """(width, height) of a video, or of a folder's first frame."""
    if clip.video is not None:
        return clip.video.width, clip.video.height
    _, image = next(clip_images(clip, clip.frames[:1]))
    return image.size


def people_from_file(clip: Clip, frames: list[Path], faces: Faces) -> tuple[list[Person], int]:
    """The box file's person of ``clip``, over all its frames; its body box from the body-box file, else derived
    from its face boxes (the caer boxes rule)."""
    key = faces.key(clip.video_id)
    entry = faces.boxes[key]
    boxes = {i: entry[f.name] for i, f in enumerate(frames) if f.name in entry}
    if not boxes:
        raise DataError(f"{clip.video_id}: {faces.box_file} has no face box for any of its {len(frames)} frames "
                        f"(first frame key {frames[0].name!r}); give boxes, or use --detector")
    body = faces.bodies.get(key) or body_box([np.asarray(b) for b in boxes.values()], *frame_size(clip))
    return [Person(boxes, len(boxes), True, (0, len(frames)), body)], 1


def people_from_detector(clip: Clip, frames: list[Path], faces: Faces, all_faces: bool,
                         progress: Progress) -> tuple[list[Person], int]:
    """Faces detected in every frame and linked into tracks: the clip's person (over the whole clip, as a clip is
    read in training), or every track (each over its first to last detection); and how many tracks there were."""
    d = faces.detection
    task = progress.add_task("faces", total=len(frames), info=Path(clip.video_id).name)
    found, sizes = [], []
    for _, image in clip_images(clip, frames):
        found.append(faces.detect(np.asarray(image)))
        sizes.append(image.size)
        progress.advance(task)
    progress.remove_task(task)
    tracks = track_faces(found, d.min_iou, d.max_gap)
    chosen = choose_person(tracks)
    if chosen is None:
        raise DataError(f"{clip.video_id}: --detector {d.detector} found no face in its {len(frames)} frames; give "
                        "its boxes with --face-boxes, or try another --detector (hog, cnn, haar, yunet:PATH.onnx) or "
                        "a higher --upsample")
    width, height = np.max(sizes, axis=0).tolist()  # a folder's frames may differ in size: its largest (caer boxes)
    people = []
    for track in sorted(tracks if all_faces else [chosen], key=lambda t: (t.first, float(t.boxes[t.first][0]))):
        boxes, body = person_boxes(track, d.max_gap, width, height)
        span = (track.first, track.last + 1) if all_faces else (0, len(frames))
        people.append(Person(boxes, len(track.boxes), track is chosen, span, body))
    return people, len(tracks)


# ------------------------------------------------------------------------------------------ windows

def make_windows(span: tuple[int, int], window: int, stride: int, segments: int) -> list[Window]:
    """Windows of ``window`` positions every ``stride`` over ``span``, the last one moved back to end with the span
    (so every frame is covered); a span of at most ``window`` frames is one window."""
    first, end = span
    size = min(window, end - first)
    starts = list(range(first, end - size + 1, stride))
    if starts[-1] + size < end:
        starts.append(end - size)
    return [Window(s, s + size, (s + sample_indices(size, segments, False)).tolist()) for s in starts]


def person_views(clip: Clip, frames: list[Path], person: Person, crop: CropConfig) -> ViewMaker:
    """The view maker of one person: their face box per frame, their body box, the checkpoint's margin."""
    key = clip_dir_key(clip.video_id)
    boxes = {frames[i].name: box for i, box in person.boxes.items()}
    return ViewMaker({key: boxes}, {key: person.body}, crop.margin, crop.crop_body)


def chunk_pixels(p: Predictor, clip: Clip, files: list[Path], makers: list[ViewMaker],
                 wanted: list[tuple[int, Path]]) -> torch.Tensor:
    """uint8 [len(wanted), 2 (face, context), 3, S, S]: the views of (person, frame) pairs; ``files`` (ascending)
    are decoded once, by the checkpoint's decode path."""
    if p.crop.decode == Decode.tensor:
        images = TensorViews.decode(TensorViews(makers[0], p.preprocess).read(clip, files), p.device)
        position = {f: i for i, f in enumerate(files)}
        out = []
        for k, group in itertools.groupby(wanted, key=lambda pair: pair[0]):  # each person cuts only their frames
            mine = [f for _, f in group]
            boxes = [makers[k].frame_boxes(clip, f) for f in mine]
            out.append(TensorViews(makers[k], p.preprocess).pixels(
                {"images": [images[position[f]] for f in mine], "files": [str(f) for f in mine],
                 "faces": [face for face, _ in boxes], "body": boxes[0][1], "video_id": clip.video_id}, p.device))
        return torch.cat(out)
    images = dict(clip_images(clip, files))
    return torch.stack([torch.stack([p.preprocess.to_uint8(v) for v in makers[k].views(clip, f, images[f])[:2]])
                        for k, f in wanted])


@torch.no_grad()
def encode_people(p: Predictor, clip: Clip, frames: list[Path], people: list[Person],
                  progress: Progress) -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per person, {frame position: (face feature, context feature)} of every frame their windows sample."""
    needs = [{i for w in person.windows for i in w.sampled} for person in people]
    positions = sorted(set().union(*needs))
    makers = [person_views(clip, frames, person, p.crop) for person in people]
    features: list[dict] = [{} for _ in people]
    task = progress.add_task("frames", total=len(positions), info=Path(clip.video_id).name)
    for start in range(0, len(positions), FRAMES_PER_CHUNK):
        chunk = positions[start : start + FRAMES_PER_CHUNK]
        wanted = [(k, i) for k in range(len(people)) for i in chunk if i in needs[k]]  # grouped by person
        pixels = chunk_pixels(p, clip, [frames[i] for i in chunk], makers, [(k, frames[i]) for k, i in wanted])
        pixels = pixels.to(p.device)
        with autocast(p.device, p.use_amp):
            face, context = p.model.frame_features(pixels[None, :, 0], pixels[None, :, 1])
        for (k, i), f, c in zip(wanted, face[0].float(), context[0].float()):
            features[k][i] = (f, c)
        progress.advance(task, len(chunk))
    progress.remove_task(task)
    return features


@torch.no_grad()
def classify(p: Predictor, person: Person, features: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Class probabilities of each of the person's windows (softmax of the model's logits)."""
    for start in range(0, len(person.windows), WINDOWS_PER_BATCH):
        batch = person.windows[start : start + WINDOWS_PER_BATCH]
        face = torch.stack([torch.stack([features[i][0] for i in w.sampled]) for w in batch])
        context = torch.stack([torch.stack([features[i][1] for i in w.sampled]) for w in batch])
        with autocast(p.device, p.use_amp):
            logits = p.model(face, context, p.text).float()
        for window, probs in zip(batch, torch.softmax(logits, dim=-1).cpu().double().numpy()):
            window.probabilities = probs.tolist()


# ------------------------------------------------------------------------------------------ results

@dataclass
class InputResult:
    clip: Clip
    frames: list[Path]  # the frames the checkpoint uses, in time order (positions index into this)
    people: list[Person]
    tracks: int

    def times(self) -> list[float] | None:
        """Each used frame's start in seconds (videos only)."""
        if self.clip.video is None:
            return None
        starts = self.clip.video.times()
        return [float(starts[frame_number(f) - 1]) for f in self.frames]

    def as_dict(self, classes: list[str]) -> dict:
        clip = self.clip
        return {"input": clip.video_id, "kind": "video" if clip.video is not None else "frames",
                "frame_count": clip.frame_count, "frames_used": len(self.frames), "tracks": self.tracks,
                "persons": [self._person(n, person, classes) for n, person in enumerate(self.people, start=1)]}

    def _person(self, number: int, person: Person, classes: list[str]) -> dict:
        names, times = [f.name for f in self.frames], self.times()
        probs = person.probabilities()
        first, end = person.span
        windows = [{"first_frame": names[w.start], "last_frame": names[w.end - 1],
                    **({"time_s": [times[w.start], times[w.end - 1]]} if times else {}),
                    "sampled_frames": [names[i] for i in w.sampled], "label": classes[int(np.argmax(w.probabilities))],
                    "probabilities": w.probabilities} for w in person.windows]
        return {"person": number, "chosen": person.chosen, "label": classes[int(np.argmax(probs))],
                "label_index": int(np.argmax(probs)), "probabilities": probs.tolist(), "first_frame": names[first],
                "last_frame": names[end - 1], "frames_covered": end - first, "frames_with_face": len(person.boxes),
                "frames_detected": person.detected, "note": person.note or None,
                "boxes": {names[i]: [round(v, 2) for v in box] for i, box in sorted(person.boxes.items())},
                "windows": windows}


@dataclass
class PredictResult:
    checkpoint: str
    predictor: Predictor
    settings: PredictConfig
    faces: Faces
    inputs: list[InputResult]
    skipped: list[str] = field(default_factory=list)  # with --skip-bad: "input: reason" of each input left out
    written: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        p, s, crop = self.predictor, self.settings, self.predictor.crop
        return {"checkpoint": self.checkpoint, "stage": p.stage, "classes": p.classes, "window": s.window,
                "stride": s.stride, "num_frames": p.segments, "all_faces": s.all_faces, "faces": self.faces.describe(),
                "geometry": {"margin": crop.margin, "crop_body": crop.crop_body, "frame_stride": crop.frame_stride,
                             "fps": crop.fps, "decode": str(crop.decode)},
                "inputs": [r.as_dict(p.classes) for r in self.inputs], "skipped": self.skipped}

    def show(self, console: Console) -> None:
        """Print the table, whole on any console (a log's 80 columns would cut its cells), and each skipped input."""
        print_unfolded(console, self.table())
        for line in self.skipped:
            console.print(f"[yellow]skipped[/] {escape(line)}", highlight=False, soft_wrap=True)

    def table(self) -> Table:
        """One row per person of each input: the frames they cover, windows, clip-level label and its probability."""
        t = Table(title=f"caer predict {self.checkpoint} (stage {self.predictor.stage})", title_justify="left")
        notes = any(person.note for result in self.inputs for person in result.people)
        for column in ("input", "person", "frames", "windows", "label", "probability", *(("note",) if notes else ())):
            t.add_column(column, justify="right" if column in ("person", "windows", "probability") else "left")
        for result in self.inputs:
            names = [f.stem for f in result.frames]
            for n, person in enumerate(result.people, start=1):
                probs, (first, end) = person.probabilities(), person.span
                tag = f"{n}" + (" (chosen)" if person.chosen and len(result.people) > 1 else "")
                t.add_row(Path(result.clip.video_id).name, tag, f"{names[first]}..{names[end - 1]} ({end - first})",
                          str(len(person.windows)), self.predictor.classes[int(np.argmax(probs))],
                          f"{probs.max():.3f}", *((person.note,) if notes else ()))
        return t


# ------------------------------------------------------------------------------------------ the recipe

def check_settings(cfg: PredictConfig, overrides: dict, detection: dict) -> list[Path]:
    """Refuse unusable settings before any work; the annotated videos to write (one per input, or none)."""
    if not cfg.inputs:
        raise ValueError("caer predict needs at least one video file or frame folder")
    check_face_options(cfg.all_faces, overrides, detection)
    annotated = annotate_paths(cfg)
    outputs = ([("--json", Path(cfg.json))] if cfg.json else []) + [("--annotate", path) for path in annotated]
    check_outputs(outputs, input_paths(cfg, overrides), cfg.overwrite)
    return annotated


def check_face_options(all_faces: bool, overrides: dict, detection: dict) -> None:
    """Refuse flags that cannot apply where the faces come from: a box file (one person per clip, no detection or
    tracking) or a detector (no box file whose keys --root would anchor)."""
    face_boxes = overrides.get("face_boxes")
    if face_boxes and detection.get("detector"):
        raise ValueError("give --face-boxes or --detector, not both")
    if overrides.get("body_boxes") and not face_boxes:
        raise ValueError("--body-boxes goes with --face-boxes (with a detector, the body box comes from the "
                         "person's face track)")
    if face_boxes:
        unused = (["--all-faces"] if all_faces else []) + [_flag(k) for k, v in detection.items() if v is not None]
        if unused:
            names = ", ".join(unused)
            raise ValueError(f"with --face-boxes, {names} cannot apply (face detection and tracking options; the box "
                             f"file gives each input's one person): leave out {names}, or --face-boxes to detect faces")
    elif overrides.get("root") is not None:
        raise ValueError("with a face detector, --root cannot apply (the folder the --face-boxes file's keys are "
                         "relative to): leave out --root, or give --face-boxes")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def annotate_paths(cfg: PredictConfig) -> list[Path]:
    """The annotated videos to write: --annotate itself for one input, else one file per input beside it."""
    if not cfg.annotate:
        return []
    out = Path(cfg.annotate)
    if out.suffix.lower() not in ANNOTATE_SUFFIXES:
        raise ValueError(f"--annotate {out}: give a {', '.join(ANNOTATE_SUFFIXES)} file to write")
    if len(cfg.inputs) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}-{Path(name).stem}{out.suffix}") for k, name in enumerate(cfg.inputs, start=1)]


def input_paths(cfg: PredictConfig, overrides: dict) -> list[tuple[str, Path]]:
    """(what it is, path) of every file or folder the run reads."""
    named = [("the checkpoint", cfg.checkpoint), *(("the input", path) for path in cfg.inputs),
             ("the --face-boxes file", overrides.get("face_boxes")), ("the --body-boxes file", overrides.get("body_boxes"))]
    return [(what, Path(path)) for what, path in named if path]


def predict_input(p: Predictor, clip: Clip, faces: Faces, cfg: PredictConfig, progress: Progress) -> InputResult:
    """People, windows and probabilities of one input."""
    frames = list(clip.frames[:: p.crop.frame_stride])
    if faces.box_file:
        people, tracks = people_from_file(clip, frames, faces)
    else:
        people, tracks = people_from_detector(clip, frames, faces, cfg.all_faces, progress)
    for person in people:
        person.windows = make_windows(person.span, cfg.window, cfg.stride, p.segments)
        length = person.span[1] - person.span[0]
        if length < cfg.window:
            person.note = f"shorter than --window {cfg.window}: one window"
    features = encode_people(p, clip, frames, people, progress)
    for person, found in zip(people, features):
        classify(p, person, found)
    return InputResult(clip, frames, people, tracks)


def predict(cfg: PredictConfig, overrides: dict | None = None, detection: dict | None = None,
            console: Console | None = None) -> PredictResult:
    """Predict every input of ``cfg`` with its checkpoint; write ``--json`` and ``--annotate`` if asked.
    ``overrides``: ``PREDICT_OVERRIDES`` (box files, root, base weights, device); ``detection``: caer boxes'
    detection options (``PREDICT_DETECTION``)."""
    console = console or Console()
    overrides, detection = overrides or {}, detection or {}
    annotated = check_settings(cfg, overrides, detection)
    faces = Faces.from_options(overrides, detection)
    run_options = {k: overrides.get(k) for k in ("pretrained", "device")}
    predictor = load_predictor(cfg.checkpoint, run_options)
    done, skipped = predict_inputs(predictor, faces, cfg, console)
    result = PredictResult(cfg.checkpoint, predictor, cfg, faces, [one for _, one in done], skipped)
    if cfg.json:
        write_atomically({Path(cfg.json): json.dumps(result.as_dict(), indent=1)})
        result.written.append(cfg.json)
    for k, one in done if annotated else ():
        write_annotated(annotated[k], one.clip, one.frames, _labels(one, predictor.classes))
        result.written.append(str(annotated[k]))
    return result


def predict_inputs(p: Predictor, faces: Faces, cfg: PredictConfig,
                   console: Console) -> tuple[list[tuple[int, InputResult]], list[str]]:
    """(position in ``cfg.inputs``, result) of each input predicted, and with --skip-bad the inputs left out, each
    with its reason (in input order). Every input is opened first: a missing one stops the run before any frame is
    encoded."""
    opened, skipped = [], {}
    for k, path in enumerate(cfg.inputs):
        try:
            opened.append((k, open_input(path, p.crop.fps)))
        except DataError as err:
            skipped[k] = bad_input(cfg, path, err)
    done = []
    with progress_bar(console) as progress:
        task = progress.add_task("inputs", total=len(opened), info="")
        for k, clip in opened:
            progress.update(task, info=Path(clip.video_id).name)
            try:
                done.append((k, predict_input(p, clip, faces, cfg, progress)))
            except DataError as err:
                skipped[k] = bad_input(cfg, clip.video_id, err)
            progress.advance(task)
    reasons = [skipped[k] for k in sorted(skipped)]
    if not done:
        raise DataError(f"no input could be predicted; skipped: {'; '.join(reasons)}")
    return done, reasons


def bad_input(cfg: PredictConfig, path: str, err: DataError) -> str:
    """With --skip-bad, the line that lists a skipped input: "input: reason"; else the error, which stops the run
    (saying how to go on without the input, when there are others)."""
    if not cfg.skip_bad:
        hint = " (use --skip-bad to go on without it)" if len(cfg.inputs) > 1 else ""
        raise DataError(f"{err}{hint}") from err
    return str(err) if str(err).startswith(f"{path}:") else f"{path}: {err}"


def _labels(result: InputResult, classes: list[str]) -> list[dict[int, tuple[Box, str]]]:
    """Per person, {frame position: (face box, "N label p")}: the label of the windows that cover the frame (their
    mean probabilities), else the person's clip-level label."""
    out = []
    for n, person in enumerate(result.people, start=1):
        sums, counts = np.zeros((len(result.frames), len(classes))), np.zeros(len(result.frames))
        for w in person.windows:
            sums[w.start : w.end] += w.probabilities
            counts[w.start : w.end] += 1
        clip_level, shown = person.probabilities(), {}
        for i, box in person.boxes.items():
            probs = sums[i] / counts[i] if counts[i] else clip_level
            shown[i] = (box, f"{n} {classes[int(np.argmax(probs))]} {probs.max():.2f}")
        out.append(shown)
    return out
