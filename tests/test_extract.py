"""`caer extract`: features equal open_clip's own, bad input stops cleanly (or is skipped), and kill-and-resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caer.cache import FeatureCache, store_key
from caer.cache.store import CacheWriter
from caer.pipeline import extract as extract_module
from caer.pipeline.extract import extract
from conftest import (
    Dataset,
    assert_fp16_equal,
    assert_in_output,
    extract_args,
    run_cli,
    settings_for,
)

# --------------------------------------------------------------------------- features equal open_clip's


def test_cached_features_equal_open_clip_encode_image(zarr_cache, dataset, reference):
    """Both streams, both views, every frame (including frames without a face box) of every clip."""
    path, summary = zarr_cache
    cache = FeatureCache.open(path)
    boxes = dataset.boxes()
    assert sorted(cache.video_ids) == sorted(dataset.video_ids())
    no_box = 0
    for video_id in cache.video_ids:
        frames = sorted((dataset.root / video_id).glob("*.jpg"))
        assert cache.frame_names(video_id) == [f.name for f in frames]
        face, context = zip(*(reference.crops(f, boxes[video_id].get(f.name)) for f in frames))
        no_box += sum(f.name not in boxes[video_id] for f in frames)
        for stream, images in (("face", face), ("context", context)):
            for view in (0, 1):
                assert_fp16_equal(
                    cache.features(video_id, stream, view), reference.encode(images, flip=view == 1),
                    f"{video_id} {stream} view {view}",
                )
    assert no_box > 0, "the synthetic dataset should have frames without a face box"
    assert summary.frames_without_face == no_box
    assert summary.frames == sum(cache.num_frames(v) for v in cache.video_ids)


def test_reference_check_is_sensitive(zarr_cache, dataset, reference):
    """The comparison above would catch a missing margin, letterbox or flip (guards against a vacuous test)."""
    cache = FeatureCache.open(zarr_cache[0])
    video_id = next(v for v in cache.video_ids if dataset.boxes()[v])
    frames = sorted((dataset.root / video_id).glob("*.jpg"))
    box = dataset.boxes()[video_id][frames[0].name]
    face, context = reference.crops(frames[0], box)
    from PIL import Image

    wrong = {
        "no margin": ("face", 0, Image.open(frames[0]).convert("RGB").crop(box)),
        "no letterbox": ("context", 0, Image.open(frames[0]).convert("RGB")),
        "unflipped view 1": ("face", 1, face),
    }
    for name, (stream, view, img) in wrong.items():
        with pytest.raises(AssertionError):
            assert_fp16_equal(cache.features(video_id, stream, view)[:1], reference.encode([img]), name)


def test_reference_check_catches_a_one_pixel_crop_error(zarr_cache, dataset, reference):
    """A face crop off by one pixel (moved, or grown on one side) fails the check, by a clear margin."""
    from PIL import Image

    cache = FeatureCache.open(zarr_cache[0])
    boxes = dataset.boxes()
    video_id = next(v for v in cache.video_ids if boxes[v])
    names = cache.frame_names(video_id)
    ratios = {}
    for name, box in sorted(boxes[video_id].items()):
        img = Image.open(dataset.root / video_id / name).convert("RGB")
        cached = cache.features(video_id, "face", 0)[names.index(name)][None]
        x0, y0, x1, y1 = box  # the SPEC's crop: the box grown by the margin, clipped to the image
        m = reference.margin
        crop = (max(0, x0 - m), max(0, y0 - m), min(img.width, x1 + m), min(img.height, y1 + m))
        assert_fp16_equal(cached, reference.encode([img.crop(crop)]), f"{name} right crop")
        left, top, right, bottom = crop
        dx = 1 if left == 0 else -1  # stay inside the image: no black border to make the error easy
        wrong = {
            "moved 1 px sideways": (left + dx, top, right + dx, bottom),
            "grown by 1 px": (left, top, right + 1, bottom) if right < img.width else (left - 1, top, right, bottom),
        }
        for what, bad in wrong.items():
            with pytest.raises(AssertionError) as caught:
                assert_fp16_equal(cached, reference.encode([img.crop(bad)]), f"{name} {what}")
            ratio = float(re.search(r"= ([0-9.e+]+)x the tolerance", str(caught.value)).group(1))
            ratios[what] = min(ratios.get(what, np.inf), ratio)
    # how far above the tolerance the smallest one-pixel error of this clip lies (pytest -s shows it)
    print(f"one-pixel crop errors of {video_id}: worst coordinate / tolerance, least over its boxed frames: {ratios}")
    assert len(ratios) == 2


def test_fp16_check_passes_float32_kernel_noise_and_fails_a_real_error():
    """``assert_fp16_equal`` itself: last-bit float32 noise passes wherever it lands, a 3% error does not."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (64, 64)).astype(np.float32)  # feature vectors of length ~8, like the tiny model's
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    # Kernel noise: a few float32 eps of the vector's length on every coordinate (measured: <= 2.3e-7 * ||v||).
    noise = 3e-7 * norm * rng.uniform(-1, 1, a.shape).astype(np.float32)
    # Coordinates where float16 rounding is most fragile: just either side of the rounding midpoint below a
    # binade edge (one copy rounds down, the other up to the edge, where the ulp doubles), exactly on an
    # edge, and near zero (float16 subnormals), where the noise is many times the coordinate's own ulp.
    edges = np.float32([0.25, 0.5, 1.0, 2.0])
    noise[:, :4] = 3e-7 * norm * np.sign(noise[:, :4])
    a[:, :4] = edges - np.spacing(edges.astype(np.float16)).astype(np.float32) / 4 - noise[:, :4] / 2
    a[:, 4:8] = [0.25, -0.5, 1.0, 2.0]
    a[:, 8:12] = [2.0**-12, -1e-4, 3e-6, 0.0]
    b = a + noise
    assert (a[:, :4].astype(np.float16) != b[:, :4].astype(np.float16)).all()  # rounded to either side
    old_ulp = np.spacing(np.abs(b.astype(np.float16))).astype(np.float32)
    # the failure seen on AMD: some values differ by more than one float16 ulp of their own
    assert (np.abs(a.astype(np.float16).astype(np.float32) - b.astype(np.float16)) > old_ulp).any()
    for x, y in ((a, b), (b, a)):
        assert_fp16_equal(x.astype(np.float16), y, "float16 vs float32")
        assert_fp16_equal(x.astype(np.float16), y.astype(np.float16).astype(np.float32), "float16 vs float16")

    typical = np.argsort(np.abs(a[0, 12:]))[26] + 12  # a coordinate of median size (~0.7)
    for rel in (0.03, -0.03):
        wrong = a.copy()
        wrong[0, typical] *= 1 + rel
        with pytest.raises(AssertionError, match=rf"worst at \(0, {typical}\)"):
            assert_fp16_equal(wrong.astype(np.float16), b, f"{rel:+.0%} on one coordinate")
    wrong = a.astype(np.float16)
    wrong[5, 20] = np.nan
    with pytest.raises(AssertionError, match=r"worst at \(5, 20\)"):
        assert_fp16_equal(wrong, b, "NaN")


