"""The store's writers: the writer-process path (the GPU's) writes what the writer-thread path writes, surfaces a
child's failure with the path at fault, and leaves no process behind (forced on the CPU here)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import zarr

from caer.cache import CacheError, CacheWriter, FeatureCache, fingerprint, store_key
from caer.cli import user_message
from caer.pipeline import extract as extract_module
from caer.pipeline.extract import ExtractSummary, _ClipWriter, extract
from conftest import settings_for

FP = fingerprint({"model": "m"}, margin=20, crop_body=False, views=1, frame_stride=1)


def clip_attrs(path: Path) -> dict[str, dict]:
    """{key: attributes} of every clip of a store, read with plain zarr or h5py."""
    if path.is_dir():
        clips = zarr.open_group(str(path), mode="r")["clips"]
        return {k: dict(clips[k].attrs) for k in clips.array_keys()}
    with h5py.File(path, "r") as f:
        return {k: {a: json.loads(v) for a, v in ds.attrs.items()} for k, ds in f["clips"].items()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_writer_processes_write_what_the_writer_thread_writes(fmt, tmp_path, dataset, clip_model, zarr_cache,
                                                              monkeypatch):
    monkeypatch.setitem(extract_module.WRITER_PROCESSES, "cpu", 2)
    before = set(multiprocessing.active_children())
    out = tmp_path / f"processes.{fmt}"
    summary = extract(settings_for(dataset, out), clip_model)  # the settings of the zarr_cache fixture (one thread)
    assert set(multiprocessing.active_children()) <= before  # the writer processes are gone

    thread, processes = FeatureCache.open(zarr_cache[0]), FeatureCache.open(out)
    assert processes.format == fmt and summary.clips_extracted == len(thread.video_ids) == 12
    assert sorted(processes.video_ids) == sorted(thread.video_ids)
    assert clip_attrs(out) == clip_attrs(zarr_cache[0])  # labels, frame names, box digests, checksums, done
    for v in thread.video_ids:
        assert np.array_equal(processes.clip(v), thread.clip(v)), v
    for name in ("fingerprint", "splits", "skipped", "skipped_clips", "caer_schema"):
        assert processes.attrs[name] == thread.attrs[name], name


def fake_clip(i: int, frames: int = 3, dim: int = 8) -> tuple:
    """What extraction hands ``_ClipWriter.put``: (clip, item, features [frames * 2, views 1, D])."""
    clip = SimpleNamespace(video_id=f"clips/{i:02d}", label=i % 3, video=None)
    item = {"frame_names": [f"{j}.jpg" for j in range(frames)], "no_face": 0}
    return clip, item, torch.randn(frames * 2, 1, dim).to(torch.float16)


def clip_writer(path: Path, processes: int, n: int) -> tuple[CacheWriter, _ClipWriter, list]:
    writer = CacheWriter(path, FP)
    clips = [fake_clip(i) for i in range(n)]
    return writer, _ClipWriter(writer, 1, {c.video_id: "boxes" for c, _, _ in clips}, ExtractSummary(), processes), clips


def test_the_parent_records_every_clip_a_process_wrote(tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module, "MAX_PENDING_WRITES", 12)
    writer, out, clips = clip_writer(tmp_path / "s.zarr", 2, 30)
    try:
        for part in (clips[:3], clips[3:6], clips[6:]):  # the last one is handed over in tasks of at most 8 clips
            out.put(part)
            assert out.in_flight <= 12
        out.close()
    finally:
        writer.close()
    stored = clip_attrs(tmp_path / "s.zarr")
    assert writer.done == stored and sorted(stored) == [store_key(c.video_id) for c, _, _ in clips]
    cache = FeatureCache.open(tmp_path / "s.zarr")  # checks every checksum
    for clip, _, feats in clips:
        assert np.array_equal(cache.clip(clip.video_id), feats.view(3, 2, 1, 8).permute(1, 2, 0, 3).numpy())


class CopyInFlight:
    """A GPU-to-host copy's event that reports the copy unfinished until waited on: the clips queue up, as on CUDA."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


def test_after_a_clip_with_non_finite_features_the_queued_clips_are_written_and_the_first_error_stands(tmp_path,
                                                                                                      monkeypatch):
    monkeypatch.setattr(extract_module, "to_host", lambda feats: (feats, CopyInFlight()))
    writer, out, clips = clip_writer(tmp_path / "s.zarr", 0, 4)
    for i in (1, 2):
        clips[i][2][0, 0, 0] = float("nan")
    try:
        out.put(clips)
        assert out.in_flight == 4 and not out.pending  # every copy still on its way
        with pytest.raises(FloatingPointError, match="clips/01: the encoder gave non-finite features"):
            out._hand_over(wait=True)  # what the next put does once the copies arrive
        out.close()  # (extract's `finally`): no second error to hide the first; clip 2 is dropped, clip 3 written
    finally:
        writer.close()
    assert sorted(clip_attrs(tmp_path / "s.zarr")) == [store_key(clips[i][0].video_id) for i in (0, 3)]


