"""Runs that fail early or go on (issue 10): every split checked before the first epoch, clips that
``caer extract --skip-bad`` skipped left out and counted, ``--resume`` with nothing to resume, ``--epochs 0``
refused up front, and checkpoints loaded with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from rich.console import Console

from caer import runtime
from caer.cache import CacheError, FeatureCache
from caer.config import load_config
from caer.data.loaders import recorded_skips, split_clips
from caer.model.checkpoint import TRUST_ENV, load_checkpoint, save_checkpoint
from caer.model.encoder import save_random_weights
from caer.pipeline import train as train_module
from caer.pipeline.curves import read_metrics
from caer.pipeline.extract import extract
from caer.pipeline.train import run, train_stage
from conftest import MODEL, assert_in_output, extract_args, one_epoch_config, quiet_console, run_cli, settings_for


def train_args(dataset, cache, weights, run_dir, *extra: str) -> list[str]:
    """`caer train` stage 2 from the cache, 1 epoch, on the conftest dataset (CLI form)."""
    return [
        "train", "-c", "tiny", "--stage", "2", "--pretrained", str(weights), "--cache", str(cache),
        "--train-list", str(dataset.root / "train.txt"), "--val-list", str(dataset.root / "val.txt"),
        "--face-boxes", str(dataset.face_boxes), "--run-dir", str(run_dir), "--epochs", "1", "--batch-size", "1",
        "--workers", "0", "--device", "cpu", *extra,
    ]


def error_line(result) -> str:
    """The one line of a refused command (exit code 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# ------------------------------------------------------------------------------------------ 1. every split, up front

def test_a_test_split_missing_from_the_cache_is_refused_before_the_first_epoch(dataset, zarr_cache, weights, tmp_path):
    test_list = tmp_path / "test.txt"
    first = dataset.root.joinpath("test.txt").read_text().splitlines()[0]
    test_list.write_text(f"{first}\nframes/test/never_extracted 4 2\nframes/test/nor_this 4 3\n")
    run_dir = tmp_path / "run"
    result = run_cli(train_args(dataset, zarr_cache[0], weights, run_dir, "--test-list", str(test_list)))
    line = error_line(result)
    assert_in_output(f"2 clip(s) of {test_list} are not in the cache (first: 'frames/test/never_extracted')", line)
    assert_in_output(f"run caer extract on {test_list}", line)
    assert not run_dir.exists()  # refused before anything was trained or written

    # the test report of a run whose last stage is 3 reads raw frames: the cache need not hold the test clips
    cfg = one_epoch_config(dataset, zarr_cache[0], weights, run_dir, test_list=str(test_list))
    train_module.check_test_in_cache(cfg, [3])
    with pytest.raises(CacheError, match="2 clip"):
        train_module.check_test_in_cache(cfg, [1, 2])


def test_a_stage_refused_at_set_up_leaves_no_empty_run_folder(dataset, zarr_cache, weights, tmp_path):
    val_list = tmp_path / "val.txt"
    val_list.write_text("frames/val/never_extracted 4 2\n")
    run_dir = tmp_path / "run"
    result = run_cli(train_args(dataset, zarr_cache[0], weights, run_dir, "--val-list", str(val_list)))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert_in_output(f"1 clip(s) of {val_list} are not in the cache", result.output)
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------ 2. skipped clips

def corrupt_middle_frame(root: Path, video_id: str) -> None:
    frames = sorted((root / video_id).iterdir())
    frames[len(frames) // 2].write_bytes(b"\xff\xd8 not really a jpeg " * 20)


@pytest.fixture(scope="module")
def skipped_store(tmp_path_factory, dataset, weights):
    """A dataset copy with a corrupt frame in one training and one test clip, extracted with --skip-bad:
    (dataset, store, {split: skipped video id})."""
    ds = dataset.copy(tmp_path_factory.mktemp("skipped") / "ds")
    bad = {split: (ds.root / f"{split}.txt").read_text().split()[0] for split in ("train", "test")}
    for video_id in bad.values():
        corrupt_middle_frame(ds.root, video_id)
    store = ds.root.parent / "cache.zarr"
    result = run_cli(extract_args(ds, store, weights, "--views", "1", "--workers", "0", "--skip-bad"))
    assert result.exit_code == 0, result.output
    assert len(FeatureCache.open(store).attrs["skipped"]) == 2
    return ds, store, bad


def test_clips_that_extraction_skipped_are_left_out_of_training_and_counted(skipped_store, weights, tmp_path):
    ds, store, bad = skipped_store
    run_dir = tmp_path / "run"
    result = run_cli(train_args(ds, store, weights, run_dir, "--test-list", str(ds.root / "test.txt")))
    assert result.exit_code == 0, result.output
    assert_in_output(f"left out 1 clip(s) of {ds.root / 'train.txt'} that caer extract --skip-bad skipped "
                     f"(first: {bad['train']!r})", result.output)
    assert_in_output(f"left out 1 clip(s) of {ds.root / 'test.txt'}", result.output)
    (record,) = read_metrics(run_dir / "metrics.jsonl")
    assert record["skipped_clips"] == {"train": 1, "val": 0}
    assert record["train_clips"] == 1  # the other training clip
    report = json.loads((run_dir / "test_report.json").read_text())
    assert report["skipped_clips"] == 1 and len(report["predictions"]) == 4
    assert bad["test"] not in {p["video_id"] for p in report["predictions"]}


@pytest.mark.parametrize("source", ["cache", "raw"])
def test_eval_leaves_out_the_skipped_clips_of_its_split(source, skipped_store, weights, tmp_path):
    ds, store, bad = skipped_store
    run_dir = tmp_path / "run"
    train_stage(one_epoch_config(ds, store, weights, run_dir, test_list=None), 2, quiet_console())
    # raw frames too: the corrupt frame is never read, so cache and raw evaluate the same clips
    result = run_cli(["eval", str(run_dir / "stage2-best.pt"), "--split", str(ds.root / "test.txt"), "--source", source,
                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert_in_output(f"left out 1 clip(s) of {ds.root / 'test.txt'}", result.output)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["skipped_clips"] == 1 and report["source"] == source
    assert [p["video_id"] for p in report["predictions"]] == ds.root.joinpath("test.txt").read_text().split()[3::3]


def test_a_store_without_skipped_clips_is_read_from_its_skipped_lines(skipped_store, tmp_path):
    """Stores written before the ``skipped_clips`` attribute: the video ids come from the annotation lines that
    ``skipped`` names; a clip neither extracted nor skipped is still an error."""
    ds, store, bad = skipped_store
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    zarr.open_group(str(old), mode="a").attrs.pop("skipped_clips", None)
    cache = FeatureCache.open(old)
    assert "skipped_clips" not in cache.attrs
    assert recorded_skips(cache) == set(bad.values()) == recorded_skips(FeatureCache.open(store))
    cfg = load_config("tiny", {"train_list": str(ds.root / "train.txt"), "test_list": str(ds.root / "test.txt")})
    clips, left_out = split_clips(cfg, "train", cache, "cache")
    assert left_out == [bad["train"]] and bad["train"] not in [c.video_id for c in clips]

    never = tmp_path / "never.txt"
    never.write_text(ds.root.joinpath("train.txt").read_text() + "frames/train/never_extracted 4 1\n")
    cfg = load_config("tiny", {"train_list": str(never)})
    with pytest.raises(CacheError, match=r"1 clip\(s\) of .* are not in the cache \(first: 'frames/train/never_extracted'\)"):
        split_clips(cfg, "train", cache, "cache")


# ------------------------------------------------------------------------------------------ 3. nothing to resume

def test_resume_with_nothing_to_resume_says_so_and_starts_afresh(dataset, zarr_cache, weights, tmp_path):
    run_dir = tmp_path / "run"
    out = io.StringIO()
    cfg = one_epoch_config(dataset, zarr_cache[0], weights, run_dir, stage=2, resume=True, test_list=None)
    train_module.run(cfg, Console(file=out, width=300))
    assert_in_output(f"nothing to resume in {run_dir}: starting stage 2 afresh", out.getvalue())
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0]


# ------------------------------------------------------------------------------------------ 4. --epochs 0

@pytest.mark.parametrize("extra, fragment", [
    (("--epochs", "0"), "--epochs 0: stage 2 would train no epochs"),
    (("--epochs-stage2", "0"), "--epochs-stage2 0: stage 2 would train no epochs"),
    (("--staged-training", "--epochs", "0", "--epochs-stage1", "0", "--epochs-stage3", "0"),
     "--staged-training with 0 epochs for every stage"),
])
def test_zero_epochs_is_refused_up_front_naming_the_flag(extra, fragment, dataset, zarr_cache, weights, tmp_path):
    run_dir = tmp_path / "run"
    line = error_line(run_cli(train_args(dataset, zarr_cache[0], weights, run_dir, *extra)))
    assert_in_output(fragment, line)
    assert not run_dir.exists()


def test_staged_training_still_skips_a_stage_with_zero_epochs(dataset, zarr_cache, weights, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(train_args(dataset, zarr_cache[0], weights, run_dir, "--staged-training", "--epochs-stage1", "0",
                                "--epochs-stage3", "0"))
    assert result.exit_code == 0, result.output
    assert "stage 1: 0 epochs, skipped" in result.output and "stage 3: 0 epochs, skipped" in result.output
    assert [r["stage"] for r in read_metrics(run_dir / "metrics.jsonl")] == [2]


# ------------------------------------------------------------------------------------------ 5. safe checkpoints

@pytest.mark.parametrize("given, local_rank, expected", [
    ("cuda", None, "cuda:3"),  # a single process: the current GPU, with its index
    ("cuda", "1", "cuda:1"),  # under torchrun: its own GPU
    ("cuda:2", "1", "cuda:2"),  # named by the user: as named
    ("cpu", "1", "cpu"),
])
def test_the_device_of_a_process_is_indexed_and_made_current(given, local_rank, expected, monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert runtime.local_device(torch.device(given)) == torch.device(expected)
    assert made_current == ([] if expected == "cpu" else [torch.device(expected)])


def test_rng_state_survives_a_weights_only_round_trip():
    random.seed(1)
    np.random.seed(2)
    np.random.randn(3)  # a cached gaussian in numpy's state
    torch.manual_seed(3)
    buffer = io.BytesIO()
    torch.save(runtime.rng_state(), buffer)
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    buffer.seek(0)
    runtime.set_rng_state(torch.load(buffer, weights_only=True))
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


class Stop(Exception):
    pass


def stopped_after_one_epoch(cfg, monkeypatch) -> None:
    """Stage 2 of ``cfg`` until the metrics line of its second epoch fails: a run stopped part-way, whose last
    checkpoint is its first epoch's."""
    real = train_module._append_metrics

    def stop(path, record):
        if record["epoch"] == 1:
            raise Stop
        real(path, record)

    monkeypatch.setattr(train_module, "_append_metrics", stop)
    with pytest.raises(Stop):
        train_stage(cfg, 2, quiet_console())
    monkeypatch.undo()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_checkpoint_of_train_loads_with_weights_only_and_resumes_exactly(dataset, zarr_cache, weights, tmp_path,
                                                                            monkeypatch, workers):
    """With data-loader workers too: they must not make the resumed run draw from the global RNG elsewhere."""
    quiet = quiet_console()
    full = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "full", epochs_stage2=3, test_list=None,
                            workers=workers)
    train_stage(full, 2, quiet)
    ckpt = torch.load(tmp_path / "full" / "stage2-last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["metrics"]["epoch"] == 2 and isinstance(ckpt["best"]["valid_uar"], float)

    stopped_after_one_epoch(one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "cut", epochs_stage2=3,
                                             test_list=None, workers=workers), monkeypatch)
    out = io.StringIO()
    train_stage(one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "cut", epochs_stage2=3, test_list=None,
                                 resume=True, workers=workers), 2, Console(file=out, width=300))
    assert "resuming stage 2 at epoch 2/3" in out.getvalue()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == strip


def test_a_checkpoint_refuses_other_clip_weights_than_it_was_trained_from(dataset, zarr_cache, weights, tmp_path):
    """The config's --pretrained path may name other weights where the checkpoint is used (a relative path, a
    replaced file): eval, extract --from-checkpoint and --init-from refuse them, naming both; --pretrained says
    where the right ones are."""
    moved = tmp_path / "clip.pt"
    shutil.copy(weights, moved)
    train_stage(one_epoch_config(dataset, zarr_cache[0], moved, tmp_path / "run", test_list=None), 2,
                quiet_console())
    ckpt = tmp_path / "run" / "stage2-best.pt"
    save_random_weights(MODEL, moved, seed=1)  # other weights where the config says
    trained_from = load_checkpoint(ckpt)["encoder"]["weights"]
    val = str(dataset.root / "val.txt")
    refused = run_cli(["eval", str(ckpt), "--split", "val", "--device", "cpu", "--workers", "0"])
    assert refused.exit_code == 2, refused.output
    assert_in_output(f"{ckpt}: it was trained from the CLIP weights {trained_from}, but --pretrained {moved} gives "
                     "sha256:", refused.output)
    assert run_cli(["eval", str(ckpt), "--split", "val", "--device", "cpu", "--workers", "0", "--pretrained",
                    str(weights)]).exit_code == 0
    extract = ["extract", val, "--from-checkpoint", str(ckpt), "--face-boxes", str(dataset.face_boxes), "--device",
               "cpu", "--workers", "0", "-o"]
    refused = run_cli([*extract, str(tmp_path / "a.zarr")])
    assert refused.exit_code == 2 and not (tmp_path / "a.zarr").exists(), refused.output
    assert_in_output(f"{ckpt}: it was trained from the CLIP weights {trained_from}", refused.output)
    made = run_cli([*extract, str(tmp_path / "b.zarr"), "--pretrained", str(weights)])
    assert made.exit_code == 0 and FeatureCache.open(tmp_path / "b.zarr").fingerprint["encoder"]["weights"] == trained_from
    with pytest.raises(ValueError, match=f"trained from the CLIP weights {trained_from}, but --pretrained {moved}"):
        train_stage(one_epoch_config(dataset, zarr_cache[0], moved, tmp_path / "next", test_list=None), 2,
                    quiet_console(), ckpt)


def test_a_checkpoint_whose_clip_weights_moved_says_to_pass_them(dataset, zarr_cache, weights, tmp_path):
    moved = tmp_path / "clip.pt"
    shutil.copy(weights, moved)
    train_stage(one_epoch_config(dataset, zarr_cache[0], moved, tmp_path / "run", test_list=None), 2,
                quiet_console())
    moved.unlink()
    ckpt = tmp_path / "run" / "stage2-best.pt"
    line = error_line(run_cli(["eval", str(ckpt), "--split", "val", "--device", "cpu", "--workers", "0"]))
    assert_in_output(f"{ckpt}: --pretrained '{moved}': not a file and not an open_clip tag", line)
    assert_in_output("; pass --pretrained with the base weights it was trained from (a file on this machine or an "
                     "open_clip tag)", line)


def test_a_checkpoint_refuses_a_config_with_other_class_texts(dataset, zarr_cache, weights, tmp_path):
    """Its prompts were learned before its class texts, and its sentence embeddings (t_desc) would silently replace
    the config's: --init-from with other descriptions or class names is refused, naming the key."""
    quiet = quiet_console()
    train_stage(one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", test_list=None), 2, quiet)
    first = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "x", test_list=None)
    sentences = [f"A student who looks {c}." for c in first.model.classes]
    renamed = {"classes": [c.upper() for c in first.model.classes], "descriptions": first.model.descriptions}
    for key, value in (("descriptions", {"descriptions": sentences}), ("classes", renamed)):
        cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "next", test_list=None, **value)
        with pytest.raises(ValueError, match=f"it was trained with {key} .*, this run sets .*: keep the checkpoint's"):
            train_stage(cfg, 2, quiet, tmp_path / "run" / "stage2-best.pt")


def test_resume_refuses_settings_it_would_not_apply_and_a_refused_stage_keeps_the_run_s_config(
        dataset, zarr_cache, weights, tmp_path, monkeypatch):
    """The optimiser, schedule and random state of the checkpoint would override a changed --lr or --epochs, which
    config.yaml would then claim; a stage refused at set-up leaves config.yaml as the run's own."""
    stopped_after_one_epoch(one_epoch_config(dataset, zarr_cache[0], weights, tmp_path, epochs_stage2=3, test_list=None),
                            monkeypatch)
    written = (tmp_path / "config.yaml").read_text()
    for change, shown in (({"lr": 0.5}, " -> 0.5: give the values it was started with"), ({"epochs_stage2": 4}, "epochs of stage 2 3 -> 4"),
                          ({"lr_group": ["2.image_encoder=1e-5"]}, "--lr-group 2.image_encoder: stage 2 trains")):
        cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path, test_list=None, resume=True,
                               **({"epochs_stage2": 3} | change))
        with pytest.raises(ValueError, match=re.escape(shown)):
            train_stage(cfg, 2, quiet_console())
        assert (tmp_path / "config.yaml").read_text() == written
    resumed = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path, epochs_stage2=3, test_list=None, resume=True,
                               print_confusion="end", grad_checkpointing=True, lr_stage1=0.5)  # none changes stage 2
    train_stage(resumed, 2, quiet_console())
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]