def test_crop_body_and_frame_stride(tmp_path, dataset, clip_model, reference):
    out = tmp_path / "body.zarr"
    settings = settings_for(dataset, out, views=1, crop_body=True, body_boxes=dataset.body_boxes, frame_stride=2)
    summary = extract(settings, clip_model)
    cache = FeatureCache.open(out)
    assert cache.fingerprint["crop_body"] is True and cache.fingerprint["frame_stride"] == 2 and cache.views == 1
    boxes, bodies = dataset.boxes(), json.loads(dataset.body_boxes.read_text())
    for video_id in cache.video_ids:
        frames = sorted((dataset.root / video_id).glob("*.jpg"))[::2]
        assert cache.frame_names(video_id) == [f.name for f in frames]
        face, context = zip(*(reference.crops(f, boxes[video_id].get(f.name), bodies[video_id]) for f in frames))
        assert_fp16_equal(cache.features(video_id, "face"), reference.encode(face), video_id)
        assert_fp16_equal(cache.features(video_id, "context"), reference.encode(context), video_id)
    assert summary.frames == sum(len(range(0, len(list((dataset.root / v).glob("*.jpg"))), 2)) for v in cache.video_ids)


# --------------------------------------------------------------------------- bad input


def _snapshot(path: Path) -> dict:
    """Every file under ``path`` with its inode, mtime and bytes: equal snapshots = nothing touched."""
    return {
        str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(path.rglob("*")) if p.is_file()
    }


