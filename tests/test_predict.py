"""Issue 11, part 3: `caer predict` on videos and frame folders, with a box file or a face detector.

The videos of the synthetic clips are H.264 in RGB at CRF 0 (``libx264rgb``, .mp4): lossless, so their decoded frames
are the JPEG frames' pixels exactly (checked here), and `caer predict` on them must give `caer eval --source raw`'s
probabilities on the frame folders up to float32 noise (tolerance 1e-5 on each probability).
"""

from __future__ import annotations

import io
import json
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from rich.console import Console
from test_boxes import iou, two_faces
from test_boxes import write_video as write_h264
from test_video import as_video_dataset

import caer.pipeline.predict
from caer.cli import app
from caer.config import PREDICT_DETECTION, PREDICT_OVERRIDES, PredictConfig, Source, options
from caer.data.datasets import sample_indices
from caer.data.loaders import make_loader, open_cache, split_dataset, with_cache_geometry
from caer.data.raer import Clip, DataError, list_frames, read_annotations, read_image
from caer.data.video import index_video, iter_clip_images
from caer.model.checkpoint import build_model, checkpoint_config, load_checkpoint
from caer.pipeline import annotate
from caer.pipeline.annotate import ANNOTATE_SUFFIXES, write_video
from caer.pipeline.evaluate import loader_logits
from caer.pipeline.predict import make_windows
from caer.pipeline.train import train_stage
from conftest import Dataset, assert_in_output, quiet_console, run_cli, tiny_run_config

LOSSLESS = {"suffix": ".mp4", "codec": "libx264rgb", "pix_fmt": "rgb24", "options": {"crf": "0"}}
PROBABILITY_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def stage2(dataset, zarr_cache, weights, tmp_path_factory):
    """A stage-2 checkpoint trained (3 epochs) from the shared cache."""
    cfg = tiny_run_config(dataset, zarr_cache[0], weights, tmp_path_factory.mktemp("predict-run"), epochs_stage2=3,
                          batch_size=4)
    return train_stage(cfg, 2, quiet_console()).best_path


@pytest.fixture(scope="module")
def videos(dataset, tmp_path_factory) -> Dataset:
    """The shared dataset with every clip a lossless .mp4, its box file keyed by the videos' frame numbers."""
    return as_video_dataset(dataset, tmp_path_factory.mktemp("predict-videos") / "ds", **LOSSLESS)


def eval_probabilities(checkpoint) -> tuple[list[str], np.ndarray]:
    """What `caer eval --source raw` computes for the test split: its clips and class probabilities."""
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, {"device": "cpu"})
    model, backbone = build_model(cfg, torch.device("cpu"), ckpt)
    cache = open_cache(cfg, Source.raw, ckpt["encoder"])
    cfg = with_cache_geometry(cfg, cache)
    data = split_dataset(cfg, "test", False, backbone.preprocess, cache, Source.raw)
    _, logits = loader_logits(model, make_loader(data, cfg, train=False), torch.device("cpu"))
    return data.video_ids, torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


def predict_cli(checkpoint, inputs, *extra: str):
    return run_cli(["predict", str(checkpoint), *map(str, inputs), "--device", "cpu", *extra])


# ------------------------------------------------------------------------------------------ the same as caer eval

def test_the_videos_hold_the_frames_exactly(dataset, videos):
    video_id = dataset.video_ids()[-1]
    clip_frames = [np.asarray(read_image(f)) for f in list_frames(dataset.root / video_id)]
    clip = next(c for c in read_annotations(videos.annotations[2], videos.root, 5)[0] if c.video_id == video_id + ".mp4")
    decoded = [np.asarray(image) for _, image in iter_clip_images(clip)]
    assert len(decoded) == len(clip_frames) and all(np.array_equal(a, b) for a, b in zip(decoded, clip_frames))