def test_resume_refuses_a_cache_extracted_otherwise_and_takes_a_moved_copy(dataset, zarr_cache, weights, clip_model,
                                                                         tmp_path, monkeypatch):
    """The rest of a resumed stage reads features made as those it started from (a copy elsewhere is the same)."""
    run_dir = tmp_path / "run"
    stopped_after_one_epoch(one_epoch_config(dataset, zarr_cache[0], weights, run_dir, epochs_stage2=3, test_list=None),
                            monkeypatch)
    one_view = tmp_path / "one-view.zarr"
    extract(settings_for(dataset, one_view, views=1), clip_model, quiet_console())
    cfg = one_epoch_config(dataset, one_view, weights, run_dir, epochs_stage2=3, test_list=None, resume=True)
    with pytest.raises(ValueError, match=re.escape(f"but {one_view} was extracted otherwise (views: store has 1, this "
                                                   "run has 2)")):
        train_stage(cfg, 2, quiet_console())
    moved = tmp_path / "moved.zarr"
    shutil.copytree(zarr_cache[0], moved)
    train_stage(one_epoch_config(dataset, moved, weights, run_dir, epochs_stage2=3, test_list=None, resume=True), 2,
                quiet_console())
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2]

def test_an_lr_group_of_a_later_stage_is_checked_before_the_first_stage_trains(dataset, zarr_cache, weights,
                                                                                tmp_path):
    cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", staged_training=True, test_list=None,
                           lr_group=["3.adaptr=1e-5"])
    with pytest.raises(ValueError, match="--lr-group 3.adaptr: stage 3 trains prompt, adapter"):
        train_module.run(cfg, quiet_console())
    assert not list((tmp_path / "run").glob("*.pt"))


