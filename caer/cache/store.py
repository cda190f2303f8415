"""Reading and writing the feature cache (Zarr or HDF5, one logical schema: see ``schema``).

Zarr stores are written in place: every clip is its own array of one chunk (zarr writes each
file atomically), and its ``done`` flag is set only after its features, so a killed run leaves
at worst unfinished clips (one per writer) that the next run redoes. Several processes may write
disjoint clips into one Zarr store at once (``CacheWriter.writers``: a writer thread, or writer
processes). An HDF5 file cannot survive a kill mid-write, so HDF5 extraction writes into a Zarr
staging store beside it (``<file>.partial.zarr``) and builds the ``.h5`` from it at the end, into
a temporary file that replaces the old one in one rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import zarr

from ..files import FileLock, naming_errors
from ..processes import spawned_pool
from .schema import CLIPS, SCHEMA_VERSION, STREAMS, differences, skipped_source, store_key, video_id_of, with_added_keys

log = logging.getLogger(__name__)


class CacheError(Exception):
    """A cache that cannot be used as asked (wrong fingerprint, not a cache, missing clip)."""


class DamagedClip(CacheError):
    """A clip whose data or metadata cannot be read, or no longer matches its checksum; ``problem`` says which in a
    few words (``caer cache verify`` lists it)."""

    def __init__(self, cache: Path, video_id: str, why: str, problem: str):
        super().__init__(f"{cache}: clip {video_id!r} is damaged ({why}); run the same caer extract again to repair it "
                         f"(caer cache verify {cache} lists every damaged clip)")
        self.problem = problem


H5_SUFFIXES = (".h5", ".hdf5")


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """The store format of ``path``: ``fmt``, or by its suffix (``.h5``/``.hdf5``: HDF5, else Zarr); a ``fmt``
    that its suffix contradicts (``x.zarr`` as HDF5) is refused."""
    suffix = Path(path).suffix.lower()
    by_suffix = "h5" if suffix in H5_SUFFIXES else "zarr" if suffix == ".zarr" else None
    if fmt not in ("zarr", "h5", "auto"):
        raise CacheError(f"--format {fmt!r}: choose zarr, h5 or auto")
    if fmt != "auto" and by_suffix not in (None, fmt):
        raise CacheError(f"--format {fmt} contradicts the name {Path(path).name}: name a {fmt} store "
                         f"{'.zarr' if fmt == 'zarr' else '.h5'} (or drop --format)")
    return fmt if fmt != "auto" else by_suffix or "zarr"


def _staging_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial.zarr")


# --------------------------------------------------------------------------- zarr helpers

def _zarr_root_attrs(path: Path) -> dict | None:
    """Root attributes of a caer Zarr store, or None if ``path`` is not one. A root metadata file that is there but
    cannot be read is a CacheError: the folder may well be a damaged cache, which is not "not a cache"."""
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        _check_root_metadata(path / "zarr.json")
        return None
    return attrs if "caer_schema" in attrs else None


def _check_root_metadata(meta: Path) -> None:
    """Refuse a store whose root metadata file exists but is no JSON (cut short, overwritten, unreadable)."""
    if not meta.is_file():
        return
    try:
        json.loads(meta.read_bytes())
    except (OSError, ValueError) as err:
        raise CacheError(f"{meta}: the root metadata file of the store {meta.parent} cannot be read ({one_line(err)}); "
                         f"caer leaves the store as it is: restore the file, or remove {meta.parent} and extract "
                         "again") from None


def _zarr_clips(path: Path) -> tuple[dict[str, dict], dict[str, tuple[str, str]]]:
    """{key: clip attrs} for every finished clip of a Zarr store, and {key: (its metadata file, the error)} for every
    clip whose metadata cannot be read. Each clip's metadata is read on its own, so a damaged one is just not done."""
    try:
        clips = zarr.open_group(str(path), mode="r")[CLIPS]
    except Exception:
        return {}, {}
    done, unreadable = {}, {}
    for meta in sorted((Path(path) / CLIPS).glob("*/zarr.json")):
        key = meta.parent.name
        try:
            attrs = dict(clips[key].attrs)
        except Exception as err:  # damaged metadata: the clip is not done, and a re-run replaces it
            unreadable[key] = (str(meta), one_line(err))
            continue
        if attrs.get("done"):
            done[key] = attrs
    return done, unreadable


def _zarr_done_clips(path: Path) -> dict[str, dict]:
    """{key: clip attrs} for every finished clip of a Zarr store."""
    return _zarr_clips(path)[0]