@pytest.mark.parametrize("processes", [0, 2])
def test_non_finite_features_found_when_closing_keep_the_clips_before_them(tmp_path, monkeypatch, processes):
    """On CUDA the last clips' copies are still on their way when extraction ends: close() hands them over, and a
    bad one among them must not cancel the writes of the good ones before it."""
    monkeypatch.setattr(extract_module, "to_host", lambda feats: (feats, CopyInFlight()))
    writer, out, clips = clip_writer(tmp_path / "s.zarr", processes, 12)
    clips[-1][2][0, 0, 0] = float("nan")
    try:
        out.put(clips)
        with pytest.raises(FloatingPointError, match="clips/11: the encoder gave non-finite features"):
            out.close()
    finally:
        writer.close()
    assert sorted(clip_attrs(tmp_path / "s.zarr")) == sorted(store_key(c.video_id) for c, _, _ in clips[:-1])


def test_a_failed_write_in_a_process_names_the_path_and_leaves_nothing_running(tmp_path):
    store = tmp_path / "s.zarr"
    writer, out, clips = clip_writer(store, 2, 3)
    try:
        shutil.rmtree(store / "clips")
        (store / "clips").write_text("in the way")  # every clip's folder now fails to be made
        out.put(clips)
        children = [p for p in multiprocessing.active_children() if p.pid in out.pool._processes]
        assert children
        with pytest.raises(OSError) as failed:
            out.close()
    finally:
        writer.close()
    assert failed.value.filename == str(store / "clips" / store_key(clips[0][0].video_id))
    assert user_message(failed.value) == f"{failed.value.filename}: Not a directory"  # the CLI's one line
    assert not [p.pid for p in children if alive(p.pid)]


def test_a_writer_process_that_dies_is_one_clear_error(tmp_path):
    writer, out, clips = clip_writer(tmp_path / "s.zarr", 1, 4)
    try:
        out.put(clips[:1])
        out.pending[0][0].result()  # the process is up and has written a clip
        [pid] = out.pool._processes
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(CacheError, match=re.escape(f"{tmp_path / 's.zarr'}: a writer of the store ended unexpectedly")):
            out.put(clips[1:])
            out.close()
    finally:
        out.pool.shutdown()
        writer.close()
    # the clip written before the kill counts as done, in the parent and on disk; the others do not
    first = store_key(clips[0][0].video_id)
    assert list(writer.done) == [first] and {k for k, a in clip_attrs(tmp_path / "s.zarr").items() if a["done"]} == {first}


# A parent that hands two writes to two writer processes, prints their ids, and waits to be killed.
PARENT = """
import sys, time
import numpy as np
from caer.cache import CacheWriter, fingerprint
from caer.cache.store import write_clips
pool = CacheWriter(sys.argv[1], fingerprint({"model": "m"}, margin=20, crop_body=False, views=1, frame_stride=1)).writers(2)
for i in range(2):
    pool.submit(write_clips, [(f"clips/{i}", np.zeros((2, 1, 3, 8)), {"label": 0, "frame_names": ["0.jpg"] * 3})])
while len(pool._processes) < 2:
    time.sleep(0.01)
print(*pool._processes, flush=True)
time.sleep(60)
"""


def test_writer_processes_end_with_a_killed_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "s.zarr")], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
    finally:
        parent.kill()
        parent.wait()
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)]


# A main script that is slow to import (as one importing torch is): the writers re-run it while they start. It
# starts 2 writers, is sent Ctrl-C while they are still importing it, then waits for them.
SLOW_MAIN = """
import os, signal, sys, time
time.sleep(1.0)
if __name__ == "__main__":
    from caer.cache import CacheWriter, fingerprint
    writer = CacheWriter(sys.argv[1], fingerprint({"model": "m"}, margin=20, crop_body=False, views=1, frame_stride=1))
    try:
        pool = writer.writers(2)
        procs = list(pool._processes.values())
        for p in procs + [None]:  # the whole group gets Ctrl-C in a terminal: the writers too, then this process
            os.kill(p.pid if p else os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        print("no interrupt")
    except KeyboardInterrupt:
        pool.shutdown()
        print("interrupted; writers exited with", [p.exitcode for p in procs], flush=True)
"""


def test_ctrl_c_while_writers_start_is_the_users_interrupt_and_spares_the_writers(tmp_path):
    """A writer process ignores Ctrl-C from its start, while it still re-imports its parent's main script: the
    interrupt is the parent's alone, and it does not turn into a "writer ended unexpectedly" error."""
    script = tmp_path / "slow_main.py"
    script.write_text(SLOW_MAIN)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "s.zarr")], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "interrupted; writers exited with [0, 0]", done.stdout + done.stderr