def test_predict_on_mp4s_equals_eval_on_the_frame_folders(dataset, videos, stage2, tmp_path):
    """Every test clip: the label of `caer eval --source raw` and its probabilities within 1e-5."""
    report = tmp_path / "eval.json"
    evaluated = run_cli(["eval", str(stage2), "--source", "raw", "--device", "cpu", "--json", str(report)])
    assert evaluated.exit_code == 0, evaluated.output
    preds = {p["video_id"]: p["pred"] for p in json.loads(report.read_text())["predictions"]}
    video_ids, probabilities = eval_probabilities(stage2)
    inputs = [videos.root / f"{v}.mp4" for v in video_ids]
    out = tmp_path / "predict.json"
    result = predict_cli(stage2, inputs, "--face-boxes", str(videos.face_boxes), "--json", str(out))
    assert result.exit_code == 0, result.output
    assert_in_output("caer predict", result.output)
    saved = json.loads(out.read_text())
    assert saved["stage"] == 2 and len(saved["inputs"]) == len(video_ids)
    worst = 0.0
    for video_id, expected, entry in zip(video_ids, probabilities, saved["inputs"]):
        assert entry["input"] == str(videos.root / f"{video_id}.mp4") and entry["kind"] == "video"
        (person,) = entry["persons"]
        assert person["label_index"] == preds[video_id] == int(np.argmax(expected))
        assert person["label"] == saved["classes"][preds[video_id]]
        # the clips are shorter than --window 16: one window over the whole clip, as caer eval reads it, and said so
        assert len(person["windows"]) == 1 and person["note"] == "shorter than --window 16: one window"
        worst = max(worst, float(np.abs(np.array(person["probabilities"]) - expected).max()))
    print(f"largest probability difference, predict on mp4 vs eval on frame folders: {worst:.2e}")
    assert worst <= PROBABILITY_TOLERANCE


def test_the_checkpoints_decode_path_cuts_the_frames(dataset, videos, stage2, tmp_path):
    """A checkpoint whose run cut frames with --decode tensor is read that way (its pixels are within one grey level
    of the PIL path's, so the probabilities stay close), on a video and on a frame folder alike."""
    ckpt = torch.load(stage2, weights_only=True)
    ckpt["config"]["decode"] = "tensor"
    tensor = tmp_path / "tensor.pt"
    torch.save(ckpt, tensor)
    video_id = dataset.video_ids()[-1]
    by_video, by_folder, pil = (tmp_path / f"{name}.json" for name in ("video", "folder", "pil"))
    assert predict_cli(tensor, [videos.root / f"{video_id}.mp4"], "--face-boxes", str(videos.face_boxes),
                       "--json", str(by_video)).exit_code == 0
    assert predict_cli(tensor, [dataset.root / video_id], "--face-boxes", str(dataset.face_boxes),
                       "--json", str(by_folder)).exit_code == 0
    assert predict_cli(stage2, [dataset.root / video_id], "--face-boxes", str(dataset.face_boxes),
                       "--json", str(pil)).exit_code == 0
    probabilities = []
    for path in (by_video, by_folder, pil):
        saved = json.loads(path.read_text())
        probabilities.append(saved["inputs"][0]["persons"][0]["probabilities"])
    assert json.loads(by_video.read_text())["geometry"]["decode"] == "tensor"
    assert np.allclose(probabilities[0], probabilities[1], atol=1e-6)  # the same pixels from the video and the JPEGs
    assert np.allclose(probabilities[0], probabilities[2], atol=0.02), probabilities


# ------------------------------------------------------------------------------------------ windows, JSON, annotation

def test_windows_cover_the_clip_with_tsn_sampling_inside_each():
    windows = make_windows((0, 10), window=4, stride=3, segments=8)
    assert [(w.start, w.end) for w in windows] == [(0, 4), (3, 7), (6, 10)]  # the last one ends with the clip
    assert all(w.sampled == (w.start + sample_indices(4, 8, False)).tolist() for w in windows)
    assert [(w.start, w.end) for w in make_windows((2, 9), window=16, stride=8, segments=4)] == [(2, 9)]
    assert make_windows((0, 32), window=16, stride=8, segments=4)[1].sampled == [10, 14, 18, 22]