def stored_fingerprint(path: str | Path, fmt: str = "auto") -> dict | None:
    """The fingerprint of the store at ``path`` (or of an interrupted HDF5 build's staging store); None when
    there is none or it cannot be read (the writer then says why), a CacheError when a Zarr store's root metadata
    file cannot be read."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt == "h5" and path.is_file():
        try:
            with h5py.File(path, "r") as f:
                return with_added_keys(json.loads(f.attrs["fingerprint"]))
        except (OSError, KeyError, ValueError):
            return None
    staged = _staging_path(path) if fmt == "h5" else path
    attrs = _zarr_root_attrs(staged) if staged.exists() else None
    return with_added_keys(attrs["fingerprint"]) if attrs and "fingerprint" in attrs else None


def one_line(err: BaseException) -> str:
    """An error's text on one line (h5py's messages span several)."""
    return " ".join(str(err).split())


def clip_checksum(data: np.ndarray) -> str:
    """SHA-256 of a clip's float16 features, recorded when it is written and checked when it is read."""
    return hashlib.sha256(np.ascontiguousarray(data, dtype=np.float16).tobytes()).hexdigest()


def _remove_tree(path: Path) -> None:
    """Delete a store folder. It is renamed first: a deletion cut short leaves a hidden ``.<name>.removing-*``
    folder beside it, never a store without its root metadata that no later run would touch."""
    doomed = path.with_name(f".{path.name}.removing-{os.getpid()}-{time.monotonic_ns()}")
    path.rename(doomed)
    shutil.rmtree(doomed)


# --------------------------------------------------------------------------- writer

