"""Issue 10: an error a user meets is one clear line naming the file (and line or frame), never a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caer.cache import FeatureCache
from caer.cli import user_message
from caer.data.raer import DataError, list_frames, load_body_boxes, load_face_boxes, read_annotations, read_image
from conftest import Dataset, assert_fp16_equal, extract_args, run_cli, squash


def error_line(output: str) -> str:
    """The run's one ``error:`` line (whitespace squashed); only a parenthesised hint may follow it."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    found = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(found) == 1, output
    assert all(line.startswith("(") for line in lines[found[0] + 1 :]), output
    return " ".join(lines[found[0]].split())


def assert_stops(result, *fragments: str) -> str:
    """Exit code 2 and one error line holding every fragment."""
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    for fragment in fragments:
        assert fragment in line, (fragment, result.output)
    return line


def _boxed(ds: Dataset, video_id: str) -> str:
    return sorted(ds.boxes()[video_id])[0]


# --------------------------------------------------------------------------- non-finite boxes

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999"]


@pytest.mark.parametrize("value", NON_FINITE)
def test_a_non_finite_box_number_is_refused_naming_the_file_and_key(tmp_path, value):
    faces, bodies = tmp_path / "faces.json", tmp_path / "bodies.json"
    faces.write_text(f'{{"frames/a": {{"0.jpg": [1, 2, 3, 4], "1.jpg": [1, {value}, 30, 40]}}}}')
    bodies.write_text(f'{{"frames/a": [{value}, 0, 10, 10]}}')
    with pytest.raises(DataError, match=rf"^{faces}: frames/a/1\.jpg: a box must be finite numbers, got \[1, "):
        load_face_boxes(faces, tmp_path)
    with pytest.raises(DataError, match=rf"^{bodies}: frames/a: a box must be finite numbers"):
        load_body_boxes(bodies, tmp_path)


@pytest.mark.parametrize("value, workers", [("NaN", "0"), ("NaN", "2"), ("Infinity", "0"), ("-Infinity", "2")])
def test_extract_refuses_a_non_finite_face_box_before_any_worker(value, workers, tmp_path, dataset, weights):
    ds = dataset.copy(tmp_path / "ds")
    video_id = ds.video_ids()[-1]
    frame = _boxed(ds, video_id)
    boxes = ds.boxes()
    boxes[video_id][frame] = "@@"
    ds.face_boxes.write_text(json.dumps(boxes).replace('"@@"', f"[10, {value}, 40, 50]"))
    out = tmp_path / "c.zarr"
    result = run_cli(extract_args(ds, out, weights, "--workers", workers))
    assert_stops(result, f"error: {ds.face_boxes}: {video_id}/{frame}: a box must be finite numbers")
    assert not out.exists()


def test_extract_refuses_a_nan_body_box(tmp_path, dataset, weights):
    ds = dataset.copy(tmp_path / "ds")
    video_id = ds.video_ids()[0]
    bodies = json.loads(ds.body_boxes.read_text())
    bodies[video_id] = [float("nan"), 0, 50, 50]  # json.dumps writes NaN
    ds.body_boxes.write_text(json.dumps(bodies))
    result = run_cli(extract_args(ds, tmp_path / "c.zarr", weights, "--crop-body", "--body-boxes", str(ds.body_boxes),
                                  "--workers", "2"))
    assert_stops(result, f"error: {ds.body_boxes}: {video_id}: a box must be finite numbers, got [nan, 0, 50, 50]")


# --------------------------------------------------------------------------- errors in data-loader workers

class _Raises(torch.utils.data.Dataset):
    def __init__(self, err: Exception):
        self.err = err

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        raise self.err


