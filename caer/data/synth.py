"""``caer synth``: a small, learnable dataset in the exact RAER layout, for tests and demos.

Every frame shows a "face" (a square near the top, with a face box) above a "desk object"
(a rectangle lower down, inside the body box). Class 0 is neutral. Odd classes draw a fine
texture on the face: it survives in the face crop but blurs away when the whole frame is
shrunk to the encoder's size, so only the face stream sees it. Even classes (2, 4, ...) colour
the desk object, which lies outside the face crop, so only the context stream sees it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import SynthConfig

FACE_TEXTURES = ("horizontal", "vertical", "checker", "diagonal")
OBJECT_COLOURS = ((200, 50, 50), (50, 170, 60), (50, 70, 210), (210, 200, 40), (170, 60, 190), (40, 190, 190))
SKIN = np.array([190, 150, 120], dtype=np.float32)
NEUTRAL_OBJECT = (128, 128, 128)


def class_signal(label: int) -> tuple[str | None, tuple[int, int, int]]:
    """(face texture or None, desk-object colour) of a 0-based class."""
    if label == 0:
        return None, NEUTRAL_OBJECT
    if label % 2 == 1:
        return FACE_TEXTURES[(label // 2) % len(FACE_TEXTURES)], NEUTRAL_OBJECT
    return None, OBJECT_COLOURS[(label // 2 - 1) % len(OBJECT_COLOURS)]


def _texture(kind: str | None, size: int) -> np.ndarray:
    """A zero-mean +-1 pattern with a period of 8 px (so it averages out when shrunk 4x)."""
    yy, xx = np.mgrid[:size, :size]
    if kind is None:
        return np.zeros((size, size), np.float32)
    band = {"horizontal": yy // 4, "vertical": xx // 4, "checker": yy // 4 + xx // 4, "diagonal": (xx + yy) // 4}[kind]
    return np.where(band % 2 == 0, 1.0, -1.0).astype(np.float32)


def _frame(rng, s: SynthConfig, background, face_box, object_box, texture, colour) -> np.ndarray:
    img = np.empty((s.height, s.width, 3), np.float32)
    img[:] = background
    left, top, right, bottom = face_box
    img[top:bottom, left:right] = SKIN + 55.0 * _texture(texture, right - left)[..., None]
    ol, ot, orr, ob = object_box
    img[ot:ob, ol:orr] = colour
    img += rng.normal(0, 6.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def check_new_folder(flag: str, out: Path) -> None:
    """Refuse ``out`` (given as ``flag``) unless it is a new or empty folder."""
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ValueError(f"{flag} {out}: {'a file, not a folder' if out.is_file() else 'folder exists and is not empty'}; "
                         "choose a new one")


def synthesise(s: SynthConfig) -> dict:
    """Write frames, ``train/val/test.txt``, ``face_boxes.json`` and ``body_boxes.json`` under ``s.out``: a new or
    empty folder."""
    if s.classes < 2:
        raise ValueError("--classes must be at least 2")
    if s.clips <= 2 * s.classes:  # each class gives one clip to val and one to test before train gets any
        raise ValueError(f"--clips must be more than 2 x --classes ({2 * s.classes}), so that no split is empty")
    if s.width < 96 or s.height < 96:
        raise ValueError("--width and --height must be at least 96 so that the face crop and the desk object do not overlap")
    out = Path(s.out)
    check_new_folder("OUT", out)  # never mix two datasets in one folder
    rng = np.random.default_rng(s.seed)
    labels = np.arange(s.clips) % s.classes
    rng.shuffle(labels)
    split_of = np.array(["train"] * s.clips, dtype=object)
    for k in range(s.classes):  # stratified: each split holds every class in the same proportion
        members = rng.permutation(np.flatnonzero(labels == k))
        n_held = max(1, len(members) // 5)
        split_of[members[:n_held]] = "val"
        split_of[members[n_held : 2 * n_held]] = "test"
    face_boxes: dict[str, dict[str, list[int]]] = {}
    body_boxes: dict[str, list[int]] = {}
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    face = 24
    for i in range(s.clips):
        label, split = int(labels[i]), str(split_of[i])
        clip_dir = f"frames/{split}/clip_{i:04d}"
        (out / clip_dir).mkdir(parents=True, exist_ok=True)
        n = int(rng.integers(max(2, s.frames // 2), s.frames * 3 // 2 + 1))
        background = rng.uniform(60, 200, 3)
        texture, colour = class_signal(label)
        cx = int(rng.integers(s.width // 2 - 12, s.width // 2 + 12))
        top = int(rng.integers(4, 12))
        boxes = {}
        for f in range(n):
            dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
            fb = (cx - face // 2 + dx, top + dy, cx + face // 2 + dx, top + dy + face)
            ob = (cx - 22, s.height - 30, cx + 22, s.height - 8)
            name = f"{f:05d}.jpg"
            Image.fromarray(_frame(rng, s, background, fb, ob, texture, colour)).save(out / clip_dir / name, quality=95)
            if rng.random() >= s.missing_face_rate:
                boxes[name] = [v + int(rng.integers(-1, 2)) for v in fb]
        face_boxes[clip_dir] = boxes
        body_boxes[clip_dir] = [cx - 40, max(0, top - 4), cx + 40, s.height]
        lines[split].append(f"{clip_dir} {n} {label + 1}")
    for split, rows in lines.items():
        (out / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (out / "face_boxes.json").write_text(json.dumps(face_boxes, indent=1))
    (out / "body_boxes.json").write_text(json.dumps(body_boxes, indent=1))
    return {split: len(rows) for split, rows in lines.items()}
