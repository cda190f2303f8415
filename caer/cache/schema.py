"""The feature cache's logical schema, shared by the Zarr and HDF5 backends.

    /                       root attributes:
        caer_schema         SCHEMA_VERSION
        fingerprint         everything that determines the features (see ``fingerprint``; a store without
                            ``decode`` was made with pil, one without ``fps`` kept every frame of a video)
        splits              {annotation file stem: [video ids]}
        skipped             ["file:line: reason", ...] clips left out by --skip-bad
        skipped_clips       [video ids] of those clips
        summary             the last extraction's summary numbers
        inputs              {root, face_boxes, body_boxes}: absolute paths the last extraction read
    /clips/<key>            float16 [2 streams (face, context), views, frames, D]; one chunk per clip
        video_id, label (0-based), frame_names (a video's: the frame_key of each frame used), frames_without_face,
        boxes_sha256, origin ("frames": a frame folder, "video": a video file),
        sha256 (of the float16 data, checked on the first read in each process), done

``<key>`` is the video id with "/" and "%" percent-escaped. A clip counts only once ``done`` is
true, which is written after its features. In HDF5 every attribute value is a JSON string.
"""

from __future__ import annotations

import re
import urllib.parse

SCHEMA_VERSION = 1
STREAMS = ("face", "context")
CLIPS = "clips"


def store_key(video_id: str) -> str:
    """The name of a clip's array in the store: its video id with "/" and "%" escaped."""
    return urllib.parse.quote(video_id, safe="")


def video_id_of(key: str) -> str:
    """The video id whose clip array is named ``key`` (``store_key`` undone)."""
    return urllib.parse.unquote(key)


def skipped_source(entry: str) -> tuple[str, int] | None:
    """(annotation file, line number) of a ``skipped`` entry ("file:line: reason"), or None if it has no such prefix."""
    found = re.match(r"(.+?):(\d+): ", entry)
    return (found.group(1), int(found.group(2))) if found else None


# keys added to the fingerprint after stores were written without them, with the value those stores were made with
ADDED_KEYS = {"decode": "pil", "fps": 0.0}


def fingerprint(encoder_identity: dict, *, margin: float, crop_body: bool, views: int, frame_stride: int,
                decode: str = ADDED_KEYS["decode"], fps: float = ADDED_KEYS["fps"]) -> dict:
    """The record that says whether two caches hold comparable features.

    The boxes are not in it: each clip records a digest of its own boxes (``boxes_sha256``), so
    fixing one clip's boxes redoes that clip only. ``decode`` is the decode-and-crop path (pil or tensor);
    ``fps`` the rate video files are resampled to (0: every frame). Unset, both are what stores made before the
    keys existed were made with.
    """
    return {
        "schema": SCHEMA_VERSION,
        "encoder": encoder_identity,
        "margin": margin,
        "crop_body": crop_body,
        "views": views,
        "frame_stride": frame_stride,
        "fps": float(fps),
        "decode": str(decode),
        "dtype": "float16",
    }


def with_added_keys(found: dict) -> dict:
    """A stored fingerprint as this version reads it: a store written before a key existed has that key's old value."""
    return {**ADDED_KEYS, **found}


def differences(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Human-readable lines for every key where two fingerprints differ."""
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: store has {b!r}, this run has {a!r}")
    return out
