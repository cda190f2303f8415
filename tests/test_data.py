"""The RAER data layer: annotation and box files, margin and clipping, letterbox, and the encoder preprocessing split."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from caer.data.raer import (
    Clip,
    DataError,
    ViewMaker,
    check_disjoint,
    clip_box,
    letterbox,
    load_body_boxes,
    load_face_boxes,
    read_annotations,
    read_image,
)
from caer.model.checkpoint import load_checkpoint
from caer.model.encoder import Preprocess


def _write_frames(clip_dir: Path, names: list[str], size=(64, 48), colour=(10, 20, 30)) -> None:
    clip_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, colour).save(clip_dir / name)


@pytest.fixture
def small_root(tmp_path) -> Path:
    _write_frames(tmp_path / "frames" / "a", ["00010.jpg", "00002.jpg", "00001.png"])
    _write_frames(tmp_path / "frames" / "b", ["f1.jpg", "f0.jpg"])
    (tmp_path / "frames" / "b" / "notes.txt").write_text("not a frame")
    return tmp_path


# --------------------------------------------------------------------------- annotation files

def test_annotations_parse_labels_are_zero_based_and_frames_sorted(small_root):
    ann = small_root / "train.txt"
    ann.write_text("# comment\nframes/a 3 1\n\nframes/b 2 5\n")
    clips, bad = read_annotations(ann, None, num_classes=5)
    assert bad == []
    assert [c.video_id for c in clips] == ["frames/a", "frames/b"]
    assert [c.label for c in clips] == [0, 4]
    assert [f.name for f in clips[0].frames] == ["00001.png", "00002.jpg", "00010.jpg"]
    assert [f.name for f in clips[1].frames] == ["f0.jpg", "f1.jpg"]  # notes.txt is not a frame
    assert clips[1].source == f"{ann}:4"


BAD_LINES = {
    "two fields": ("frames/a 3", "expected '<clip_dir> <num_frames> <label>'"),
    "four fields": ("frames/a 3 1 extra", "expected '<clip_dir> <num_frames> <label>'"),
    "label not an integer": ("frames/a 3 happy", "must be integers"),
    "frames not an integer": ("frames/a three 1", "must be integers"),
    "label 0 (labels are 1-based)": ("frames/a 3 0", "label 0 is outside 1..5"),
    "label above C": ("frames/a 3 6", "label 6 is outside 1..5"),
    "missing clip directory": ("frames/nope 3 1", "does not exist"),
    "empty clip directory": ("frames/empty 3 1", "holds no image files"),
    "negative num_frames": ("frames/a -3 1", "num_frames must not be negative, got -3"),
    "absolute clip path": ("/etc/frames 3 1", "clip path '/etc/frames' must be relative to the dataset root"),
    "clip path escaping the root": ("frames/../../x 3 1", "must be relative to the dataset root and stay inside it"),
    "a file of another kind": ("frames/b/notes.txt 1 1", "is a file, neither a clip directory nor a video (video "
                                                          "files end in .mp4, .avi"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_annotation_line_names_file_and_line(small_root, case):
    (small_root / "frames" / "empty").mkdir()
    (small_root / "frames" / "empty" / "readme.md").write_text("no frames here")
    line, message = BAD_LINES[case]
    ann = small_root / "val.txt"
    ann.write_text(f"frames/b 2 2\n{line}\n")
    with pytest.raises(DataError) as err:
        read_annotations(ann, small_root, num_classes=5)
    assert str(err.value).startswith(f"{ann}:2: ")
    assert message in str(err.value)


@pytest.mark.parametrize("second", ["frames/a", "./frames/a", "frames/a/", "frames//a"])
def test_duplicate_clip_and_missing_file(small_root, second):
    ann = small_root / "test.txt"
    ann.write_text(f"frames/a 3 1\n{second} 3 2\n")
    with pytest.raises(DataError, match=rf"{ann}:2: .*listed twice \(first at {ann}:1\)"):
        read_annotations(ann, None, num_classes=5)
    with pytest.raises(DataError, match="nothere.txt: annotation file not found"):
        read_annotations(small_root / "nothere.txt", None, num_classes=5)


def test_a_folder_or_a_video_where_an_annotation_file_belongs_is_called_that(small_root):
    with pytest.raises(DataError, match=f"{small_root}: a folder, not an annotation file"):
        read_annotations(small_root, None, num_classes=5)
    video = small_root / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(DataError, match=f"{video}: a video, not an annotation file"):
        read_annotations(video, None, num_classes=5)
    with pytest.raises(DataError, match=f"{small_root}: a folder, not a box file"):
        load_face_boxes(small_root, small_root)
    with pytest.raises(FileNotFoundError, match=f"{small_root}: a folder, not a checkpoint"):
        load_checkpoint(small_root)


def test_a_clip_in_two_splits_is_refused_naming_both_places(small_root):
    train, test = small_root / "train.txt", small_root / "test.txt"
    train.write_text("frames/a 3 1\nframes/b 2 2\n")
    test.write_text("frames/b 2 4\n")
    splits = [read_annotations(p, None, num_classes=5)[0] for p in (train, test)]
    with pytest.raises(DataError) as err:
        check_disjoint(splits)
    assert str(err.value).startswith(f"{test}:1: clip 'frames/b' is also listed at {train}:2 with another label (4 vs 2)")
    test.write_text("./frames/b/ 2 2\n")  # another spelling of the same clip
    with pytest.raises(DataError, match=f"{test}:1: clip './frames/b/' is also listed at {train}:2; "):
        check_disjoint([read_annotations(p, None, num_classes=5)[0] for p in (train, test)])
    train.write_text("frames/a 3 1\n")
    check_disjoint([read_annotations(p, None, num_classes=5)[0] for p in (train, test)])  # disjoint: fine


def test_frames_numbered_without_zero_padding_keep_their_time_order(tmp_path):
    _write_frames(tmp_path / "clip", [f"{n}.jpg" for n in (1, 2, 9, 10, 11, 100)] + ["frame_3.jpg", "frame_20.jpg"])
    (tmp_path / "list.txt").write_text("clip 8 1\n")
    (clip,), _ = read_annotations(tmp_path / "list.txt", None, num_classes=5)
    assert [f.name for f in clip.frames] == ["1.jpg", "2.jpg", "9.jpg", "10.jpg", "11.jpg", "100.jpg", "frame_3.jpg",
                                             "frame_20.jpg"]


def test_a_byte_order_mark_is_dropped_and_another_encoding_names_the_line(small_root):
    ann = small_root / "train.txt"
    ann.write_bytes("frames/a 3 1\r\nframes/b 2 2\r\n".encode("utf-8-sig"))
    clips, _ = read_annotations(ann, None, num_classes=5)
    assert [c.video_id for c in clips] == ["frames/a", "frames/b"]
    ann.write_bytes("frames/a 3 1\n# caf\u00e9\nframes/b 2 2\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{ann}:2: not UTF-8 text .*save the file as UTF-8"):
        read_annotations(ann, None, num_classes=5)


def test_num_frames_is_kept_for_the_disagreement_count(small_root):
    ann = small_root / "val.txt"
    ann.write_text("frames/a 7 1\n")
    (clip,), _ = read_annotations(ann, None, num_classes=5)
    assert clip.listed_frames == 7 and clip.listed_frames != len(clip.frames)


def test_skip_bad_collects_every_bad_line_and_keeps_the_good_ones(small_root):
    ann = small_root / "train.txt"
    ann.write_text("frames/a 3 1\nframes/a 3\nframes/nope 1 1\nframes/b 2 9\nframes/b 2 3\n")
    clips, bad = read_annotations(ann, None, num_classes=5, skip_bad=True)
    assert [(c.video_id, c.label) for c in clips] == [("frames/a", 0), ("frames/b", 2)]
    assert [b.source for b in bad] == [f"{ann}:2", f"{ann}:3", f"{ann}:4"]
    assert [b.video_id for b in bad] == ["frames/a", "frames/nope", "frames/b"]
    assert "does not exist" in str(bad[1]) and str(bad[1]).startswith(f"{ann}:3: ")


# --------------------------------------------------------------------------- box files

def test_face_box_keys_root_relative_or_root_joined(tmp_path, monkeypatch):
    root = tmp_path / "data"
    boxes = {"frames/a": {"0.jpg": [1, 2, 3, 4]}, "frames/b": {"1.jpg": [5, 6, 7, 8.5]}}
    expected = {"frames/a": {"0.jpg": (1.0, 2.0, 3.0, 4.0)}, "frames/b": {"1.jpg": (5.0, 6.0, 7.0, 8.5)}}
    root.mkdir()
    monkeypatch.chdir(tmp_path)
    # (keys, the forms of --root that must find them: as the user typed it, relative or absolute)
    variants = {
        "root-relative": ({k: v for k, v in boxes.items()}, ("data", root)),
        "joined to the relative root": ({os.path.join("data", k): v for k, v in boxes.items()}, ("data",)),
        "joined, with ./ and a trailing slash": ({f"./data/{k}/": v for k, v in boxes.items()}, ("data", "./data/")),
        "joined to the absolute root": ({str(root / k): v for k, v in boxes.items()}, ("data", root)),
    }
    for i, (name, (content, given_roots)) in enumerate(variants.items()):
        path = tmp_path / f"faces{i}.json"
        path.write_text(json.dumps(content))
        for given_root in given_roots:
            assert load_face_boxes(path, given_root) == expected, (name, given_root)


def test_two_box_file_keys_for_one_clip_are_refused_naming_both(tmp_path):
    faces, body = tmp_path / "faces.json", tmp_path / "body.json"
    faces.write_text(json.dumps({"c": {"2.jpg": [0, 0, 4, 4]}, "c/": {"1.jpg": [0, 0, 4, 4]}}))
    body.write_text(json.dumps({"frames/a": [0, 0, 4, 4], str(tmp_path / "frames" / "a"): [1, 1, 4, 4]}))
    with pytest.raises(DataError, match=f"{faces}: the entries 'c' and 'c/' name the same clip; merge them"):
        load_face_boxes(faces, tmp_path)
    with pytest.raises(DataError, match=f"{body}: the entries 'frames/a' and '{tmp_path}/frames/a' name the same clip"):
        load_body_boxes(body, tmp_path)


def test_a_box_file_is_read_as_json_whatever_its_strings_hold(tmp_path):
    """JSON strings may hold characters that Python counts as line breaks (U+2028): the file is not split."""
    path = tmp_path / "faces.json"
    path.write_text(json.dumps({"clip\u2028a": {"1.jpg": [0, 0, 4, 4]}}, ensure_ascii=False), encoding="utf-8")
    assert load_face_boxes(path, tmp_path) == {"clip\u2028a": {"1.jpg": (0.0, 0.0, 4.0, 4.0)}}


def test_body_box_keys_root_relative_or_root_joined(tmp_path):
    path = tmp_path / "body.json"
    path.write_text(json.dumps({str(tmp_path / "frames/a"): [0, 0, 10, 10], "frames/b": [1, 1, 5, 5]}))
    assert load_body_boxes(path, tmp_path) == {"frames/a": (0.0, 0.0, 10.0, 10.0), "frames/b": (1.0, 1.0, 5.0, 5.0)}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"frames/a": {"0.jpg": [1, 2, 3]}}', "frames/a/0.jpg: a box must be [left, top, right, bottom] numbers"),
        ('{"frames/a": {"0.jpg": ["1", 2, 3, 4]}}', "a box must be [left, top, right, bottom] numbers"),
        ('{"frames/a": [1, 2, 3, 4]}', "entry 'frames/a' must map frame file names to boxes"),
        ('[1, 2]', "expected a JSON object"),
        ('{\n"frames/a": {\n"0.jpg": [1, 2, 3, 4],\n}\n}', ":4: not valid JSON"),
    ],
)
def test_bad_face_box_file_names_the_file(tmp_path, content, message):
    path = tmp_path / "faces.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_face_boxes(path, tmp_path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


# --------------------------------------------------------------------------- margin and clipping

@pytest.mark.parametrize(
    "box, margin, expected",
    [
        ((40, 30, 60, 50), 20, (20, 10, 80, 70)),  # inside: grows by the margin on every side
        ((40, 30, 60, 50), 0, (40, 30, 60, 50)),
        ((40.2, 29.8, 60.3, 50.4), 0, (40, 30, 60, 50)),  # fractional boxes round to pixels
        ((5, 8, 30, 30), 20, (0, 0, 50, 50)),  # the margin overhangs the top-left corner: clipped
        ((-10, -5, 30, 30), 20, (0, 0, 50, 50)),  # the box itself overhangs: clipped
        ((100, 80, 140, 110), 20, (80, 60, 128, 96)),  # overhangs bottom-right
        ((-50, -50, 500, 500), 20, (0, 0, 128, 96)),  # larger than the image: the whole image
    ],
)
def test_margin_and_clipping(box, margin, expected):
    assert clip_box(box, 128, 96, margin, "here") == expected


@pytest.mark.parametrize(
    "box",
    [
        (200, 10, 250, 40),  # wholly right of the image
        (-60, -60, -10, -10),  # wholly above-left
        (10, 100, 40, 140),  # wholly below
        (128, 10, 160, 40),  # touches the right edge from outside: no area after clipping
        (-30, 10, 0, 40),  # touches the left edge from outside
    ],
)
def test_box_without_area_in_the_image_is_an_error(box):
    with pytest.raises(DataError, match=r"^face box of x/0001\.jpg: box .* has no area inside the 128x96 image"):
        clip_box(box, 128, 96, 20, "face box of x/0001.jpg")


@pytest.mark.parametrize("box", [(50, 50, 50, 60), (60, 50, 40, 70), (10, 40, 30, 20)])
def test_an_empty_or_inverted_box_is_called_that(box):
    """Zero width, right < left, bottom < top: not a box at all, whatever the image (a swapped pair of coordinates
    is the likely mistake)."""
    with pytest.raises(DataError, match=r"^here: box .* is not \[x1, y1, x2, y2\] with x1 < x2 and y1 < y2"):
        clip_box(box, 128, 96, 20, "here")


@pytest.mark.parametrize("box", [(127.8, 10, 140, 40), (10, -20, 40, 0.3)])
def test_box_inside_by_less_than_half_a_pixel_is_an_error_without_a_margin(box):
    """With --margin 0 such a box rounds to no pixel at all: a clear error, not a crash in the resize."""
    with pytest.raises(DataError, match=r"^here: box .* has no area inside the 128x96 image"):
        clip_box(box, 128, 96, 0, "here")


# --------------------------------------------------------------------------- letterbox and views

def _solid(size, colour=(200, 100, 50)) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize("size", [(40, 20), (21, 40), (33, 33), (1, 7)])
def test_letterbox_keeps_aspect_and_centres(size):
    w, h = size
    out = np.asarray(letterbox(_solid(size)))
    side = max(w, h)
    assert out.shape == (side, side, 3)
    content = np.argwhere(out.any(axis=2))
    (top, left), (bottom, right) = content.min(0), content.max(0) + 1
    assert (right - left, bottom - top) == (w, h)  # not scaled: aspect kept
    assert left == (side - w) // 2 and top == (side - h) // 2  # centred
    assert abs(left - (side - right)) <= 1 and abs(top - (side - bottom)) <= 1
    assert (out[top:bottom, left:right] == (200, 100, 50)).all()
    assert out.sum() == np.asarray(_solid(size)).sum()  # padding is black


def test_view_maker_face_crop_context_and_missing_box(tmp_path):
    rng = np.random.default_rng(0)
    frame_dir = tmp_path / "frames" / "c"
    frame_dir.mkdir(parents=True)
    pixels = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    for name in ("0.png", "1.png", "2.png"):
        Image.fromarray(pixels).save(frame_dir / name)  # PNG: lossless, so crops compare exactly
    clip = Clip("frames/c", 0, tuple(sorted(frame_dir.iterdir())), "t.txt:1")
    maker = ViewMaker(
        face_boxes={"frames/c": {"0.png": (40, 30, 60, 50), "2.png": (-10, 70, 30, 120)}},
        body_boxes={"frames/c": (20, 10, 100, 96)},
        margin=20,
    )
    face, context, has_box = maker.views(clip, clip.frames[0])
    assert has_box and np.array_equal(np.asarray(face), pixels[10:70, 20:80])
    assert np.array_equal(np.asarray(context)[16:112], pixels) and not np.asarray(context)[:16].any()
    face, _, has_box = maker.views(clip, clip.frames[1])  # no box: the whole frame is the face
    assert not has_box and np.array_equal(np.asarray(face), pixels)
    face, _, has_box = maker.views(clip, clip.frames[2])  # overhangs the bottom-left edge: clipped
    assert has_box and np.array_equal(np.asarray(face), pixels[50:96, 0:50])

    maker.crop_body = True  # context = the body crop, letterboxed: 80x86 -> 86x86 with 3 px bars
    _, context, _ = maker.views(clip, clip.frames[0])
    assert context.size == (86, 86)
    assert np.array_equal(np.asarray(context)[:, 3:83], pixels[10:96, 20:100])
    maker.body_boxes = {}
    with pytest.raises(DataError, match="--crop-body is on but clip 'frames/c' has no body box"):
        maker.views(clip, clip.frames[0])

    maker = ViewMaker(face_boxes={"frames/c": {"0.png": (20, 15, 30, 25)}})  # no margin given: the declared 20 px
    face, _, _ = maker.views(clip, clip.frames[0])
    width, height = Image.open(clip.frames[0]).size
    left, top, right, bottom = clip_box((20, 15, 30, 25), width, height, 20.0, "here")
    assert maker.margin == 20.0 and face.size == (right - left, bottom - top) != (10, 10)

    maker = ViewMaker(face_boxes={"frames/c": {"0.png": (130, 10, 160, 40)}})
    with pytest.raises(DataError, match=rf"face box of {frame_dir / '0.png'}: box .* has no area"):
        maker.views(clip, clip.frames[0])


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_unreadable_image_names_the_file(tmp_path, how):
    path = tmp_path / "frame.jpg"
    _solid((64, 48)).save(path)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00garbage" * 64, "truncated": data[: len(data) // 2], "empty": b""}[how])
    with pytest.raises(DataError, match=rf"^{path}: cannot read image"):
        read_image(path)


# --------------------------------------------------------------------------- preprocessing split

@pytest.mark.parametrize("image_size", [32, 224])
def test_preprocess_split_equals_open_clip_eval_transform(image_size):
    """The uint8 part (in workers) followed by normalize (on the device) is open_clip's own transform."""
    transform = open_clip.image_transform(image_size, is_train=False)
    pre = Preprocess.from_transform(transform, image_size)
    rng = np.random.default_rng(1)
    for w, h in [(128, 96), (50, 77), (image_size, image_size), (301, 40)]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        pixels = pre.to_uint8(img)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, image_size, image_size)
        ours = pre.normalize(pixels[None])[0]
        torch.testing.assert_close(ours, transform(img), rtol=0, atol=1e-6)


def test_an_evaluation_dataset_serves_the_view_it_is_set_to(dataset, zarr_cache):
    """caer eval --tta flip reads the split once and switches ``eval_view`` between its two passes."""
    from caer.cache import FeatureCache
    from caer.data.datasets import CachedClips, sample_indices

    cache = FeatureCache.open(zarr_cache[0])
    clips = CachedClips(cache, cache.video_ids[:1], cache.labels[:1], segments=4, train=False)
    plain = clips[(0, 0)]
    clips.eval_view = 1
    mirrored = clips[(0, 0)]
    stored = torch.from_numpy(cache.clip(cache.video_ids[0]).astype(np.float32))  # [2 streams, views, frames, D]
    assert not torch.equal(plain.face, mirrored.face)
    frames = torch.as_tensor(sample_indices(stored.shape[2], 4, train=False))
    assert torch.equal(mirrored.face.float(), stored[0, 1][frames])