def test_json_holds_windows_persons_and_the_annotated_copy_every_frame(dataset, videos, stage2, tmp_path):
    video_id = max(dataset.video_ids(), key=lambda v: len(list_frames(dataset.root / v)))
    video = videos.root / f"{video_id}.mp4"
    count = index_video(video).count
    out, labelled = tmp_path / "p.json", tmp_path / "labelled.mp4"
    result = predict_cli(stage2, [video], "--face-boxes", str(videos.face_boxes), "--window", "4", "--stride", "2",
                         "--json", str(out), "--annotate", str(labelled))
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert (saved["window"], saved["stride"], saved["num_frames"], saved["faces"]["face_boxes"]) == (
        4, 2, 8, str(videos.face_boxes))
    (entry,) = saved["inputs"]
    assert (entry["frame_count"], entry["frames_used"], entry["tracks"]) == (count, count, 1)
    (person,) = entry["persons"]
    keys = [f"{n:05d}" for n in range(1, count + 1)]
    starts = list(range(0, count - 4 + 1, 2)) + ([count - 4] if (count - 4) % 2 else [])
    assert [(w["first_frame"], w["last_frame"]) for w in person["windows"]] == [(keys[s], keys[s + 3]) for s in starts]
    assert all(w["sampled_frames"] == [keys[i] for i in s + sample_indices(4, 8, False)]
               for w, s in zip(person["windows"], starts))
    assert all(len(w["time_s"]) == 2 and abs(sum(w["probabilities"]) - 1) < 1e-6 for w in person["windows"])
    mean = np.mean([w["probabilities"] for w in person["windows"]], axis=0)
    assert np.allclose(person["probabilities"], mean) and person["label"] == saved["classes"][int(mean.argmax())]
    boxes = json.loads(videos.face_boxes.read_text())[f"{video_id}.mp4"]
    assert person["boxes"] == {k: [float(v) for v in box] for k, box in sorted(boxes.items())}
    assert (person["first_frame"], person["last_frame"], person["frames_covered"]) == (keys[0], keys[-1], count)

    # the annotated copy: every frame, readable, the face outlined, the rest of the frame left as it was
    copy = index_video(labelled)
    assert copy.count == count and (copy.width, copy.height) == (128, 96)
    frames = [np.asarray(image, dtype=np.int16) for _, image in iter_clip_images(
        Clip("x", 0, tuple(labelled / f"{n:05d}" for n in range(1, count + 1)), "x", video=copy))]
    originals = [np.asarray(read_image(f), dtype=np.int16) for f in list_frames(dataset.root / video_id)]
    key = next(iter(boxes))
    n = keys.index(key)
    left, top, right, bottom = boxes[key]
    edge = np.abs(frames[n][top + 2 : bottom - 2, left] - originals[n][top + 2 : bottom - 2, left]).mean()
    far = np.abs(frames[n][-20:, -20:] - originals[n][-20:, -20:]).mean()  # H.264 CRF 18: a few grey levels
    assert edge > 40 and far < 6, (edge, far)