def _set_line(ann: Path, lineno: int, text: str) -> None:
    lines = ann.read_text().splitlines()
    lines[lineno - 1] = text
    ann.write_text("\n".join(lines) + "\n")


def _set_box(ds: Dataset, video_id: str, frame: str, box) -> None:
    boxes = ds.boxes()
    boxes[video_id][frame] = box
    ds.face_boxes.write_text(json.dumps(boxes))


def _middle_frame(ds: Dataset, video_id: str) -> Path:
    frames = sorted((ds.root / video_id).glob("*.jpg"))
    return frames[len(frames) // 2]


def _boxed_frame(ds: Dataset, video_id: str) -> str:
    boxed = sorted(ds.boxes()[video_id])
    return boxed[len(boxed) // 2]


# Bad input found while parsing (before any store is opened): mutate(ds, ann, line, video_id) -> fragments.
EARLY = {
    "malformed line": lambda ds, ann, n, v: (_set_line(ann, n, f"{v} 7"), ["expected '<clip_dir> <num_frames> <label>'"]),
    "label not a number": lambda ds, ann, n, v: (_set_line(ann, n, f"{v} 7 sad"), ["must be integers"]),
    "label 0": lambda ds, ann, n, v: (_set_line(ann, n, f"{v} 7 0"), ["label 0 is outside 1..5"]),
    "label above C": lambda ds, ann, n, v: (_set_line(ann, n, f"{v} 7 6"), ["label 6 is outside 1..5"]),
    "missing clip directory": lambda ds, ann, n, v: (
        shutil.rmtree(ds.root / v), [f"clip directory {ds.root / v} does not exist"]),
    "empty clip directory": lambda ds, ann, n, v: (
        [p.unlink() for p in (ds.root / v).iterdir()], [f"clip directory {ds.root / v} holds no image files"]),
}
# Bad input found while extracting (in the data-loader): the frame file is named.
LATE = {
    "corrupt image": lambda ds, v: (
        _middle_frame(ds, v).write_bytes(b"\xff\xd8 not really a jpeg " * 20),
        [str(_middle_frame(ds, v)), "cannot read image"]),
    "truncated image": lambda ds, v: (
        _middle_frame(ds, v).write_bytes(_middle_frame(ds, v).read_bytes()[:600]),
        [str(_middle_frame(ds, v)), "cannot read image"]),
    "face box wholly outside the image": lambda ds, v: (
        _set_box(ds, v, _boxed_frame(ds, v), [300, 200, 340, 240]),
        [f"face box of {ds.root / v / _boxed_frame(ds, v)}", "has no area inside the 128x96 image"]),
    "face box with no area after clipping": lambda ds, v: (
        _set_box(ds, v, _boxed_frame(ds, v), [-30, 10, 0, 40]),
        [f"face box of {ds.root / v / _boxed_frame(ds, v)}", "[-30.0, 10.0, 0.0, 40.0] has no area"]),
}


@pytest.mark.parametrize("case", list(EARLY))
def test_bad_annotation_stops_with_file_and_line_and_leaves_the_store_alone(case, tmp_path, dataset, zarr_cache, weights):
    ds = dataset.copy(tmp_path / "ds")
    ann, lineno, video_id = ds.lines()[-1]
    _, fragments = EARLY[case](ds, ann, lineno, video_id)
    out = tmp_path / "cache.zarr"
    shutil.copytree(zarr_cache[0], out)  # a store from an earlier run, with the same fingerprint
    before = _snapshot(out)
    result = run_cli(extract_args(ds, out, weights, "--views", "2", "--workers", "0"))
    assert result.exit_code == 2, result.output
    assert_in_output(f"error: {ann}:{lineno}: ", result.output)
    for fragment in fragments:
        assert_in_output(fragment, result.output)
    assert "Traceback" not in result.output
    assert _snapshot(out) == before


@pytest.mark.parametrize("case", list(BAD_BOX_FILES := {
    "box is not 4 numbers": ("[1, 2, 3]", "a box must be [left, top, right, bottom] numbers, got [1, 2, 3]"),
    "not JSON": ("[1, 2, 3, 4", "not valid JSON"),
}))
def test_bad_face_box_file_stops_with_its_name(case, tmp_path, dataset, weights):
    ds = dataset.copy(tmp_path / "ds")
    value, fragment = BAD_BOX_FILES[case]
    video_id = ds.video_ids()[0]
    text = ds.face_boxes.read_text()
    frame = _boxed_frame(ds, video_id)
    boxes = ds.boxes()
    boxes[video_id][frame] = "@@"
    ds.face_boxes.write_text(json.dumps(boxes).replace('"@@"', value))
    assert ds.face_boxes.read_text() != text
    result = run_cli(extract_args(ds, tmp_path / "c.zarr", weights))
    assert result.exit_code == 2, result.output
    assert_in_output(f"error: {ds.face_boxes}", result.output)
    assert_in_output(fragment, result.output)
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
@pytest.mark.parametrize("case", list(LATE))
def test_bad_frame_stops_keeps_finished_clips_and_resumes_after_the_fix(case, fmt, tmp_path, dataset, zarr_cache, weights):
    ds = dataset.copy(tmp_path / "ds")
    video_id = ds.video_ids()[-1]  # extracted last: every other clip is finished before it fails
    originals = {p: p.read_bytes() for p in [ds.face_boxes, *sorted((ds.root / video_id).glob("*.jpg"))]}
    _, fragments = LATE[case](ds, video_id)
    out = tmp_path / f"cache.{fmt}"
    args = extract_args(ds, out, weights, "--views", "2", "--workers", "0", "--batch-size", "2")
    result = run_cli(args)
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert_in_output(fragment, result.output)
    assert "Traceback" not in result.output

    staged = out if fmt == "zarr" else out.with_name(out.name + ".partial.zarr")
    partial = FeatureCache.open(staged)
    assert sorted(partial.video_ids) == sorted(ds.video_ids()[:-1])  # nothing finished was lost
    full = FeatureCache.open(zarr_cache[0])
    for v in partial.video_ids:
        assert_fp16_equal(partial.clip(v), full.clip(v).astype(np.float32), v)

    for path, data in originals.items():  # fix the input and run the same command again
        path.write_bytes(data)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(out)
    assert cache.attrs["summary"]["clips_extracted"] == 1
    assert cache.attrs["summary"]["clips_already_done"] == len(ds.video_ids()) - 1
    assert sorted(cache.video_ids) == sorted(ds.video_ids())
    for v in cache.video_ids:
        assert_fp16_equal(cache.clip(v), full.clip(v).astype(np.float32), v)


def test_box_that_overhangs_the_edge_is_clipped(tmp_path, dataset, weights, reference):
    ds = dataset.copy(tmp_path / "ds")
    video_id = ds.video_ids()[0]
    frame = _boxed_frame(ds, video_id)
    _set_box(ds, video_id, frame, [-15, 60, 30, 120])  # left and bottom outside the 128x96 frame
    out = tmp_path / "c.zarr"
    result = run_cli(extract_args(ds, out, weights, "--workers", "0"))
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(out)
    index = cache.frame_names(video_id).index(frame)
    face, _ = reference.crops(ds.root / video_id / frame, [-15, 60, 30, 120])
    assert face.size == (50, 56)  # x 0..50, y 40..96
    assert_fp16_equal(cache.features(video_id, "face")[index : index + 1], reference.encode([face]))


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_skip_bad_goes_on_and_lists_the_skipped_clips(fmt, tmp_path, dataset, zarr_cache, weights):
    ds = dataset.copy(tmp_path / "ds")
    lines = ds.lines()
    bad = {}  # video id -> (annotation file:line, reason fragment)
    (ann, n, v) = lines[1]
    LATE["corrupt image"](ds, v)
    bad[v] = (f"{ann}:{n}", f"{_middle_frame(ds, v)}: cannot read image")
    (ann, n, v) = lines[4]
    LATE["face box wholly outside the image"](ds, v)
    bad[v] = (f"{ann}:{n}", f"face box of {ds.root / v / _boxed_frame(ds, v)}")
    (ann, n, v) = lines[6]
    _set_line(ann, n, f"{v} 7 9")
    bad[v] = (f"{ann}:{n}", "label 9 is outside 1..5")
    (ann, n, v) = lines[-1]
    shutil.rmtree(ds.root / v)
    bad[v] = (f"{ann}:{n}", "does not exist")

    out = tmp_path / f"cache.{fmt}"
    result = run_cli(extract_args(ds, out, weights, "--views", "2", "--workers", "0", "--batch-size", "4", "--skip-bad"))
    assert result.exit_code == 0, result.output
    assert re.search(r"clips skipped \(bad input\)\s*│\s*4\s", result.output), result.output
    assert re.search(r"clips extracted\s*│\s*8\s", result.output), result.output
    cache = FeatureCache.open(out)
    assert sorted(cache.video_ids) == sorted(set(ds.video_ids()) - set(bad))
    skipped = cache.attrs["skipped"]
    assert len(skipped) == 4
    for source, fragment in bad.values():
        assert_in_output(f"skipped {source}: ", result.output)
        assert_in_output(fragment, result.output)
        assert [s for s in skipped if s.startswith(f"{source}: ") and fragment in s], (source, skipped)
    full = FeatureCache.open(zarr_cache[0])
    for v in cache.video_ids:
        assert_fp16_equal(cache.clip(v), full.clip(v).astype(np.float32), v)


# --------------------------------------------------------------------------- kill and resume

# `caer extract` exactly as the console script runs it, with data loading slowed to 0.3 s a clip (a slow disk),
# so that a SIGKILL lands part-way on any machine.
THROTTLED_CAER = """
import sys, time
import caer.pipeline.extract as ex
_getitem = ex.ClipFrames.__getitem__
def slow_getitem(self, i):
    time.sleep({delay})
    return _getitem(self, i)
ex.ClipFrames.__getitem__ = slow_getitem
sys.argv[0] = "caer"
from caer.cli import main
main()
"""


def _done_keys(store: Path) -> set[str]:
    """Clips whose `done` flag is set, read straight from the Zarr metadata files (tolerates a live writer)."""
    done = set()
    for meta in store.glob("clips/*/zarr.json"):
        try:
            if json.loads(meta.read_text())["attributes"].get("done"):
                done.add(meta.parent.name)
        except (OSError, ValueError, KeyError):
            pass
    return done


def _chunk_stamps(store: Path, keys) -> dict:
    return {
        str(p.relative_to(store)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for key in keys for p in (store / "clips" / key).rglob("*") if p.is_file()
    }


def _kill_part_way(args: list[str], staged: Path, log: Path, total: int) -> set[str]:
    """Run extraction in a subprocess and SIGKILL it once a few clips are done; returns the done clips."""
    for delay in (0.3, 0.6, 1.2):  # slower again only if a fast machine finished before the kill
        shutil.rmtree(staged, ignore_errors=True)
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-c", THROTTLED_CAER.format(delay=delay), *args],
                                    stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while proc.poll() is None and len(_done_keys(staged)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = _done_keys(staged)
        if proc.returncode == -signal.SIGKILL and 0 < len(done) < total:
            return done
        assert proc.returncode in (0, -signal.SIGKILL), log.read_text()
    pytest.fail(f"could not kill the extraction part-way:\n{log.read_text()}")


@pytest.fixture(scope="module")
def clean_b2(tmp_path_factory, dataset, clip_model):
    """An uninterrupted extraction with the settings of the kill-and-resume runs (batch size 2)."""
    out = tmp_path_factory.mktemp("clean") / "clean.zarr"
    extract(settings_for(dataset, out, batch_size=2), clip_model)
    return FeatureCache.open(out)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_sigkill_part_way_then_resume_equals_a_clean_run(fmt, tmp_path, dataset, weights, clean_b2, monkeypatch):
    # --batch-size 2 = one frame's face and context per batch, so every run encodes the very same batches
    # and "equal" can mean bit-for-bit (CPU matmuls may round differently for other batch shapes).
    out = tmp_path / f"cache.{fmt}"
    staged = out if fmt == "zarr" else out.with_name(out.name + ".partial.zarr")
    args = extract_args(dataset, out, weights, "--views", "2", "--workers", "0", "--batch-size", "2")
    ids = dataset.video_ids()
    done = _kill_part_way(args, staged, tmp_path / "killed.log", len(ids))
    print(f"SIGKILL with {len(done)} of {len(ids)} clips done")
    if fmt == "h5":
        assert not out.exists()  # the .h5 is only built, in one rename, when everything is done
    assert FeatureCache.open(staged).video_ids  # the killed store opens, showing the finished clips
    stamps = _chunk_stamps(staged, done)
    assert stamps

    # Re-run the same command; record what gets encoded and written.
    encoded, written = [], []
    encode, write = extract_module.encode_pixels, extract_module.write_clips
    monkeypatch.setattr(extract_module, "encode_pixels", lambda c, px, *a: encoded.append(len(px)) or encode(c, px, *a))
    monkeypatch.setattr(extract_module, "write_clips", lambda clips: written.extend(c[0] for c in clips) or write(clips))
    stamps_at_finish: dict = {}
    finish = CacheWriter.finish
    monkeypatch.setattr(CacheWriter, "finish", lambda self, *a: (
        stamps_at_finish.update(_chunk_stamps(staged, done)), finish(self, *a))[1])
    result = run_cli(args)
    assert result.exit_code == 0, result.output

    remaining = [v for v in ids if store_key(v) not in done]
    assert sorted(written) == sorted(remaining)  # finished clips were neither encoded nor written again
    assert sum(encoded) == 2 * sum(clean_b2.num_frames(v) for v in remaining)
    assert re.search(rf"clips already done\s*│\s*{len(done)}\s", result.output), result.output
    assert re.search(rf"clips extracted\s*│\s*{len(remaining)}\s", result.output), result.output
    assert stamps_at_finish == stamps  # the finished clips' chunk files were not rewritten
    if fmt == "zarr":
        assert _chunk_stamps(out, done) == stamps
    else:
        assert not staged.exists()  # the staging store is gone once the .h5 is built

    cache = FeatureCache.open(out)
    assert cache.format == fmt
    assert cache.video_ids and sorted(cache.video_ids) == sorted(clean_b2.video_ids)
    assert cache.fingerprint == clean_b2.fingerprint
    assert cache.attrs["splits"] == clean_b2.attrs["splits"]
    for v in ids:
        assert cache.label(v) == clean_b2.label(v) and cache.frame_names(v) == clean_b2.frame_names(v)
        assert np.array_equal(cache.clip(v), clean_b2.clip(v)), v

    # On a finished cache the same command is a no-op.
    before = _snapshot(out) if fmt == "zarr" else None
    written.clear()
    encoded.clear()
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert re.search(r"clips extracted\s*│\s*0\s", result.output) and written == [] and encoded == []
    assert re.search(rf"clips already done\s*│\s*{len(ids)}\s", result.output), result.output
    if fmt == "zarr":
        changed = {k for k in set(before) | set(_snapshot(out)) if before.get(k) != _snapshot(out).get(k)}
        assert changed <= {"zarr.json"}, changed  # only the root attributes (the run's summary)
    again = FeatureCache.open(out)
    for v in ids:
        assert np.array_equal(again.clip(v), clean_b2.clip(v)), v


# --------------------------------------------------------------------------- protocol checks on the lists

def test_a_num_frames_column_that_disagrees_is_counted_and_warned_about_once(tmp_path, dataset, weights):
    ds = dataset.copy(tmp_path / "ds")
    ann = ds.annotations[0]
    lines = ann.read_text().splitlines()
    for i in (0, 1):  # two clips list one frame too many
        clip_dir, n, label = lines[i].split()
        lines[i] = f"{clip_dir} {int(n) + 1} {label}"
    ann.write_text("\n".join(lines) + "\n")
    out = tmp_path / "c.zarr"
    result = run_cli(extract_args(ds, out, weights, "--workers", "0"))
    assert result.exit_code == 0, result.output
    assert result.output.count("list another num_frames than their folder holds") == 1
    assert_in_output(f"2 of {len(ds.video_ids())} clips", result.output)
    assert_in_output(f"first: {ann}:1 lists", result.output)
    assert FeatureCache.open(out).attrs["summary"]["clips_with_other_frame_count"] == 2


def test_a_clip_listed_in_two_splits_is_refused_before_anything_is_written(tmp_path, dataset, weights, monkeypatch):
    """... and before the encoder loads (with real weights, a download or a minute)."""

    def no_encoder(cfg):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(extract_module, "load_encoder", no_encoder)
    ds = dataset.copy(tmp_path / "ds")
    train, val = ds.annotations[0], ds.annotations[1]
    first = train.read_text().splitlines()[0]
    val.write_text(val.read_text() + first + "\n")
    out = tmp_path / "c.zarr"
    result = run_cli(extract_args(ds, out, weights, "--workers", "0"))
    assert result.exit_code == 2, result.output
    n = len(val.read_text().splitlines())
    assert_in_output(f"{val}:{n}: clip '{first.split()[0]}' is also listed at {train}:1", result.output)
    assert not out.exists()


def test_non_finite_features_stop_the_run_naming_the_clip_and_keep_the_others(tmp_path, dataset, weights, monkeypatch):
    """An encoder that overflows (float16 under autocast on a GPU) must not leave NaN in the cache: the clip is named,
    the clips finished before it are kept, and a re-run writes the rest."""
    ids = dataset.video_ids()
    poisoned = ids[4]
    frames_before = sum(len(list((dataset.root / v).glob("*.jpg"))) for v in ids[:4])
    calls = []
    encode = extract_module.encode_pixels

    def overflowing(backbone, pixels, *a):
        feats = encode(backbone, pixels, *a)
        calls.append(len(pixels))
        return feats.fill_(float("inf")) if len(calls) == frames_before + 1 else feats  # a frame of `poisoned`

    monkeypatch.setattr(extract_module, "encode_pixels", overflowing)
    out = tmp_path / "cache.zarr"
    args = extract_args(dataset, out, weights, "--views", "1", "--workers", "0", "--batch-size", "2")
    result = run_cli(args)
    assert result.exit_code == 2, result.output
    assert_in_output(f"{poisoned}: the encoder gave non-finite features", result.output)
    assert "Traceback" not in result.output
    partial = FeatureCache.open(out)
    assert poisoned not in partial.video_ids and set(ids[:4]) <= set(partial.video_ids)
    for v in partial.video_ids:
        assert np.isfinite(partial.clip(v)).all(), v

    monkeypatch.setattr(extract_module, "encode_pixels", encode)
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(out)
    assert sorted(cache.video_ids) == sorted(ids) and np.isfinite(cache.clip(poisoned)).all()


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_a_run_with_nothing_to_extract_keeps_the_store_s_summary(fmt, tmp_path, dataset, weights):
    """Re-running a finished extraction writes no clip, and the store's summary still describes the run that did."""
    out = tmp_path / f"c.{fmt}"
    assert run_cli(extract_args(dataset, out, weights, "--format", fmt)).exit_code == 0
    first = FeatureCache.open(out).attrs["summary"]
    assert first["clips_extracted"] > 0 and first["frames"] > 0
    result = run_cli(extract_args(dataset, out, weights, "--format", fmt))
    assert result.exit_code == 0, result.output
    assert FeatureCache.open(out).attrs["summary"] == first


def test_clips_whose_box_entry_is_empty_are_warned_about(tmp_path, dataset, weights):
    """caer boxes writes an empty entry where it found no face: extraction says so before the frames are encoded."""
    ds = dataset.copy(tmp_path / "ds")
    boxes = json.loads(ds.face_boxes.read_text())
    first = sorted(boxes)[0]
    boxes[first] = {}
    ds.face_boxes.write_text(json.dumps(boxes))
    result = run_cli(extract_args(ds, tmp_path / "c.zarr", weights, "--workers", "0"))
    assert result.exit_code == 0, result.output
    assert_in_output(f"1 of {len(boxes)} clips have an entry without any face box", result.output)
