"""The feature cache: Zarr and HDF5 hold the same thing, the reader API, the on-disk schema, fingerprints."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from caer.cache import SCHEMA_VERSION, CacheError, CacheWriter, FeatureCache, store_key
from caer.cache.schema import fingerprint
from caer.model.encoder import save_random_weights
from conftest import MODEL, assert_fp16_equal, assert_in_output, extract_args, run_cli


def _snapshot(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def _annotation_labels(dataset) -> dict[str, int]:
    out = {}
    for ann in dataset.annotations:
        for line in ann.read_text().split("\n"):
            if line.strip():
                clip_dir, _, label = line.split()
                out[clip_dir] = int(label)
    return out


# --------------------------------------------------------------------------- both backends, one content

def test_zarr_and_h5_hold_the_same_numbers(zarr_cache, h5_cache):
    z, h = FeatureCache.open(zarr_cache[0]), FeatureCache.open(h5_cache)
    assert (z.format, h.format) == ("zarr", "h5")
    assert z.video_ids == h.video_ids and len(z.video_ids) == 12
    assert np.array_equal(z.labels, h.labels)
    assert z.fingerprint == h.fingerprint
    assert z.attrs["splits"] == h.attrs["splits"] and z.attrs["skipped"] == h.attrs["skipped"] == []
    for v in z.video_ids:
        assert z.frame_names(v) == h.frame_names(v)
        a, b = z.clip(v), h.clip(v)
        assert a.dtype == b.dtype == np.float16
        # the h5 run decoded in 2 worker processes, the zarr run in-process: bit-identical all the same
        assert np.array_equal(a, b), v
        for stream in ("face", "context"):
            for view in (0, 1):
                assert np.array_equal(z.features(v, stream, view), h.features(v, stream, view))


@pytest.fixture(params=["zarr", "h5"])
def any_cache(request, zarr_cache, h5_cache):
    return FeatureCache.open(zarr_cache[0] if request.param == "zarr" else h5_cache)


def test_reader_api(any_cache, dataset):
    cache = any_cache
    labels = _annotation_labels(dataset)
    assert sorted(cache.video_ids) == sorted(labels)
    for v, label in zip(cache.video_ids, cache.labels):
        assert label == labels[v] - 1 == cache.label(v)  # 0-based
        frames = sorted((dataset.root / v).glob("*.jpg"))
        assert cache.num_frames(v) == len(frames) and cache.frame_names(v) == [f.name for f in frames]
        for stream in ("face", "context"):
            for view in (0, 1):
                feats = cache.features(v, stream, view)
                assert feats.dtype == np.float16 and feats.shape == (len(frames), 64)
                assert np.isfinite(feats).all() and np.abs(feats).max() > 0
        assert cache.clip(v).shape == (2, 2, len(frames), 64)
        assert v in cache
    assert cache.labels.dtype == np.int64
    assert set(cache.labels) == set(range(5))
    assert cache.views == 2 and cache.embed_dim == 64
    assert cache.attrs["caer_schema"] == SCHEMA_VERSION
    assert {k: sorted(v) for k, v in cache.attrs["splits"].items()} == {
        s: sorted(line.split()[0] for line in (dataset.root / f"{s}.txt").read_text().split("\n") if line)
        for s in ("train", "val", "test")
    }
    v = cache.video_ids[0]
    assert not np.array_equal(cache.features(v, "face"), cache.features(v, "context"))
    assert not np.array_equal(cache.features(v, "face", 0), cache.features(v, "face", 1))
    with pytest.raises(ValueError, match="stream must be one of"):
        cache.features(v, "body")
    with pytest.raises(ValueError, match="view 2 out of range"):
        cache.features(v, "face", 2)
    with pytest.raises(CacheError, match="'nope' is not in the cache"):
        cache.features("nope")
    before = {u: cache.clip(u) for u in cache.video_ids}
    cache.load_into_memory()
    assert all(np.array_equal(cache.clip(u), before[u]) for u in cache.video_ids)


def test_open_refuses_what_is_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="no feature cache here"):
        FeatureCache.open(tmp_path / "missing.zarr")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CacheError, match="not a caer feature cache"):
        FeatureCache.open(tmp_path / "dir")
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="not a readable caer HDF5 cache"):
        FeatureCache.open(tmp_path / "x.h5")


# --------------------------------------------------------------------------- on-disk schema (README) with plain zarr / h5py

def test_plain_zarr_and_h5py_read_the_documented_schema(zarr_cache, h5_cache):
    z = zarr.open_group(str(zarr_cache[0]), mode="r")
    assert z.attrs["caer_schema"] == SCHEMA_VERSION and z.attrs["fingerprint"]["views"] == 2
    keys = sorted(z["clips"].array_keys())
    assert len(keys) == 12
    for key in keys:
        arr = z["clips"][key]
        assert arr.dtype == np.float16 and arr.shape[:2] == (2, 2) and arr.shape[3] == 64
        assert arr.chunks == arr.shape  # one chunk per clip: no two clips share a chunk
        assert arr.attrs["done"] is True and store_key(arr.attrs["video_id"]) == key
        assert len(arr.attrs["frame_names"]) == arr.shape[2]
    with h5py.File(h5_cache, "r") as f:
        assert json.loads(f.attrs["caer_schema"]) == SCHEMA_VERSION
        assert json.loads(f.attrs["fingerprint"]) == dict(z.attrs["fingerprint"])
        assert sorted(f["clips"]) == keys
        for key in keys:
            ds = f["clips"][key]
            assert ds.dtype == np.float16 and ds.shape == z["clips"][key].shape
            assert json.loads(ds.attrs["video_id"]) == z["clips"][key].attrs["video_id"]
            assert np.array_equal(ds[...], z["clips"][key][...])
    # the HDF5 run leaves no staging store or temporary file behind (only the writers' lock file, which holds no lock)
    assert sorted(p.name for p in h5_cache.parent.iterdir()) == [h5_cache.name, h5_cache.name + ".lock"]


def test_format_flag_overrides_the_suffix(tmp_path, dataset, weights):
    out = tmp_path / "features.cache"
    result = run_cli(extract_args(dataset, out, weights, "--format", "h5", "--views", "1", "--workers", "0"))
    assert result.exit_code == 0, result.output
    assert out.is_file() and h5py.is_hdf5(out)
    assert FeatureCache.open(out).format == "h5"


@pytest.mark.parametrize("name, fmt", [("features.zarr", "h5"), ("features.h5", "zarr"), ("features.hdf5", "zarr")])
def test_a_format_flag_that_the_name_contradicts_is_refused(tmp_path, dataset, weights, name, fmt):
    out = tmp_path / name
    result = run_cli(extract_args(dataset, out, weights, "--format", fmt, "--views", "1", "--workers", "0"))
    assert result.exit_code == 2 and not out.exists(), result.output
    assert_in_output(f"--format {fmt} contradicts the name {name}", result.output)


def test_disjoint_writers_share_one_zarr_store(tmp_path):
    """Several writers (later: one per GPU) write disjoint clips into one store at the same time."""
    fp = fingerprint({"model": "m"}, margin=20, crop_body=False, views=1, frame_stride=1)
    out = tmp_path / "shared.zarr"
    writers = [CacheWriter(out, fp), CacheWriter(out, fp, lock=False)]  # rank 0 holds the lock for the run
    rng = np.random.default_rng(0)
    clips = {f"clips/{i:02d}": rng.standard_normal((2, 1, 3 + i % 4, 8)).astype(np.float16) for i in range(16)}

    def work(w: int) -> None:
        for i, (v, feats) in enumerate(clips.items()):
            if i % 2 == w:
                writers[w].write(v, feats, {"label": i % 3, "frame_names": [f"{j}.jpg" for j in range(feats.shape[2])],
                                             "frames_without_face": 0})

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, [0, 1]))
    writers[0].finish({"train": list(clips)}, [], {})
    cache = FeatureCache.open(out)
    assert sorted(cache.video_ids) == sorted(clips)
    for v, feats in clips.items():
        assert np.array_equal(cache.clip(v), feats)


# --------------------------------------------------------------------------- fingerprints

@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    return save_random_weights(MODEL, tmp_path_factory.mktemp("w") / "other.pt", seed=1)


CHANGES = {
    "margin": (["--margin", "10"], "margin: store has 20.0, this run has 10.0"),
    "views": (["--views", "1"], "views: store has 2, this run has 1"),
    "frame stride": (["--frame-stride", "3"], "frame_stride: store has 1, this run has 3"),
    "crop body": (["--crop-body", "--body-boxes", "BODY"], "crop_body: store has False, this run has True"),
    "weights": (["--pretrained", "OTHER"], "encoder.weights: store has 'sha256:"),
}


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_other_fingerprint_is_refused_and_nothing_is_touched(change, fmt, tmp_path, dataset, zarr_cache, h5_cache,
                                                             weights, other_weights):
    out = tmp_path / f"c.{fmt}"
    (shutil.copytree if fmt == "zarr" else shutil.copy2)(zarr_cache[0] if fmt == "zarr" else h5_cache, out)
    before = _snapshot(out)
    flags, fragment = CHANGES[change]
    flags = [{"BODY": str(dataset.body_boxes), "OTHER": str(other_weights)}.get(f, f) for f in flags]
    args = extract_args(dataset, out, weights, "--views", "2", "--workers", "0")
    result = run_cli(args + flags)  # later flags win
    assert result.exit_code == 2, result.output
    assert_in_output(f"error: {out} was extracted with other settings:", result.output)
    assert_in_output(fragment, result.output)
    assert_in_output("Use another output path, or --overwrite to replace it.", result.output)
    assert _snapshot(out) == before
    assert not out.with_name(out.name + ".partial.zarr").exists()


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_overwrite_replaces_a_store_with_another_fingerprint(fmt, tmp_path, dataset, zarr_cache, h5_cache, weights):
    out = tmp_path / f"c.{fmt}"
    (shutil.copytree if fmt == "zarr" else shutil.copy2)(zarr_cache[0] if fmt == "zarr" else h5_cache, out)
    result = run_cli(extract_args(dataset, out, weights, "--views", "1", "--margin", "10", "--workers", "0", "--overwrite"))
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(out)
    assert cache.fingerprint["margin"] == 10 and cache.views == 1
    assert cache.attrs["summary"]["clips_extracted"] == 12 and cache.attrs["summary"]["clips_already_done"] == 0
    old = FeatureCache.open(zarr_cache[0])
    v = cache.video_ids[0]
    assert cache.clip(v).shape[1] == 1 and not np.array_equal(cache.features(v, "face"), old.features(v, "face"))
    assert_fp16_equal(cache.features(v, "context"), old.features(v, "context").astype(np.float32))  # margin: face only


def test_a_folder_or_file_that_is_not_a_cache_is_left_alone(tmp_path, dataset, weights):
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    not_h5 = tmp_path / "mine.h5"
    not_h5.write_text("precious too")
    for out, message in ((folder, "exists but is not a caer cache; refusing to touch it"),
                         (not_h5, "exists but is not a readable HDF5 file")):
        before = _snapshot(out)
        result = run_cli(extract_args(dataset, out, weights, "--workers", "0"))
        assert result.exit_code == 2, result.output
        assert_in_output(f"error: {out}", result.output)
        assert_in_output(message, result.output)
        assert _snapshot(out) == before


# --------------------------------------------------------------------------- damaged stores: every error names what to fix

VICTIM_INDEX = 3


def _cut(path: Path, size: int) -> None:
    """Keep the first ``size`` bytes of a file, as a copy or a disk fault cut short would."""
    path.write_bytes(path.read_bytes()[:size])


def _zarr_copy(zarr_cache, tmp_path, dataset) -> tuple[Path, str]:
    out = tmp_path / "c.zarr"
    shutil.copytree(zarr_cache[0], out)
    return out, dataset.video_ids()[VICTIM_INDEX]


def test_a_clip_whose_metadata_is_damaged_is_listed_named_and_re_extracted(tmp_path, dataset, weights, zarr_cache):
    out, victim = _zarr_copy(zarr_cache, tmp_path, dataset)
    meta = out / "clips" / store_key(victim) / "zarr.json"
    _cut(meta, 400)
    cache = FeatureCache.open(out)  # the other clips are as good as before
    assert victim in cache and victim not in cache.video_ids and len(cache.video_ids) == 11
    with pytest.raises(CacheError, match=f"clip '{victim}' is damaged \\(its metadata file {meta} cannot be read: "):
        cache.clip(victim)
    verify = run_cli(["cache", "verify", str(out)])
    assert verify.exit_code == 1, verify.output
    problem = f"metadata unreadable ({meta.relative_to(out)}: Expecting"
    assert cache.verify()[victim].startswith(problem)
    assert re.sub(r"[\s│]", "", f"{victim}{problem}") in re.sub(r"[\s│]", "", verify.output), verify.output
    repair = run_cli(extract_args(dataset, out, weights, "--views", "2", "--workers", "0"))
    assert repair.exit_code == 0, repair.output
    summary = FeatureCache.open(out).attrs["summary"]
    assert (summary["clips_extracted"], summary["clips_already_done"]) == (1, 11)
    assert run_cli(["cache", "verify", str(out)]).exit_code == 0
    assert_fp16_equal(FeatureCache.open(out).clip(victim), FeatureCache.open(zarr_cache[0]).clip(victim).astype(np.float32))


def test_a_chunk_cut_short_is_a_damaged_clip_naming_cache_and_clip(tmp_path, dataset, zarr_cache):
    out, victim = _zarr_copy(zarr_cache, tmp_path, dataset)
    chunk = next(p for p in (out / "clips" / store_key(victim) / "c").rglob("*") if p.is_file())
    _cut(chunk, chunk.stat().st_size // 2)
    cache = FeatureCache.open(out)
    with pytest.raises(CacheError, match=f"{out}: clip '{victim}' is damaged \\(its data cannot be read: ValueError: "):
        cache.clip(victim)
    with pytest.raises(CacheError, match=f"run the same caer extract again to repair it \\(caer cache verify {out} "):
        cache.clip(victim)
    assert cache.verify()[victim].startswith("unreadable (ValueError: ")


def test_a_damaged_root_metadata_file_is_named_and_the_store_left_alone(tmp_path, dataset, weights, zarr_cache):
    out, _ = _zarr_copy(zarr_cache, tmp_path, dataset)
    _cut(out / "zarr.json", 1000)
    before = _snapshot(out)
    message = f"{out / 'zarr.json'}: the root metadata file of the store {out} cannot be read (Unterminated string"
    with pytest.raises(CacheError, match=re.escape(message)):
        FeatureCache.open(out)
    for args in (["cache", "verify", str(out)], extract_args(dataset, out, weights, "--workers", "0"),
                 extract_args(dataset, out, weights, "--workers", "0", "--overwrite")):
        result = run_cli(args)
        assert result.exit_code == 2, result.output
        assert_in_output(f"error: {message}", result.output)
        assert "not a caer" not in result.output
    assert _snapshot(out) == before


@contextlib.contextmanager
def _file_size_limit(size: int):
    """Writes past ``size`` bytes fail with EFBIG (File too large) in this process, as under `ulimit -f`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_root_attribute_write_that_fails_names_the_store(tmp_path):
    fp = fingerprint({"model": "m", "weights": "w" * 300}, margin=20, crop_body=False, views=1, frame_stride=1)
    out = tmp_path / "c.zarr"
    meta = str(out / "zarr.json")
    with _file_size_limit(200), pytest.raises(OSError) as opened:  # the fingerprint does not fit
        CacheWriter(out, fp)
    assert (opened.value.errno, opened.value.filename) == (errno.EFBIG, meta)
    writer = CacheWriter(out, fp)
    many = {"train": [f"clips/{i:04d}" for i in range(100)]}
    with _file_size_limit(os.path.getsize(meta) + 100):
        with pytest.raises(OSError) as recorded:
            writer.record_splits(many)
        with pytest.raises(OSError) as finished:
            writer.finish(many, [], {})
    assert (recorded.value.errno, recorded.value.filename) == (finished.value.errno, finished.value.filename) \
        == (errno.EFBIG, meta)
    writer.close()


@pytest.mark.parametrize("which", ["annotation file", "face boxes"])
def test_an_output_that_is_an_input_is_refused_before_any_lock(which, tmp_path, dataset, weights):
    ds = dataset.copy(tmp_path / "ds")
    target = ds.annotations[0] if which == "annotation file" else ds.face_boxes
    before = _snapshot(ds.root)
    result = run_cli(extract_args(ds, target, weights, "--workers", "0", "--overwrite"))
    assert result.exit_code == 2, result.output
    assert_in_output(f"error: --out {target} is the {which} {target}: write the output elsewhere", result.output)
    assert _snapshot(ds.root) == before  # no lock file, nothing written