def test_all_faces_follows_every_person_and_the_default_keeps_the_clips(photo, stage2, tmp_path):
    """Two real faces in every frame of an H.264 video; the detector (hog) and tracking find both."""
    frames, faces = zip(*(two_faces(photo, i, False, False) for i in range(5)))
    video = write_h264(tmp_path / "two.mp4", list(frames))
    every, chosen = tmp_path / "all.json", tmp_path / "one.json"
    assert predict_cli(stage2, [video], "--all-faces", "--json", str(every)).exit_code == 0
    result = predict_cli(stage2, [video], "--json", str(chosen), "--annotate", str(tmp_path / "a.mp4"))
    assert result.exit_code == 0, result.output
    both = json.loads(every.read_text())["inputs"][0]
    one = json.loads(chosen.read_text())["inputs"][0]
    assert both["tracks"] == one["tracks"] == 2 and len(both["persons"]) == 2 and len(one["persons"]) == 1
    # the astronaut's face is the larger: the clip's person (both are found in every frame)
    astronaut = next(p for p in both["persons"] if iou(p["boxes"]["00001"], faces[0]) > 0.5)
    assert sum(p["chosen"] for p in both["persons"]) == 1 and one["persons"][0]["chosen"]
    assert one["persons"][0]["boxes"] == next(p for p in both["persons"] if p["chosen"])["boxes"]
    assert all(len(p["boxes"]) == 5 for p in both["persons"]) and astronaut["chosen"]
    assert index_video(tmp_path / "a.mp4").count == 5


def test_with_the_tensor_path_several_people_share_one_decoding_of_the_frames(photo, stage2, tmp_path, monkeypatch):
    """--all-faces with a --decode tensor checkpoint: each chunk's JPEGs are decoded once for all the people, and each
    person's probabilities are those of a run that decodes for that person alone."""
    from PIL import Image

    import caer.data.tensor_views as tensor_views

    ckpt = torch.load(stage2, weights_only=True)
    ckpt["config"]["decode"] = "tensor"
    tensor = tmp_path / "tensor.pt"
    torch.save(ckpt, tensor)
    folder = tmp_path / "two"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(two_faces(photo, i, False, False)[0]).save(folder / f"{i:05d}.jpg", quality=95)
    calls = []
    real = tensor_views.decode_frames
    monkeypatch.setattr(tensor_views, "decode_frames", lambda *a: calls.append(1) or real(*a))
    every, chosen = tmp_path / "all.json", tmp_path / "one.json"
    assert predict_cli(tensor, [folder], "--all-faces", "--json", str(every)).exit_code == 0
    assert len(calls) == 1  # one chunk of 5 frames, two people
    assert predict_cli(tensor, [folder], "--json", str(chosen)).exit_code == 0
    both, one = (json.loads(p.read_text())["inputs"][0]["persons"] for p in (every, chosen))
    assert len(both) == 2
    assert np.allclose(next(p for p in both if p["chosen"])["probabilities"], one[0]["probabilities"], atol=1e-6)


@pytest.fixture(scope="module")
def photo():
    from skimage.data import astronaut

    return astronaut()


# ------------------------------------------------------------------------------------------ clear errors

def test_clear_errors(stage2, videos, tmp_path):
    video = videos.root / f"{videos.video_ids()[0]}.mp4"
    empty = tmp_path / "empty"
    empty.mkdir()
    gray = write_h264(tmp_path / "gray.mp4", [np.full((96, 128, 3), 128, np.uint8)] * 3)
    cases = [
        ([stage2, empty], [], "empty holds no image files"),
        ([stage2, tmp_path / "gone"], [], "clip directory " + str(tmp_path / "gone") + " does not exist"),
        ([stage2, video.parent], [], f"holds no image files; it holds videos: give each as a clip (e.g. {video.parent}/"),
        ([tmp_path / "missing.pt", video], [], "missing.pt: no such checkpoint"),
        ([stage2, tmp_path / "nothing.mp4"], [], f"video file {tmp_path / 'nothing.mp4'} does not exist"),
        ([stage2, gray], [], "found no face in its 3 frames; give its boxes with --face-boxes, or try another --detector"),
        ([stage2, gray], ["--all-faces", "--detector", "haar"], "--detector haar found no face"),
        ([stage2, gray], ["--face-boxes", str(videos.face_boxes)], f"no entry for {gray} (looked up as {str(gray)!r}: "
         f"keys are clip paths relative to --root {videos.root}"),
        ([stage2, video], ["--face-boxes", str(videos.face_boxes), "--detector", "hog"], "not both"),
        ([stage2, video], ["--annotate", str(tmp_path / "x.gif")], "--annotate"),
        ([stage2, video], ["--pretrained", str(tmp_path / "gone.pt")], "pass --pretrained"),
    ]
    for (checkpoint, *inputs), extra, message in cases:
        result = predict_cli(checkpoint, inputs, *extra)
        assert result.exit_code == 2, (message, result.output)
        assert_in_output(message, result.output)


