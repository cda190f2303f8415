"""Benchmark: how well and how fast each `caer boxes --detector` finds faces, on the real photographs caer has offline.

Frames: two photographs (scikit-image's astronaut, matplotlib's Grace Hopper), each face scaled to 40, 60, 90 and
130 px wide, turned -15, 0 and 15 degrees, plain and mirrored, pasted on a 640x480 grey frame with noise: 48 frames.
A face counts as found when a box overlaps its true box (turned with it) with IoU >= 0.3; every other box is a false
detection. Time is the median per frame, one process, one thread for OpenCV.

Not a test (it needs scikit-image, from the test extras). Run it by hand:

    .venv/bin/python bench/detectors.py                      # hog at --upsample 0 and 1, cnn at 0, haar at 1
    .venv/bin/python bench/detectors.py --detector cnn:1     # NAME:UPSAMPLE, repeat the flag
    .venv/bin/python bench/detectors.py --detector yunet:/path/face_detection_yunet_2023mar.onnx:0
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from machine import machine  # bench/machine.py (scripts run from bench/ are on sys.path)
from PIL import Image
from skimage.data import astronaut

from caer.data.faces import iou_matrix, make_detector

# true face boxes in the photographs, where the shipped detectors agree within a few pixels
PHOTOS = {"astronaut": (172, 70, 268, 166), "grace_hopper": (165, 125, 370, 340)}
FACE_WIDTHS, ANGLES = (40, 60, 90, 130), (-15, 0, 15)


def photo(name: str) -> np.ndarray:
    if name == "astronaut":
        return astronaut()
    return np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB"))


def bench_frames(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(640x480 frame, true face box) of every photograph, face width, angle and mirroring."""
    rng = np.random.default_rng(seed)
    frames = []
    for name, face in PHOTOS.items():
        image = photo(name)
        for width in FACE_WIDTHS:
            scale = width / (face[2] - face[0])
            small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)[:440, :600]
            box = np.array(face, float) * scale
            for angle in ANGLES:
                for mirror in (False, True):
                    frames.append(_place(rng, small, box, angle, mirror))
    return frames


def _place(rng, image: np.ndarray, box: np.ndarray, angle: float, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    if mirror:
        image, box = image[:, ::-1], np.array([w - box[2], box[1], w - box[0], box[3]])
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    image = cv2.warpAffine(np.ascontiguousarray(image), turn, (w, h), borderValue=(110, 110, 110))
    corners = np.array([[box[0], box[1], 1], [box[2], box[1], 1], [box[0], box[3], 1], [box[2], box[3], 1]]) @ turn.T
    frame = np.clip(rng.normal(110, 8, (480, 640, 3)), 0, 255).astype(np.uint8)
    x, y = (640 - w) // 2, (480 - h) // 2
    frame[y:y + h, x:x + w] = image
    return frame, np.array([*corners.min(0), *corners.max(0)]) + [x, y, x, y]


def measure(spec: str, upsample: int, frames) -> dict:
    detect = make_detector(spec, upsample)
    found = false = 0
    times = []
    for frame, truth in frames:
        start = time.perf_counter()
        boxes = detect(frame)
        times.append(time.perf_counter() - start)
        hits = iou_matrix(boxes, truth[None])[:, 0] >= 0.3 if len(boxes) else np.zeros(0, bool)
        found += bool(hits.any())
        false += int((~hits).sum())
    return {"detector": spec, "upsample": upsample, "found": f"{found}/{len(frames)}", "false_detections": false,
            "ms_per_640x480_frame": round(1000 * statistics.median(times), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", action="append", help="NAME:UPSAMPLE (repeatable)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    frames = bench_frames()
    print(json.dumps(machine()))
    for entry in args.detector or ["hog:0", "hog:1", "cnn:0", "haar:1"]:
        spec, _, upsample = entry.rpartition(":")
        print(json.dumps(measure(spec, int(upsample), frames)), flush=True)


if __name__ == "__main__":
    main()