@pytest.mark.parametrize("err", [
    DataError("x.jpg: cannot read image"),
    ValueError("--margin must be at least 0"),
    FileNotFoundError(2, "No such file or directory", "x.jpg"),
], ids=["DataError", "ValueError", "OSError"])
def test_an_error_in_a_loader_worker_reads_as_in_the_main_process(err):
    with pytest.raises(type(err)) as caught:
        next(iter(torch.utils.data.DataLoader(_Raises(err), batch_size=None, num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # really torch's re-raised form
    assert user_message(caught.value) == user_message(err)


def _corrupt_middle_frame(ds: Dataset, video_id: str) -> Path:
    frames = sorted((ds.root / video_id).glob("*.jpg"))
    frame = frames[len(frames) // 2]
    frame.write_bytes(b"\xff\xd8 not really a jpeg " * 20)
    return frame


def test_a_corrupt_frame_in_extract_workers_is_one_line(tmp_path, dataset, weights):
    ds = dataset.copy(tmp_path / "ds")
    frame = _corrupt_middle_frame(ds, ds.video_ids()[-1])
    result = run_cli(extract_args(ds, tmp_path / "c.zarr", weights, "--workers", "2"))
    assert_stops(result, f"error: {frame}: cannot read image")


def test_a_corrupt_frame_in_raw_training_workers_is_one_line(tmp_path, dataset, weights):
    """``RawClips`` raises in the worker; the CLI shows the worker's DataError as the main process would."""
    ds = dataset.copy(tmp_path / "ds")
    train = ds.root / "train.txt"
    frame = _corrupt_middle_frame(ds, train.read_text().split()[0])  # tiny's 8 segments use every frame
    result = run_cli([
        "train", "-c", "tiny", "--stage", "2", "--source", "raw", "--pretrained", str(weights),
        "--train-list", str(train), "--val-list", str(ds.root / "val.txt"), "--face-boxes", str(ds.face_boxes),
        "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--workers", "2",
    ])
    assert_stops(result, f"error: {frame}: cannot read image")


def _png_header(width: int, height: int) -> bytes:
    """A small PNG that declares ``width`` x ``height`` pixels (PIL checks the size when it opens the file)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_an_image_past_pils_size_limit_names_the_file(tmp_path):
    path = tmp_path / "huge.png"
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 10  # past the limit PIL refuses (not only warns) at
    path.write_bytes(_png_header(side, side))
    with pytest.raises(DataError, match=rf"^{path}: cannot read image \(Image size"):
        read_image(path)


# --------------------------------------------------------------------------- annotation files

@pytest.mark.parametrize("text", ["", "\n\n", "# clip_dir num_frames label\n\n   \n"], ids=["empty", "blank", "comments"])
def test_extract_refuses_an_annotation_file_that_lists_no_clip(text, tmp_path, dataset, weights):
    ds = dataset.copy(tmp_path / "ds")
    val = ds.root / "val.txt"
    val.write_text(text)
    out = tmp_path / "c.zarr"
    assert_stops(run_cli(extract_args(ds, out, weights, "--workers", "0")), f"error: {val}: no clips listed")
    assert not out.exists()


def test_read_annotations_refuses_a_file_that_lists_no_clip_also_for_training_from_the_cache(tmp_path):
    ann = tmp_path / "train.txt"
    ann.write_text("# nothing yet\n")
    for need_frames in (True, False):
        with pytest.raises(DataError, match=rf"^{ann}: no clips listed$"):
            read_annotations(ann, tmp_path, 5, need_frames=need_frames)
    ann.write_text("a 3 0\nb 3\n")
    with pytest.raises(DataError, match=rf"^{ann}: no usable clips \(2 bad line\(s\) skipped; first: {ann}:1: label 0"):
        read_annotations(ann, tmp_path, 5, skip_bad=True, need_frames=False)


def test_extract_skip_bad_refuses_a_file_whose_every_clip_is_bad(tmp_path, dataset, weights):
    ds = dataset.copy(tmp_path / "ds")
    val = ds.root / "val.txt"
    val.write_text("".join(f"{line.split()[0]} 3 9\n" for line in val.read_text().splitlines()))
    result = run_cli(extract_args(ds, tmp_path / "c.zarr", weights, "--workers", "0", "--skip-bad"))
    assert_stops(result, f"error: {val}: no usable clips (5 bad line(s) skipped; first: {val}:1: label 9 is outside 1..5")


def test_a_clip_path_with_a_space_says_so(tmp_path, dataset, weights):
    ds = dataset.copy(tmp_path / "ds")
    ann, lineno, video_id = ds.lines()[3]
    spaced = f"{video_id} copy"
    shutil.copytree(ds.root / video_id, ds.root / spaced)
    lines = ann.read_text().splitlines()
    lines[lineno - 1] = f"{spaced} 3 2"
    ann.write_text("\n".join(lines) + "\n")
    result = run_cli(extract_args(ds, tmp_path / "c.zarr", weights, "--workers", "0"))
    assert_stops(result, f"error: {ann}:{lineno}: ",
                 "the line has 4 fields instead of 3 (clip paths cannot contain spaces)")


# --------------------------------------------------------------------------- hidden files are not frames

def test_list_frames_skips_hidden_files(tmp_path):
    for name in ("00001.jpg", "00002.jpg", ".00001.jpg", "._00002.jpg", ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_frames(tmp_path)] == ["00001.jpg", "00002.jpg"]


def test_hidden_frame_files_do_not_change_the_extraction(tmp_path, dataset, zarr_cache, weights):
    ds = dataset.copy(tmp_path / "ds")
    video_ids = ds.video_ids()
    first, second = (sorted((ds.root / v).glob("*.jpg")) for v in video_ids[:2])
    (first[0].parent / f"._{first[0].name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble " * 8)  # garbage
    shutil.copy(second[1], second[1].parent / f".{second[1].name}")  # a valid image
    out = tmp_path / "c.zarr"
    result = run_cli(extract_args(ds, out, weights, "--views", "2", "--batch-size", "16", "--workers", "0"))
    assert result.exit_code == 0, result.output
    cache, full = FeatureCache.open(out), FeatureCache.open(zarr_cache[0])
    assert sorted(cache.video_ids) == sorted(full.video_ids)
    for v in video_ids:
        assert cache.frame_names(v) == full.frame_names(v), v
        assert_fp16_equal(cache.clip(v), full.clip(v).astype(np.float32), v)


# --------------------------------------------------------------------------- OS errors

def test_output_path_that_is_a_regular_file_is_one_line(tmp_path, dataset, weights):
    out = tmp_path / "mine.zarr"
    out.write_text("precious")
    assert_stops(run_cli(extract_args(dataset, out, weights, "--workers", "0")), f"error: {out}: Not a directory")
    assert out.read_text() == "precious"


def test_output_path_under_a_regular_file_is_one_line(tmp_path, dataset, weights):
    parent = tmp_path / "notes"
    parent.write_text("precious")
    for name in ("c.zarr", "c.h5"):
        assert_stops(run_cli(extract_args(dataset, parent / name, weights, "--workers", "0")),
                     f"error: --out {parent / name}: {parent} is a file, not a folder")
    assert parent.read_text() == "precious"


def test_h5_output_path_that_is_a_directory_is_one_line(tmp_path, dataset, weights):
    out = tmp_path / "mine.h5"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert_stops(run_cli(extract_args(dataset, out, weights, "--workers", "0")),
                 f"error: {out}: exists but is not a readable HDF5 file")
    assert (out / "thesis.tex").read_text() == "precious"


# --------------------------------------------------------------------------- what the small commands write

def test_init_weights_refuses_an_existing_file_and_an_unknown_model(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("clips/a 3 1\n")
    assert_stops(run_cli(["init-weights", str(listing)]),
                 f"error: OUT {listing} already exists: pass --overwrite to replace it")
    assert listing.read_text() == "clips/a 3 1\n"
    out = tmp_path / "w.pt"
    assert_stops(run_cli(["init-weights", str(out), "--model", "bogus"]),
                 "error: --model 'bogus': unknown open_clip model (try ViT-B-32, or caer-tiny for tests)")
    assert sorted(tmp_path.iterdir()) == [listing]
    result = run_cli(["init-weights", str(out)])
    assert result.exit_code == 0, result.output
    assert "visual.conv1.weight" in torch.load(out, weights_only=True)
    assert sorted(tmp_path.iterdir()) == [listing, out]  # no temporary file left beside it


def test_init_weights_overwrite_replaces_an_existing_file(tmp_path):
    out = tmp_path / "w.pt"
    out.write_text("an earlier file")
    result = run_cli(["init-weights", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "visual.conv1.weight" in torch.load(out, weights_only=True)


def test_synth_refuses_a_folder_that_is_not_empty(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_stops(run_cli(["synth", str(out), "--clips", "11", "--frames", "2"]),
                 f"error: OUT {out}: folder exists and is not empty; choose a new one")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(["synth", str(empty), "--clips", "11", "--frames", "2"])
    assert result.exit_code == 0 and (empty / "train.txt").is_file(), result.output


@pytest.mark.parametrize("clips", [14, 15])
def test_synth_says_when_a_class_has_no_training_clip(tmp_path, clips):
    out = tmp_path / "data"
    result = run_cli(["synth", str(out), "--clips", str(clips), "--classes", "5", "--frames", "2"])
    assert result.exit_code == 0, result.output
    train_labels = {line.split()[2] for line in (out / "train.txt").read_text().splitlines()}
    assert len(train_labels) == (4 if clips == 14 else 5)
    assert ("someclasseshavenotrainingclip" in squash(result.output)) == (clips == 14), result.output


def test_import_reference_help_shows_the_reference_configs_crop_defaults():
    result = run_cli(["import-reference", "--help"])
    assert result.exit_code == 0, result.output
    text = re.sub(r"[\s│]", "", result.output)  # rich wraps help text inside its panels' borders
    assert "thecache's" not in text
    assert text.count("[default:(theclip-caer-referenceconfig's)]") == 2  # --crop-body and --margin


# `caer extract` under a file-size limit: a write past it fails with EFBIG ("File too large") instead of
# the default SIGXFSZ killing the process.
LIMITED_CAER = """
import resource, signal, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from caer.cli import main
sys.argv = ["caer", *sys.argv[1:]]
main()
"""
# zarr: every metadata file fits, clips of up to 4 frames (views 2: 2048 bytes) fit, longer ones do not, so the
# first clips of val.txt (3, 4, 6 frames) finish and the third fails. h5: every staging file fits, the .h5 does not.
LIMITS = {"zarr": 2500, "h5": 16384}


def _size_limited_args(ds: Dataset, out: Path, weights: Path) -> list[str]:
    args = extract_args(ds, out, weights, "--views", "2", "--batch-size", "16", "--workers", "0")
    anns = [str(ds.root / f"{s}.txt") for s in ("train", "val", "test")]
    return [*args[:1], anns[1], anns[2], anns[0], *args[4:]]  # val first: its short clips fit under the limit


@pytest.fixture(scope="module")
def too_large(tmp_path_factory, dataset, weights):
    """Per format: (output of `caer extract` under the file-size limit, its return code, the store, its args)."""
    runs = {}

    def get(fmt: str):
        if fmt not in runs:
            out = tmp_path_factory.mktemp("efbig") / f"c.{fmt}"
            args = _size_limited_args(dataset, out, weights)
            proc = subprocess.run([sys.executable, "-c", LIMITED_CAER.format(limit=LIMITS[fmt]), *args],
                                  capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"}, timeout=300)
            runs[fmt] = (proc.stdout + proc.stderr, proc.returncode, out, args)
        return runs[fmt]

    return get


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_file_too_large_stops_with_one_line(fmt, too_large):
    output, returncode, _, _ = too_large(fmt)
    assert returncode == 2, output
    assert "File too large" in error_line(output)


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_file_too_large_names_a_file_of_the_store(fmt, too_large):
    output, returncode, out, _ = too_large(fmt)
    assert returncode == 2, output
    line = error_line(output)
    assert "File too large" in line and f"error: {out}" in line, output


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_a_rerun_after_file_too_large_completes_the_store(fmt, too_large, zarr_cache):
    output, returncode, out, args = too_large(fmt)
    assert returncode != 0, output
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    cache, full = FeatureCache.open(out), FeatureCache.open(zarr_cache[0])
    summary = cache.attrs["summary"]
    if fmt == "zarr":  # the re-run found some clips done and extracted the others
        assert 0 < summary["clips_already_done"] < len(full.video_ids)
    else:  # every clip was written before the HDF5 build failed: the re-run extracted none, and kept that summary
        assert summary["clips_extracted"] == len(full.video_ids)
    assert sorted(cache.video_ids) == sorted(full.video_ids)
    for v in full.video_ids:
        assert cache.frame_names(v) == full.frame_names(v), v
        assert_fp16_equal(cache.clip(v), full.clip(v).astype(np.float32), v)
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")) == [out.name]


@pytest.mark.parametrize("command, left", [
    ("extract", "interrupted: the clips finished so far are kept; run the same command again to extract the rest"),
    ("train", "interrupted: the epochs finished so far are kept; the same command with --resume goes on"),
    ("boxes", "interrupted: nothing was written (the box files are written once every clip is done)"),
])
def test_ctrl_c_says_in_one_line_what_it_left(command, left, monkeypatch, dataset, weights, tmp_path):
    import caer.pipeline.boxes
    import caer.pipeline.extract
    import caer.pipeline.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(caer.pipeline.extract, "extract", interrupted)
    monkeypatch.setattr(caer.pipeline.train, "run", interrupted)
    monkeypatch.setattr(caer.pipeline.boxes, "find_boxes", interrupted)
    args = {"extract": extract_args(dataset, tmp_path / "c.zarr", weights),
            "train": ["train", "-c", "tiny", "--train-list", str(dataset.annotations[0]), "--run-dir", str(tmp_path / "r")],
            "boxes": ["boxes", str(dataset.annotations[0]), "-o", str(tmp_path / "b.json")]}[command]
    result = run_cli(args)
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert squash(left) in squash(result.output), result.output


def test_compare_reads_a_run_config_as_config_files_are_read(tmp_path):
    """A config.yaml with a key given twice, or one that is not a mapping, is one error line naming it."""
    twice, listed = tmp_path / "twice", tmp_path / "listed"
    twice.mkdir(), listed.mkdir()
    (twice / "config.yaml").write_text("lr: 0.1\nlr: 0.2\n")
    (listed / "config.yaml").write_text("- lr\n")
    assert_stops(run_cli(["compare", str(twice)]), f"{twice / 'config.yaml'}: line 2: 'lr' is given twice")
    assert_stops(run_cli(["compare", str(listed)]), f"{listed / 'config.yaml'}: expected a mapping")


def test_an_eval_report_says_whether_flip_tta_made_it():
    """A report from `--tta flip` says so in its JSON and title; a plain one says none."""
    from caer.pipeline.report import Report

    labels = np.array([0, 1, 1])
    plain = Report(["a", "b"], labels, labels, ["x", "y", "z"], "c.pt", "test", "cache")
    flipped = Report(["a", "b"], labels, labels, ["x", "y", "z"], "c.pt", "test", "cache", tta="flip")
    assert plain.as_dict()["tta"] == "none" and flipped.as_dict()["tta"] == "flip"
    assert "TTA flip" in flipped.tables().renderables[0].title and "TTA" not in plain.tables().renderables[0].title


def test_a_metrics_file_s_torn_last_line_is_left_out_and_any_other_bad_line_named(tmp_path):
    """A run stopped while appending leaves a last line cut short (its epoch has no checkpoint): it is left out.
    A bad line anywhere else is an error naming the file and line."""
    from caer.pipeline.curves import read_metrics

    good = json.dumps({"stage": 1, "epoch": 0}) + "\n"
    torn, inner = tmp_path / "torn.jsonl", tmp_path / "inner.jsonl"
    torn.write_text(good + good[:-9])
    inner.write_text(good + "{bad\n" + good)
    assert read_metrics(torn) == [{"stage": 1, "epoch": 0}]
    with pytest.raises(ValueError, match=re.escape(f"{inner}:2: not a metrics record")):
        read_metrics(inner)


def test_dropping_metrics_on_resume_replaces_the_file_whole(tmp_path, monkeypatch):
    """A failed rewrite (a full disk) leaves metrics.jsonl as it was, and the error names it, not a temporary file."""
    from caer.pipeline import train as train_module

    path = tmp_path / "metrics.jsonl"
    before = "".join(json.dumps({"stage": s, "epoch": e}) + "\n" for s in (1, 2) for e in range(3))
    path.write_text(before)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as caught:
        train_module._drop_metrics_after(path, 2, 0)
    assert path.read_text() == before and caught.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_failed_checkpoint_write_names_the_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: it becomes an OSError naming the file (one error line)."""
    from caer.model import checkpoint as checkpoint_module

    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 800832 vs 800724")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    target = tmp_path / "stage2-last.pt"
    with pytest.raises(OSError) as caught:
        checkpoint_module.save_checkpoint({"x": 1}, target)
    assert user_message(caught.value).startswith(f"{target}: cannot write the checkpoint")
    assert list(tmp_path.iterdir()) == []


def test_an_output_in_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    from caer.files import check_outputs

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=re.escape(f"--json {tmp_path / 'r.json'}: cannot write in {tmp_path}")):
        check_outputs([("--json", tmp_path / "r.json")], [], overwrite=False)


def test_a_second_caer_train_into_a_run_dir_being_written_is_refused(tmp_path, dataset, zarr_cache, weights):
    """Two runs into one folder would mix their metrics and checkpoints: the second is refused, naming the first."""
    from rich.console import Console

    from caer.files import FileLock
    from caer.pipeline.run_dir import RunDir
    from caer.pipeline.train import run
    from conftest import one_epoch_config

    cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", stage=2)
    lock = FileLock(RunDir(tmp_path / "run").lock, "caer train")
    assert lock.acquire() is None
    try:
        with pytest.raises(ValueError, match=r"--run-dir \S+ is being written by caer train \(pid"):
            run(cfg, Console(quiet=True))
    finally:
        lock.release()
    assert not (tmp_path / "run").exists()
    # the lock is hidden beside the folder (runs/* names run directories only), one whatever the folder's spelling
    assert RunDir(tmp_path / "run").lock == tmp_path / ".run.lock" == RunDir(tmp_path / "x" / ".." / "run").lock
    (tmp_path / "file").write_text("")
    for run_dir in (tmp_path / "file", tmp_path / "file" / "run"):  # before any lock file is made
        with pytest.raises(ValueError, match=re.escape(f"--run-dir {run_dir}: {tmp_path / 'file'} is a file, not a")):
            run(one_epoch_config(dataset, zarr_cache[0], weights, run_dir, stage=2), Console(quiet=True))


def test_compare_names_a_test_report_it_cannot_read(tmp_path):
    (tmp_path / "config.yaml").write_text("lr: 0.1\n")
    (tmp_path / "test_report.json").write_text("{bad")
    assert_stops(run_cli(["compare", str(tmp_path)]), f"{tmp_path / 'test_report.json'}: not a readable test report")


def test_an_atomic_write_names_only_its_own_errors(tmp_path):
    """A write error without a file name (a full disk) is named by the output; any other error passes unchanged."""
    from caer.files import replaced_atomically

    target = tmp_path / "out.bin"
    with pytest.raises(OSError) as caught:
        with replaced_atomically(target):
            raise OSError(28, "No space left on device")
    assert caught.value.filename == str(target) and caught.value.strerror == "No space left on device"
    with pytest.raises(OSError, match="connection reset by the reader") as caught:
        with replaced_atomically(target):
            raise OSError("connection reset by the reader")
    assert caught.value.filename is None and not list(tmp_path.iterdir())