@pytest.fixture
def no_work(monkeypatch):
    """caer predict may not load its checkpoint (its first piece of work): a refusal must come before it."""
    def load(*_):
        raise AssertionError("caer predict started its work before refusing the settings")

    monkeypatch.setattr(caer.pipeline.predict, "load_predictor", load)


def test_outputs_are_checked_before_any_work_and_never_replace_an_input(stage2, videos, dataset, tmp_path, no_work):
    """An output that is an input (the video, a frame folder or a file in it, the checkpoint, the box file) is refused
    even with --overwrite; a folder, a path under a file, two outputs in one file, or an existing file without
    --overwrite, too. Nothing is written."""
    checkpoint, video, boxes = tmp_path / "ckpt.pt", tmp_path / "v.mp4", tmp_path / "b.json"
    shutil.copy(stage2, checkpoint)
    video_id = videos.video_ids()[0]  # "frames/.../clip_0004.mp4"
    shutil.copy(videos.root / video_id, video)
    boxes.write_text(json.dumps({"v.mp4": videos.boxes()[video_id]}))
    folder = shutil.copytree(dataset.root / dataset.video_ids()[0], tmp_path / "frames")
    (tmp_path / "folder.json").mkdir()
    for name in ("old.json", "old.mp4", "out-1-v.mp4"):
        (tmp_path / name).write_text("old")
    before = {path: path.read_bytes() for path in (checkpoint, video, boxes, *folder.iterdir(), *tmp_path.glob("*o*"))
              if path.is_file()}
    with_boxes = ["--face-boxes", str(boxes)]
    cases = [
        ([video], [*with_boxes, "--annotate", str(video), "--overwrite"], f"--annotate {video} is the input {video}"),
        ([video], [*with_boxes, "--json", str(checkpoint), "--overwrite"],
         f"--json {checkpoint} is the checkpoint {checkpoint}: write the output elsewhere"),
        ([video], [*with_boxes, "--json", str(boxes), "--overwrite"], f"--json {boxes} is the --face-boxes file {boxes}"),
        ([folder], ["--json", str(folder), "--overwrite"], f"--json {folder} is the input {folder}"),
        ([folder], ["--json", str(folder / "p.json")], f"--json {folder / 'p.json'} lies inside the input {folder}"),
        ([video], [*with_boxes, "--json", str(tmp_path / "folder.json"), "--overwrite"],
         f"--json {tmp_path / 'folder.json'} is a folder: give the file to write"),
        ([video], [*with_boxes, "--json", str(boxes / "p.json")], f"--json {boxes / 'p.json'}: {boxes} is a file, not a folder"),
        ([video], [*with_boxes, "--json", str(tmp_path / "old.json")],
         f"--json {tmp_path / 'old.json'} already exists: pass --overwrite to replace it"),
        ([video], [*with_boxes, "--annotate", str(tmp_path / "old.mp4")], f"--annotate {tmp_path / 'old.mp4'} already exists"),
        ([video, folder], ["--annotate", str(tmp_path / "out.mp4")], f"--annotate {tmp_path / 'out-1-v.mp4'} already exists"),
        ([video], [*with_boxes, "--json", str(tmp_path / "t.mp4"), "--annotate", str(tmp_path / "t.mp4")],
         f"--json and --annotate name the same file, {tmp_path / 't.mp4'}"),
    ]
    for inputs, extra, message in cases:
        result = predict_cli(checkpoint, inputs, *extra)
        assert result.exit_code == 2, (message, result.output)
        assert_in_output(message, result.output)
    assert {path: path.read_bytes() for path in before} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.stem in ("p", "t", "out")]


