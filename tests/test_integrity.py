"""Nothing lost, nothing silent (README, "Guarantees"): one writer per store, checksummed clips that a re-run of
`caer extract` repairs, `caer cache verify`, and every complete clip written before a bad frame stops a run."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from caer.cache import CacheError, FeatureCache, store_key
from caer.data.datasets import CachedClips
from conftest import assert_fp16_equal, assert_in_output, extract_args, run_cli, squash

HOLD_THE_LOCK = """
import sys, time
from caer.cache import CacheWriter, fingerprint
CacheWriter(sys.argv[1], fingerprint({"model": "other"}, margin=20, crop_body=False, views=1, frame_stride=1))
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_a_second_writer_is_refused_naming_the_first_and_a_killed_writer_leaves_no_lock(fmt, tmp_path, dataset,
                                                                                         weights, zarr_cache):
    out = tmp_path / f"c.{fmt}"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = extract_args(dataset, out, weights, "--views", "2", "--workers", "0")
        refused = run_cli(args)
        assert refused.exit_code == 2, refused.output
        assert_in_output(f"error: {out} is being written by caer extract (pid {holder.pid}", refused.output)
        assert "Traceback" not in refused.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock is gone with it (its half-made store has another fingerprint: --overwrite)
    done = run_cli(extract_args(dataset, out, weights, "--views", "2", "--workers", "0", "--overwrite"))
    assert done.exit_code == 0, done.output
    cache, clean = FeatureCache.open(out), FeatureCache.open(zarr_cache[0])
    assert sorted(cache.video_ids) == sorted(clean.video_ids)
    for v in clean.video_ids:
        assert_fp16_equal(cache.clip(v), clean.clip(v).astype(np.float32), v)