class CacheWriter:
    """Writes clips' features into a new or existing cache with the given fingerprint."""

    def __init__(self, path: str | Path, fingerprint: dict, fmt: str = "auto", overwrite: bool = False,
                 inputs: dict | None = None, lock: bool = True):
        self.path = Path(path)
        if self.path.is_symlink():  # write, replace and remove the store itself, never the link to it
            self.path = self.path.resolve()
        self.format = detect_format(self.path, fmt)
        self.fingerprint = fingerprint
        self.inputs = inputs or {}  # the dataset root and box files this run reads (recorded, not fingerprinted)
        self.moved_from: str | None = None  # the recorded dataset root, when it is gone and this run reads another
        self.zarr_path = _staging_path(self.path) if self.format == "h5" else self.path
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise CacheError(f"{self.path.parent}: is a file, not a folder; cannot write {self.path.name} in it")
        # one OS lock on <store>.lock whatever the path the store is reached by (a link, ../)
        real = self.path.resolve()
        self.lock = FileLock(real.with_name(real.name + ".lock"), "caer extract")
        if lock:  # torchrun ranks of one run are one writer: rank 0 holds the lock for all of them
            held_by = self.lock.acquire()
            if held_by:
                raise CacheError(f"{real} is being written by {held_by}; wait until it is done, or extract into "
                                 "another path")
        try:
            self._open(fingerprint, overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, fingerprint: dict, overwrite: bool) -> None:
        existing = self._existing_attrs()
        if existing is not None and overwrite:
            log.info("--overwrite: removing the existing store %s", self.path)
            self._remove()
            existing = None
        if existing is not None:
            found = with_added_keys(existing.get("fingerprint", {}))
            diff = differences(fingerprint, found)
            if diff:
                raise CacheError(
                    f"{self.path} was extracted with other settings:\n  " + "\n  ".join(diff)
                    + "\nUse another output path, or --overwrite to replace it."
                )
            self._check_same_root(existing.get("inputs") or {})
        self._open_zarr()
        self.done: dict[str, dict] = {}  # key -> attributes of every finished clip
        if self.format == "h5" and self.path.exists():
            with h5py.File(self.path, "r") as f:
                for key, ds in f.get(CLIPS, {}).items():
                    self.done[key] = {a: json.loads(v) for a, v in ds.attrs.items()}
        self.done.update(_zarr_done_clips(self.zarr_path))

    def _check_same_root(self, stored: dict) -> None:
        """Clips are named by their path under the dataset root: the same names under another root that still
        exists are other frames, which must not join this store. A root that is gone is taken as moved: the run
        goes on from the new one, and ``moved_from`` says so (the caller tells the user)."""
        old, new = stored.get("root"), self.inputs.get("root")
        if not (old and new and old != new):
            return
        if Path(old).exists() and not os.path.samefile(old, new):
            raise CacheError(f"{self.path} holds clips cut from frames under {old}; this run reads {new}. Pass --root "
                             f"{old} (the clips' paths are relative to it), or use another output path, or --overwrite "
                             "to replace the store")
        self.moved_from = old

    def close(self) -> None:
        """Let another process write the store."""
        self.lock.release()

    def damaged(self, keys) -> set[str]:
        """The finished clips among ``keys`` whose data no longer matches the checksum written with it."""
        staged = _zarr_done_clips(self.zarr_path)
        bad = set()
        h5 = h5py.File(self.path, "r") if self.format == "h5" and self.path.exists() else None
        try:
            for key in keys:
                expected = self.done[key].get("sha256")
                if expected is None:  # written before checksums were recorded
                    continue
                try:
                    data = self.root[CLIPS][key][...] if key in staged else h5[CLIPS][key][...]
                except Exception:  # unreadable metadata or chunk
                    bad.add(key)
                    continue
                if clip_checksum(data) != expected:
                    bad.add(key)
        finally:
            if h5 is not None:
                h5.close()
        return bad

    def _existing_attrs(self) -> dict | None:
        attrs = None
        if self.format == "h5" and self.path.exists():
            try:
                attrs = self._finished_h5_attrs()
            except OSError as err:
                raise CacheError(f"{self.path}: exists but is not a readable HDF5 file ({one_line(err)})") from None
            if "caer_schema" not in attrs:
                raise CacheError(f"{self.path}: exists but is not a caer cache; refusing to touch it")
        if self.zarr_path.exists():
            staged = _zarr_root_attrs(self.zarr_path)
            if staged is None:
                if any(self.zarr_path.iterdir()):
                    raise CacheError(f"{self.zarr_path}: exists but is not a caer cache; refusing to touch it")
            else:
                attrs = attrs or staged
                if attrs.get("fingerprint") != staged.get("fingerprint"):
                    raise CacheError(f"{self.zarr_path}: staging store does not match {self.path}; remove it")
        return attrs

    def _remove(self) -> None:
        if self.zarr_path.exists():
            _remove_tree(self.zarr_path)
        if self.format == "h5" and self.path.exists():
            self.path.unlink()

    def _open_zarr(self) -> None:
        # a new store's root is written with its attributes at once: a failed write leaves no store without them
        new = {"caer_schema": SCHEMA_VERSION, "fingerprint": self.fingerprint, "splits": {}, "skipped": [],
               "inputs": self.inputs}
        with naming_errors(self.zarr_path / "zarr.json"):
            self.root = zarr.open_group(str(self.zarr_path), mode="a", attributes=new)  # (only if it is new)
        if "caer_schema" not in self.root.attrs:  # an empty group that was there
            self._set_attrs(new)
        if CLIPS not in self.root:
            with naming_errors(self.zarr_path / CLIPS):
                self.root.create_group(CLIPS)

    def _set_attrs(self, values: dict) -> None:
        """Update the store's root attributes in one write of its metadata file (``attrs.update`` writes it once a
        key: a failure part-way would leave a store with a schema and no fingerprint); an OS error names the file."""
        with naming_errors(self.zarr_path / "zarr.json"):
            self.root.update_attributes(values)

    def write(self, video_id: str, features: np.ndarray, attrs: dict) -> None:
        """Store one clip's features [2, views, frames, D] from this thread; it counts as done only once this returns."""
        key, written = _write_into(self.root, self.zarr_path, video_id, features, attrs)
        self.done[key] = written

    def writers(self, processes: int = 0) -> Executor:
        """An executor for ``write_clips`` calls into this store: one thread of this process (``processes=0``), or that
        many spawned processes. Each thread or process opens the store once."""
        path = str(self.zarr_path)
        if not processes:
            return ThreadPoolExecutor(1, thread_name_prefix="caer-store", initializer=open_for_writes, initargs=(path,))
        return spawned_pool(processes, open_for_writes, path)  # they open the store while this process goes on

    def record_splits(self, splits: dict[str, list[str]]) -> None:
        """Add this run's splits to the store's before any clip is written, so that ``caer cache verify`` of a run
        cut short knows which clips are missing."""
        self._set_attrs({"splits": self._merged_splits(splits, self._finished_h5_attrs())})

    def finish(self, splits: dict[str, list[str]], skipped: list[str], summary: dict,
               skipped_clips: list[str] = ()) -> None:
        """Record splits, skipped clips (reasons and video ids) and the summary; for HDF5, build the final file. A run
        that extracted nothing keeps the summary of the run that did (its counts of frames without a face, ...)."""
        finished = self._finished_h5_attrs()
        earlier = {key: list(dict(self.root.attrs).get(key, [])) + list(finished.get(key, []))
                   for key in ("skipped", "skipped_clips")}
        skipped, skipped_clips = self._merge_skipped(earlier, splits, skipped, skipped_clips)
        record = {"splits": self._merged_splits(splits, finished), "skipped": skipped, "skipped_clips": skipped_clips,
                  "inputs": self.inputs}
        earlier_summary = dict(self.root.attrs).get("summary") or finished.get("summary")
        if summary.get("clips_extracted") or not earlier_summary:
            record["summary"] = summary
        self._set_attrs(record)
        if self.format != "h5":
            return
        if finished and not len(self.root[CLIPS]) and all(finished.get(k) == v for k, v in record.items()):
            _remove_tree(self.zarr_path)  # nothing new: the finished file stays as it is (no copy of it is made)
        else:
            self._build_h5()

    def _finished_h5_attrs(self) -> dict:
        """The attributes of the finished HDF5 file this run adds to ({} for Zarr, or before the first build)."""
        if self.format != "h5" or not self.path.exists():
            return {}
        with h5py.File(self.path, "r") as f:
            return {k: json.loads(v) for k, v in f.attrs.items()}

    def _merged_splits(self, splits: dict[str, list[str]], finished: dict) -> dict[str, list[str]]:
        """The store's splits (staged, and those of the ``finished`` HDF5 file's attributes) with ``splits``' new
        clips appended, in order."""
        merged = {name: list(ids) for name, ids in dict(self.root.attrs).get("splits", {}).items()}
        for name, ids in finished.get("splits", {}).items():
            merged.setdefault(name, list(ids))
        for name, ids in splits.items():
            known = set(merged.setdefault(name, []))
            merged[name] += [i for i in ids if i not in known]
        return merged

    def _merge_skipped(self, attrs: dict, splits: dict, skipped: list[str], skipped_clips) -> tuple[list, list]:
        """This run's skipped clips, plus those of earlier runs over other annotation files (still not done)."""
        this_run = {v for ids in splits.values() for v in ids} | set(skipped_clips)
        earlier = [v for v in attrs.get("skipped_clips", []) if v not in this_run and store_key(v) not in self.done]
        lines = [line for line in attrs.get("skipped", [])
                 if (source := skipped_source(line)) is None or Path(source[0]).stem not in splits]
        return sorted(set(skipped) | set(lines)), sorted(set(skipped_clips) | set(earlier))

    def _build_h5(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        if self.path.exists():
            try:
                shutil.copyfile(self.path, tmp)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise OSError(err.errno, err.strerror, str(tmp)) from None
        # HDF5 does not recover from a failed write (a full disk, a size limit): it reports it while closing and can
        # crash the process at exit. The build runs in a child process, so such a failure is one clear error here.
        child = "import sys; from caer.cache.store import copy_staged_into_h5 as c; c(*sys.argv[1:])"
        build = subprocess.run([sys.executable, "-c", child, str(self.zarr_path), str(tmp)], capture_output=True,
                               text=True)
        if build.returncode != 0:
            tmp.unlink(missing_ok=True)
            found = re.findall(r"error message = '([^']+)'", build.stderr)
            cause = found[-1] if found else (build.stderr.strip().splitlines() or [f"exit code {build.returncode}"])[-1]
            raise CacheError(f"{tmp}: cannot write the HDF5 file ({cause}); the staging store {self.zarr_path} is "
                             "kept: free the space and run the same command again")
        os.replace(tmp, self.path)
        _remove_tree(self.zarr_path)


    def size_bytes(self) -> int:
        if self.format == "h5" and self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.zarr_path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- clip writes, in any thread or process

def _write_into(root: zarr.Group, store: Path, video_id: str, features: np.ndarray, attrs: dict) -> tuple[str, dict]:
    """Store one clip's features [2, views, frames, D] in the store ``root`` (at ``store``): its array, its chunk, and
    only then its ``done`` flag. Returns the clip's key and the attributes recorded with it."""
    key = store_key(video_id)
    data = np.ascontiguousarray(features, dtype=np.float16)
    attrs = {"video_id": video_id, **attrs, "sha256": clip_checksum(data)}
    with naming_errors(store / CLIPS / key):
        arr = root.create_array(f"{CLIPS}/{key}", shape=data.shape, chunks=data.shape, dtype="float16",
                                compressors=None, attributes={**attrs, "done": False}, overwrite=True)
        arr[...] = data
        arr.attrs["done"] = True
    return key, {**attrs, "done": True}


_opened = threading.local()  # the store this writer thread (or writer process) writes into


def open_for_writes(path: str) -> None:
    """Initializer of a writer thread (and of a writer process): open the Zarr store at ``path`` once for its
    ``write_clips`` calls."""
    _opened.root, _opened.path = zarr.open_group(path, mode="r+"), Path(path)


def write_clips(clips: list[tuple[str, np.ndarray, dict]]) -> list[tuple[str, dict]]:
    """``CacheWriter.write`` for each (video id, features, attrs), in order, in a writer thread or process
    (``CacheWriter.writers``); returns each clip's key and attributes, for the extracting process's ``done``."""
    return [_write_into(_opened.root, _opened.path, *clip) for clip in clips]


# --------------------------------------------------------------------------- reader

class FeatureCache:
    """Read-only view of a cache, the same for both backends.

    Handles are opened lazily in each process, so a ``FeatureCache`` can be handed to
    DataLoader workers.
    """

    def __init__(self, path: Path, fmt: str, attrs: dict, index: dict[str, dict],
                 unreadable: dict[str, tuple[str, str]] | None = None):
        self.path, self.format, self.attrs = path, fmt, attrs
        self._index = index  # video_id -> {key, label, num_frames, frame_names, ...}
        self._unreadable = unreadable or {}  # video_id -> (metadata file, error) of clips not in the index for it
        self.video_ids: list[str] = list(index)
        self.labels = np.array([index[v]["label"] for v in self.video_ids], dtype=np.int64)
        self._handle = None
        self._pid = None
        self._memory: dict[str, np.ndarray] | None = None
        self._verified: set[str] = set()  # clips this process has checked against their checksum

    @classmethod
    def open(cls, path: str | Path) -> FeatureCache:
        path = Path(path)
        if not path.exists():
            staged = _staging_path(path)
            if detect_format(path) == "h5" and staged.is_dir():
                raise CacheError(f"{path}: not built yet: an extraction into it stopped before the end, and its "
                                 f"finished clips wait in {staged}; run the same `caer extract` again to finish it")
            raise CacheError(f"{path}: no feature cache here (run `caer extract` first)")
        if path.is_dir():
            attrs = _zarr_root_attrs(path)
            if attrs is None:
                raise CacheError(f"{path}: not a caer feature cache")
            clips, unreadable = _zarr_clips(path)
            fmt = "zarr"
        else:
            unreadable = {}
            try:
                with h5py.File(path, "r") as f:
                    attrs = {k: json.loads(v) for k, v in f.attrs.items()}
                    clips = {k: {a: json.loads(v) for a, v in ds.attrs.items()} for k, ds in f[CLIPS].items()}
            except (OSError, KeyError, json.JSONDecodeError) as err:
                raise CacheError(f"{path}: not a readable caer HDF5 cache ({one_line(err)})") from None
            fmt = "h5"
        if attrs.get("caer_schema") != SCHEMA_VERSION:
            raise CacheError(f"{path}: cache schema {attrs.get('caer_schema')} is not {SCHEMA_VERSION}; re-extract it")
        index = {a["video_id"]: {**a, "key": k} for k, a in clips.items()}
        return cls(path, fmt, attrs, index, {video_id_of(k): found for k, found in unreadable.items()})

    @property
    def fingerprint(self) -> dict:
        return with_added_keys(self.attrs["fingerprint"])

    def check_encoder(self, identity: dict) -> None:
        """Refuse to serve features that another image encoder than ``identity`` made."""
        diff = differences(identity, self.fingerprint["encoder"])
        if diff:
            raise CacheError(
                f"{self.path} was extracted with another image encoder than this model's:\n  " + "\n  ".join(diff)
                + "\nRe-extract the cache for this model (caer extract --from-checkpoint CKPT for a stage-3 checkpoint),"
                " or use --source raw."
            )

    @property
    def views(self) -> int:
        return int(self.fingerprint["views"])

    @property
    def embed_dim(self) -> int:
        return int(self.fingerprint["encoder"]["embed_dim"])

    def __contains__(self, video_id: str) -> bool:
        """Whether the cache holds the clip: finished, or damaged (reading it then says which file is, and what
        repairs it) rather than never extracted."""
        return video_id in self._index or video_id in self._unreadable

    def _entry(self, video_id: str) -> dict:
        try:
            return self._index[video_id]
        except KeyError:
            if video_id in self._unreadable:
                meta, err = self._unreadable[video_id]
                raise DamagedClip(self.path, video_id, f"its metadata file {meta} cannot be read: {err}",
                                  f"metadata unreadable ({Path(meta).relative_to(self.path)}: {err})") from None
            raise CacheError(f"{self.path}: clip {video_id!r} is not in the cache (extract its split first)") from None

    @property
    def inputs(self) -> dict:
        """The dataset root and box files the last extraction read (absolute paths; empty for older stores)."""
        return dict(self.attrs.get("inputs") or {})

    def boxes_digest(self, video_id: str) -> str | None:
        """SHA-256 of the boxes this clip's views were cut with."""
        return self._entry(video_id).get("boxes_sha256")

    def label(self, video_id: str) -> int:
        return int(self._entry(video_id)["label"])

    def num_frames(self, video_id: str) -> int:
        return len(self._entry(video_id)["frame_names"])

    def frame_names(self, video_id: str) -> list[str]:
        return list(self._entry(video_id)["frame_names"])

    def origin(self, video_id: str) -> str:
        """Where the clip's frames came from: "frames" (a frame folder; stores older than videos) or "video"."""
        return self._entry(video_id).get("origin", "frames")

    def clip(self, video_id: str) -> np.ndarray:
        """All of a clip's features: float16 [2 streams, views, frames, D]."""
        key = self._entry(video_id)["key"]
        if self._memory is not None:
            return self._memory[video_id]
        if self._pid != os.getpid():
            self._handle = (
                zarr.open_group(str(self.path), mode="r")[CLIPS] if self.format == "zarr" else h5py.File(self.path, "r")[CLIPS]
            )
            self._pid = os.getpid()
        try:
            data = np.asarray(self._handle[key][...])
        except Exception as err:  # a chunk cut short, metadata damaged since the cache was opened
            found = f"{type(err).__name__}: {one_line(err)}"
            raise DamagedClip(self.path, video_id, f"its data cannot be read: {found}", f"unreadable ({found})") from None
        if video_id in self._verified:  # once per process: later epochs read the same bytes
            return data
        expected = self._entry(video_id).get("sha256")  # stores written before checksums have none
        if expected is not None and clip_checksum(data) != expected:
            raise DamagedClip(self.path, video_id, "its data no longer matches the checksum written with it",
                              "data does not match its checksum")
        self._verified.add(video_id)
        return data

    def clips_without_checksum(self) -> int:
        return sum("sha256" not in entry for entry in self._index.values())

    def verify(self) -> dict[str, str]:
        """``{video_id: what is wrong}`` for every damaged clip, and every clip of a split that has no finished
        data (and was not skipped as bad input)."""
        problems = {}
        self._verified.clear()  # check every clip now, whatever this process has read before
        for video_id in [*self.video_ids, *self._unreadable]:
            try:
                self.clip(video_id)
            except DamagedClip as err:
                problems[video_id] = err.problem
        skipped = set(self.attrs.get("skipped_clips", []))
        for ids in self.attrs.get("splits", {}).values():
            for video_id in ids:
                if video_id not in self._index and video_id not in skipped and video_id not in problems:
                    problems[video_id] = "listed in a split but has no finished data"
        return problems

    def features(self, video_id: str, stream: str = "face", view: int = 0) -> np.ndarray:
        """One stream and view of a clip: float16 [frames, D]."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        if not 0 <= view < self.views:
            raise ValueError(f"view {view} out of range: this cache has {self.views} view(s)")
        return self.clip(video_id)[STREAMS.index(stream), view]

    def load_into_memory(self) -> None:
        """Read every clip once and serve later reads from RAM."""
        self._memory = None
        self._memory = {v: self.clip(v) for v in self.video_ids}


def copy_staged_into_h5(staging: str | Path, target: str | Path) -> None:
    """Write every finished clip and the root attributes of a Zarr staging store into an HDF5 file (and fsync it)."""
    staged = zarr.open_group(str(staging), mode="r")
    with h5py.File(target, "a") as f:
        for name, value in staged.attrs.items():
            f.attrs[name] = json.dumps(value)
        group = f.require_group(CLIPS)
        for key, attrs in _zarr_done_clips(staging).items():
            if key in group:
                del group[key]
            ds = group.create_dataset(key, data=staged[CLIPS][key][...])
            for name, value in attrs.items():
                ds.attrs[name] = json.dumps(value)
    with open(target, "rb") as f:
        os.fsync(f.fileno())