def test_overwrite_replaces_an_earlier_output(stage2, dataset, tmp_path):
    out = tmp_path / "p.json"
    out.write_text("{}")
    folder = dataset.root / dataset.video_ids()[0]
    result = predict_cli(stage2, [folder], "--face-boxes", str(dataset.face_boxes), "--json", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["inputs"][0]["input"] == str(folder)


def test_flags_that_cannot_apply_where_the_faces_come_from_are_refused(stage2, videos, no_work):
    """With a box file, the detector's and tracker's flags and --all-faces (a box file holds one person per clip);
    with a detector, --root (it places the box file's keys)."""
    video = videos.root / videos.video_ids()[0]
    with_boxes = ["--face-boxes", str(videos.face_boxes)]
    cases = [
        ([*with_boxes, "--all-faces"], "with --face-boxes, --all-faces cannot apply"),
        ([*with_boxes, "--upsample", "0", "--min-iou", "0.5", "--max-gap", "2"],
         "with --face-boxes, --upsample, --min-iou, --max-gap cannot apply"),
        (["--root", str(videos.root)], "with a face detector, --root cannot apply"),
        (["--detector", "hog", "--root", str(videos.root)], "with a face detector, --root cannot apply"),
    ]
    for extra, message in cases:
        result = predict_cli(stage2, [video], *extra)
        assert result.exit_code == 2, (message, result.output)
        assert_in_output(message, result.output)


def test_every_predict_option_has_one_flag():
    command = typer.main.get_command(app).commands["predict"]
    names = [f.name for f, _ in options(PredictConfig)] + list(PREDICT_OVERRIDES) + list(PREDICT_DETECTION)
    assert sorted(p.name for p in command.params if p.name != "help") == sorted(names)


# ------------------------------------------------------------------------------------------ a stop part-way, bad inputs, a log

# x264 holds back its first ~40 frames (lookahead), and nothing reaches the file before them: stop after more
STOP_AFTER = 50


@pytest.mark.parametrize("suffix", ANNOTATE_SUFFIXES)
def test_a_video_stopped_part_way_leaves_no_partial_file_and_keeps_an_earlier_one(tmp_path, suffix):
    """Ctrl-C after STOP_AFTER frames: nothing at the path, no temporary file beside it, and an earlier copy there
    as it was; a write that ends gives a readable video in the container of its suffix."""
    frames = [Image.fromarray(np.full((48, 64, 3), 4 * i, np.uint8)) for i in range(STOP_AFTER + 10)]

    def stopped():
        yield from ((image, n) for n, image in enumerate(frames[:STOP_AFTER]))
        raise KeyboardInterrupt

    video = tmp_path / f"labelled{suffix}"
    with pytest.raises(KeyboardInterrupt):
        write_video(video, stopped(), Fraction(25))
    assert list(tmp_path.iterdir()) == []
    assert write_video(video, ((image, n) for n, image in enumerate(frames)), Fraction(25)) == len(frames)
    earlier = video.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        write_video(video, stopped(), Fraction(25))
    assert [p.name for p in tmp_path.iterdir()] == [video.name] and video.read_bytes() == earlier
    assert index_video(video).count == len(frames)


def test_a_failed_annotate_with_overwrite_keeps_the_earlier_copy(stage2, dataset, tmp_path, monkeypatch):
    """caer predict --annotate --overwrite failing part-way through the copy (a frame that cannot be drawn)."""
    video_id = dataset.video_ids()[0]
    first = list_frames(dataset.root / video_id)[0]
    box = next(iter(dataset.boxes()[video_id].values()))
    video = write_h264(tmp_path / "long.mp4", [np.asarray(read_image(first))] * (STOP_AFTER + 10))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"long.mp4": {f"{n:05d}": box for n in range(1, STOP_AFTER + 11)}}))
    labelled = tmp_path / "labelled.mp4"
    labelled.write_bytes(b"an earlier copy")
    drawn = []

    def draw(image, people):
        drawn.append(1)
        if len(drawn) > STOP_AFTER:
            raise DataError(f"frame {len(drawn)}: cannot be drawn")
        return image

    monkeypatch.setattr(annotate, "draw_people", draw)
    result = predict_cli(stage2, [video], "--face-boxes", str(boxes), "--annotate", str(labelled), "--overwrite")
    assert result.exit_code == 2 and len(drawn) == STOP_AFTER + 1, result.output
    assert_in_output(f"frame {STOP_AFTER + 1}: cannot be drawn", result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.json", "labelled.mp4", "long.mp4"]
    assert labelled.read_bytes() == b"an earlier copy"


def test_skip_bad_goes_on_without_a_bad_input_and_lists_it(stage2, videos, tmp_path):
    """Two good videos, a faceless one, a missing one and an empty folder: without --skip-bad the first bad one stops
    the run (nothing written); with it the good ones are predicted and written, the others listed with their
    reasons, in the output and the JSON."""
    ids = videos.video_ids()[:2]
    good = [shutil.copy(videos.root / v, tmp_path / name) for v, name in zip(ids, ("a.mp4", "b.mp4"))]
    faceless = write_h264(tmp_path / "faceless.mp4", [np.full((96, 128, 3), 128, np.uint8)] * 3)
    missing, empty = tmp_path / "missing.mp4", tmp_path / "empty"
    empty.mkdir()
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.mp4": videos.boxes()[ids[0]], "b.mp4": videos.boxes()[ids[1]], "faceless.mp4": {}}))
    out, labelled = tmp_path / "p.json", tmp_path / "out.mp4"
    outputs = ["--face-boxes", str(boxes), "--json", str(out), "--annotate", str(labelled)]
    no_face = f"{faceless}: {boxes} has no face box for any of its 3 frames"

    stopped = predict_cli(stage2, [*good, faceless], *outputs)
    assert stopped.exit_code == 2, stopped.output
    assert_in_output(no_face, stopped.output)
    assert_in_output("(use --skip-bad to go on without it)", stopped.output)
    assert not out.exists() and not list(tmp_path.glob("out*"))

    result = predict_cli(stage2, [*good, faceless, missing, empty], *outputs, "--skip-bad")
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert [entry["input"] for entry in saved["inputs"]] == list(map(str, good))
    assert len(saved["skipped"]) == 3
    for line, reason in zip(saved["skipped"], (no_face, f"{missing}: video file {missing} does not exist",
                                                         f"{empty}: clip directory {empty} holds no image files")):
        assert line.startswith(reason), (line, reason)
        assert_in_output(f"skipped {line}", result.output)
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out-1-a.mp4", "out-2-b.mp4"]

    nothing = predict_cli(stage2, [faceless, missing], "--face-boxes", str(boxes), "--skip-bad")
    assert nothing.exit_code == 2
    assert_in_output(f"no input could be predicted; skipped: {no_face}", nothing.output)


def test_the_table_prints_whole_on_a_narrow_console(stage2, videos, tmp_path, monkeypatch):
    """In a log (80 columns) with the note column: each person's row holds the input, label and note whole."""
    import caer.cli

    video = videos.root / videos.video_ids()[0]
    monkeypatch.setattr(caer.cli, "console", Console(file=io.StringIO(), width=80))
    out = tmp_path / "p.json"
    assert predict_cli(stage2, [video], "--face-boxes", str(videos.face_boxes), "--json", str(out)).exit_code == 0
    person = json.loads(out.read_text())["inputs"][0]["persons"][0]
    printed = caer.cli.console.file.getvalue().splitlines()
    row = next((line for line in printed if video.name in line), "")
    assert person["label"] in row.split() and "shorter than --window 16: one window" in row, "\n".join(printed)