def _damage(store, fmt: str, video_id: str) -> None:
    """Lose a clip's chunk file (zarr) or flip its values on disk (HDF5), leaving its metadata as it was."""
    if fmt == "zarr":
        chunks = [p for p in (store / "clips" / store_key(video_id)).rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert chunks
        for p in chunks:
            p.unlink()
    else:
        with h5py.File(store, "r+") as f:
            ds = f["clips"][store_key(video_id)]
            ds[...] = -ds[...]


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_a_damaged_clip_is_refused_when_read_listed_by_verify_and_repaired_by_a_rerun(fmt, tmp_path, dataset,
                                                                                      weights, zarr_cache, h5_cache):
    out = tmp_path / f"c.{fmt}"
    (shutil.copytree if fmt == "zarr" else shutil.copy2)(zarr_cache[0] if fmt == "zarr" else h5_cache, out)
    intact = run_cli(["cache", "verify", str(out)])
    assert intact.exit_code == 0
    assert_in_output("all 12 clips intact", intact.output)
    victim = dataset.video_ids()[3]
    _damage(out, fmt, victim)

    cache = FeatureCache.open(out)
    with pytest.raises(CacheError, match=f"clip '{victim}' is damaged"):
        cache.clip(victim)  # a lost chunk would otherwise read as zeros
    items = CachedClips(cache, [victim], [0], segments=4, train=True)
    with pytest.raises(CacheError, match="run the same caer extract again to repair it"):
        items[(0, 0)]  # training and evaluation read through the same check

    verify = run_cli(["cache", "verify", str(out)])
    assert verify.exit_code == 1, verify.output
    assert_in_output(victim, verify.output)
    assert_in_output("data does not match its checksum", verify.output)

    repair = run_cli(extract_args(dataset, out, weights, "--views", "2", "--workers", "0", "--batch-size", "16"))
    assert repair.exit_code == 0, repair.output
    assert_in_output("repairing: 1 finished clip(s) no longer match", repair.output)
    summary = FeatureCache.open(out).attrs["summary"]
    assert (summary["clips_extracted"], summary["clips_repaired"], summary["clips_already_done"]) == (1, 1, 11)
    assert run_cli(["cache", "verify", str(out)]).exit_code == 0
    assert_fp16_equal(FeatureCache.open(out).clip(victim), FeatureCache.open(zarr_cache[0]).clip(victim).astype(np.float32))


def test_verify_refuses_what_is_not_a_cache(tmp_path):
    result = run_cli(["cache", "verify", str(tmp_path / "nothing.zarr")])
    assert result.exit_code == 2 and "no feature cache here" in result.output


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_a_bad_frame_in_the_last_clip_keeps_every_clip_before_it(fmt, tmp_path, dataset, weights):
    """With the default batch of 256 images, the clips before the bad one still wait in the batch packer
    when the bad frame is met: they are encoded and written before the run stops."""
    ds = dataset.copy(tmp_path / "ds")
    last = ds.video_ids()[-1]
    frame = sorted((ds.root / last).glob("*.jpg"))[1]
    frame.write_bytes(b"\xff\xd8 not a jpeg " * 10)
    out = tmp_path / f"c.{fmt}"
    result = run_cli(extract_args(ds, out, weights, "--views", "2", "--workers", "0"))
    assert result.exit_code == 2, result.output
    assert_in_output(f"{frame}: cannot read image", result.output)
    staged = out if fmt == "zarr" else out.with_name(out.name + ".partial.zarr")
    assert sorted(FeatureCache.open(staged).video_ids) == sorted(ds.video_ids()[:-1])
    if fmt == "h5":  # the file is not built yet: the message says where its clips are and how to finish
        unbuilt = run_cli(["cache", "verify", str(out)])
        assert unbuilt.exit_code == 2, unbuilt.output
        assert_in_output(f"{out}: not built yet: an extraction into it stopped before the end, and its finished "
                         f"clips wait in {staged}", unbuilt.output)


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_skipped_clips_of_an_earlier_run_over_other_lists_are_kept(fmt, tmp_path, dataset, weights):
    """`extract train.txt --skip-bad` then `extract val.txt` into the same store: train's skipped clip stays recorded,
    so training leaves it out instead of stopping on it (HDF5 too, whose second run builds the file anew)."""
    ds = dataset.copy(tmp_path / "ds")
    train, val = ds.annotations[0], ds.annotations[1]
    bad = train.read_text().split()[0]
    frame = sorted((ds.root / bad).glob("*.jpg"))[0]
    frame.write_bytes(b"not a jpeg")
    out = tmp_path / f"c.{fmt}"
    base = ["extract", "--face-boxes", str(ds.face_boxes), "--out", str(out), "--model", "caer-tiny",
            "--pretrained", str(weights), "--device", "cpu", "--workers", "0"]
    assert run_cli([*base, str(train), "--skip-bad"]).exit_code == 0
    assert FeatureCache.open(out).attrs["skipped_clips"] == [bad]
    assert run_cli([*base, str(val)]).exit_code == 0
    attrs = FeatureCache.open(out).attrs
    assert attrs["skipped_clips"] == [bad] and any(line.startswith(f"{train}:1: ") for line in attrs["skipped"])
    assert run_cli(["cache", "verify", str(out)]).exit_code == 0  # the skipped clip is no missing one
    frame.write_bytes((dataset.root / bad / frame.name).read_bytes())  # fixed: the next run over train extracts it
    assert run_cli([*base, str(train)]).exit_code == 0
    attrs = FeatureCache.open(out).attrs
    assert attrs["skipped_clips"] == [] and attrs["skipped"] == [] and bad in FeatureCache.open(out)


def test_a_clip_is_hashed_once_per_process_and_verify_still_checks_every_clip(tmp_path, zarr_cache, dataset):
    out = tmp_path / "c.zarr"
    shutil.copytree(zarr_cache[0], out)
    cache = FeatureCache.open(out)
    victim = dataset.video_ids()[0]
    cache.clip(victim)  # read and checked once: later epochs of this process do not hash it again
    _damage(out, "zarr", victim)
    assert victim in cache.verify()  # verify checks every clip, whatever was read before


def test_a_link_to_a_store_being_written_is_the_same_store_for_the_lock(tmp_path, dataset, weights):
    out = tmp_path / "c.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        link = tmp_path / "link.zarr"
        link.symlink_to(out, target_is_directory=True)
        refused = run_cli(extract_args(dataset, link, weights, "--views", "2", "--workers", "0"))
        assert refused.exit_code == 2, refused.output
        assert_in_output(f"is being written by caer extract (pid {holder.pid}", refused.output)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_resuming_a_store_from_another_dataset_root_is_refused(tmp_path, dataset, weights, zarr_cache):
    """The same clip names under another root are other frames: they must not be taken as the store's."""
    out = tmp_path / "c.zarr"
    shutil.copytree(zarr_cache[0], out)
    moved = dataset.copy(tmp_path / "elsewhere")
    refused = run_cli(extract_args(moved, out, weights, "--views", "2", "--workers", "0"))
    assert refused.exit_code == 2, refused.output
    assert_in_output(f"holds clips cut from frames under {dataset.root.resolve()}; this run reads "
                     f"{moved.root.resolve()}", refused.output)
    assert FeatureCache.open(out).inputs["root"] == str(dataset.root.resolve())


def test_verify_of_a_first_extraction_cut_short_lists_the_clips_it_did_not_write(tmp_path, dataset, weights,
                                                                                 monkeypatch):
    import caer.pipeline.extract as extract_module

    real, calls = extract_module._BatchPacker.add, []

    def cut(self, item):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, item)

    monkeypatch.setattr(extract_module._BatchPacker, "add", cut)
    out = tmp_path / "c.zarr"
    assert run_cli(extract_args(dataset, out, weights, "--views", "2", "--workers", "0", "--batch-size", "8")).exit_code
    monkeypatch.undo()
    verify = run_cli(["cache", "verify", str(out)])
    assert verify.exit_code == 1, verify.output
    missing = [v for v in dataset.video_ids() if v not in FeatureCache.open(out)]
    assert missing and all(squash(v) in squash(verify.output) for v in missing)
    assert_in_output("listed in a split but has no finished data", verify.output)