def test_a_run_given_relative_paths_evaluates_from_any_folder(dataset, zarr_cache, weights, tmp_path, monkeypatch):
    """The run's config keeps its files as absolute paths; a run without a test list points eval to --split FILE;
    a cache that is gone is said to be gone before eval turns to raw frames."""
    work = tmp_path / "work"
    work.mkdir()
    for name, source in (("train.txt", dataset.root / "train.txt"), ("val.txt", dataset.root / "val.txt"),
                         ("tiny.pt", weights)):
        shutil.copy(source, work / name)
    shutil.copytree(zarr_cache[0], work / "cache.zarr")
    monkeypatch.chdir(work)
    trained = run_cli(["train", "-c", "tiny", "--stage", "2", "--pretrained", "tiny.pt", "--cache", "cache.zarr",
                       "--train-list", "train.txt", "--val-list", "val.txt", "--root", str(dataset.root),
                       "--face-boxes", str(dataset.face_boxes), "--run-dir", "run", "--epochs", "1",
                       "--batch-size", "1", "--workers", "0", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    monkeypatch.chdir(tmp_path)
    ckpt = "work/run/stage2-best.pt"
    assert run_cli(["eval", ckpt, "--split", "val", "--device", "cpu", "--workers", "0"]).exit_code == 0
    line = error_line(run_cli(["eval", ckpt, "--device", "cpu", "--workers", "0"]))
    assert_in_output("--test-list is not set (caer eval takes it from the checkpoint's run, which had none: give an "
                     "annotation file with --split FILE)", line)
    shutil.rmtree(work / "cache.zarr")
    moved = run_cli(["eval", ckpt, "--split", "val", "--device", "cpu", "--workers", "0"])
    assert_in_output(f"note: the run's cache {work / 'cache.zarr'} is not there (give --cache if it moved): "
                     "evaluating from raw frames", moved.output)


def test_a_run_started_without_loss_scaling_resumes_where_it_scales(dataset, zarr_cache, weights, tmp_path,
                                                                   monkeypatch):
    """A run started on the CPU or a bf16 GPU saves a disabled scaler's empty state; resumed on an fp16 GPU, whose
    scaler is on, it starts a fresh scale (loading the empty state raised). The CPU's scaler stands in for it."""
    stopped_after_one_epoch(one_epoch_config(dataset, zarr_cache[0], weights, tmp_path, epochs_stage2=2, test_list=None),
                            monkeypatch)
    assert torch.load(tmp_path / "stage2-last.pt", weights_only=True)["scaler"] == {}
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(train_module.torch.amp, "GradScaler", lambda device, enabled: scaler("cpu", enabled=True))
    train_stage(one_epoch_config(dataset, zarr_cache[0], weights, tmp_path, epochs_stage2=2, test_list=None, resume=True),
                2, quiet_console())
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]


def test_a_diverging_loss_is_one_line_naming_the_remedies(dataset, zarr_cache, weights, tmp_path, monkeypatch):
    from caer.model.losses import CAERLoss

    class Diverging(CAERLoss):
        def __call__(self, *args, **kwargs):
            terms = super().__call__(*args, **kwargs)
            return terms._replace(total=terms.total * float("nan"))

    monkeypatch.setattr(train_module, "CAERLoss", Diverging)
    result = run_cli(train_args(dataset, zarr_cache[0], weights, tmp_path / "run"))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert_in_output("error: stage 2 epoch 1: the loss became nan; train the stage again with --overwrite and a "
                     "lower learning rate (--lr), or clipped gradients (--grad-clip 1.0)", result.output)


def test_weights_written_twice_with_one_seed_are_one_file_with_one_digest(tmp_path):
    """caer knows weights by their file's digest: the same weights, written again or under another name, are the
    same weights."""
    from caer.model.encoder import file_sha256

    first, again, other = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    for path in (first, again):
        assert run_cli(["init-weights", str(path)]).exit_code == 0
    assert run_cli(["init-weights", str(first), "--overwrite"]).exit_code == 0
    assert run_cli(["init-weights", str(other), "--seed", "1"]).exit_code == 0
    assert file_sha256(first) == file_sha256(again) != file_sha256(other)


def test_a_tag_that_cannot_be_downloaded_is_one_line(monkeypatch, dataset, tmp_path):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': <urlopen error [Errno -3] Temporary failure "
                           "in name resolution>. Please check your connection")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    line = error_line(run_cli(["extract", str(dataset.root / "val.txt"), "--face-boxes", str(dataset.face_boxes),
                               "--model", "ViT-B-32-quickgelu", "--pretrained", "openai", "-o",
                               str(tmp_path / "c.zarr"), "--device", "cpu"]))
    assert_in_output("--pretrained 'openai': the weights could not be downloaded (no internet here?); download them "
                     "once where there is, or give a local file of them", line)