def test_an_overwrite_cut_short_leaves_no_half_store_behind(tmp_path, zarr_cache, dataset, weights, monkeypatch):
    """--overwrite renames the old store before deleting it: stopped half-way, the next run starts afresh."""
    import caer.cache.store as store_module

    out = tmp_path / "c.zarr"
    shutil.copytree(zarr_cache[0], out)

    def interrupted(path, *args, **kwargs):
        next(p for p in Path(path).rglob("zarr.json")).unlink()  # some files gone, then the Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module.shutil, "rmtree", interrupted)
    assert run_cli(extract_args(dataset, out, weights, "--views", "1", "--workers", "0", "--overwrite")).exit_code
    monkeypatch.undo()
    assert not out.exists() and len(list(tmp_path.glob(".c.zarr.removing-*"))) == 1
    done = run_cli(extract_args(dataset, out, weights, "--views", "1", "--workers", "0"))
    assert done.exit_code == 0, done.output
    assert sorted(FeatureCache.open(out).video_ids) == sorted(dataset.video_ids())


def test_re_running_on_a_finished_h5_leaves_the_file_as_it_is(tmp_path, h5_cache, dataset, weights):
    """Nothing to extract and nothing new to record: no rebuild (a rebuild copies the whole file)."""
    out = tmp_path / "c.h5"
    shutil.copyfile(h5_cache, out)
    before = out.stat()
    again = run_cli(extract_args(dataset, out, weights, "--views", "2", "--workers", "0"))
    assert again.exit_code == 0, again.output
    after = out.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not out.with_name(out.name + ".partial.zarr").exists()
    assert FeatureCache.open(out).attrs["summary"]["clips_extracted"] == len(dataset.video_ids())  # the first run's


def test_a_store_of_a_dataset_that_moved_resumes_from_its_new_place(tmp_path, dataset, weights):
    """The recorded root is gone: the new one is taken as the same dataset moved (and said so), not refused."""
    first = dataset.copy(tmp_path / "before")
    out = tmp_path / "c.zarr"
    train, val = (str(first.root / f"{s}.txt") for s in ("train", "val"))
    base = ["--face-boxes", str(first.face_boxes), "--out", str(out), "--model", "caer-tiny", "--pretrained",
            str(weights), "--device", "cpu", "--workers", "0"]
    assert run_cli(["extract", train, *base]).exit_code == 0
    moved = first.root.rename(tmp_path / "after")
    base[1] = str(moved / "face_boxes.json")
    resumed = run_cli(["extract", str(moved / "val.txt"), *base])
    assert resumed.exit_code == 0, resumed.output
    assert_in_output(f"was cut from frames under {first.root.resolve()}, which is gone; taking {moved.resolve()}",
                     resumed.output)
    assert FeatureCache.open(out).inputs["root"] == str(moved.resolve())


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_a_store_reached_through_a_link_is_written_and_replaced_in_place(fmt, tmp_path, dataset, weights):
    """Resuming, finishing (HDF5 replaces its file) and --overwrite act on the store the link points to."""
    real, link = tmp_path / f"real.{fmt}", tmp_path / f"link.{fmt}"
    train, val = (str(dataset.root / f"{s}.txt") for s in ("train", "val"))
    base = ["--face-boxes", str(dataset.face_boxes), "--model", "caer-tiny", "--pretrained", str(weights),
            "--device", "cpu", "--workers", "0"]
    assert run_cli(["extract", train, "-o", str(real), *base]).exit_code == 0
    link.symlink_to(real)
    assert run_cli(["extract", val, "-o", str(link), *base]).exit_code == 0
    assert link.is_symlink() and len(FeatureCache.open(real).video_ids) == sum(
        1 for path in (train, val) for line in Path(path).read_text().splitlines() if line.strip())
    replaced = run_cli(["extract", val, "-o", str(link), "--overwrite", "--views", "2", *base])
    assert replaced.exit_code == 0, replaced.output
    assert link.is_symlink() and FeatureCache.open(real).views == 2