class RunsCode:
    """Unpickling this runs a shell command: what a malicious "checkpoint" would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_file_that_needs_full_unpickling_is_refused_without_running_it(writer, tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    payload = {"config": RunsCode(marker), "encoder": {}}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match=f"cannot be loaded safely.*set {TRUST_ENV}=1"):
        load_checkpoint(evil)
    line = error_line(run_cli(["eval", str(evil)]))
    assert_in_output(f"{evil}: cannot be loaded safely", line)
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_called_that_not_unsafe(dataset, tmp_path):
    """A text file (an annotation list given by mistake) or a cut-off torch file: 'not a checkpoint', not the
    advice to trust it with full unpickling."""
    cut = tmp_path / "cut.pt"
    torch.save({"config": {}, "encoder": {}, "model": {"w": torch.zeros(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    for path in (dataset.root / "train.txt", cut):
        line = error_line(run_cli(["eval", str(path)]))
        assert_in_output(f"{path}: not a checkpoint (neither a torch.save zip file nor a pickle)", line)
        assert TRUST_ENV not in line


def test_an_older_checkpoint_loads_only_when_trusted(dataset, zarr_cache, weights, tmp_path, monkeypatch):
    """A checkpoint with numpy's own RNG state (as caer wrote them before) needs full unpickling: refused, unless
    CAER_TRUST_CHECKPOINTS=1; its RNG state still restores."""
    train_stage(one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", test_list=None), 2,
                quiet_console())
    ckpt = torch.load(tmp_path / "run" / "stage2-last.pt", weights_only=True)
    ckpt["rng"]["numpy"], ckpt["rng"]["python"] = np.random.get_state(), random.getstate()
    ckpt["metrics"]["valid_uar"] = np.float64(ckpt["metrics"]["valid_uar"])
    older = tmp_path / "older.pt"
    torch.save(ckpt, older)
    with pytest.raises(ValueError, match="cannot be loaded safely: it needs full unpickling"):
        load_checkpoint(older)
    monkeypatch.setenv(TRUST_ENV, "1")
    runtime.set_rng_state(load_checkpoint(older)["rng"])

    # what caer writes now loads safely, numpy values included
    save_checkpoint(ckpt, tmp_path / "now.pt")
    again = torch.load(tmp_path / "now.pt", weights_only=True)
    assert type(again["metrics"]["valid_uar"]) is float


def test_amp_on_the_cpu_is_a_notice_not_a_silent_no_op(dataset, zarr_cache, weights, clip_model, tmp_path):
    for use_amp in (True, False):
        out = io.StringIO()
        run(one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / f"amp-{use_amp}", use_amp=use_amp,
                             staged_training=True, epochs_stage3=0, test_list=None), Console(file=out, width=300))
        assert out.getvalue().count("note: --use-amp has no effect on cpu") == use_amp  # once, not once a stage
        out = io.StringIO()
        extract(settings_for(dataset, tmp_path / f"amp-{use_amp}.zarr", use_amp=use_amp), clip_model,
                Console(file=out, width=300))
        assert ("note: --use-amp has no effect on cpu" in out.getvalue()) == use_amp
