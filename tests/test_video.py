"""Issue 11, part 1: video files wherever frame folders are accepted.

The videos are written here with PyAV from the frames of the shared synthetic dataset. The lossless codec is FFV1 in
Matroska with RGB frames (``bgr0``): its decoded frames are the JPEG frames' pixels exactly, so a video dataset must
give exactly the features, crops and items of its frame folders. Keyframes every 4 frames make the seeking real.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import zarr

import caer.data.video_io as video_io
from caer.cache import CacheError, FeatureCache
from caer.data.datasets import ClipFrames
from caer.data.loaders import split_dataset
from caer.data.raer import DataError, ViewMaker, list_frames, read_annotations, read_image
from caer.data.tensor_views import TensorViews
from caer.data.video import frame_key, frames_at_rate, index_video, iter_clip_images
from caer.pipeline.extract import extract
from conftest import NUM_CLASSES, Dataset, assert_in_output, extract_args, run_cli, settings_for, tiny_run_config

GOP = 4


def write_video(path: Path, frames: list[np.ndarray], codec: str = "ffv1", pix_fmt: str = "bgr0", rate: int = 25,
                pts: list[int] | None = None, options: dict | None = None, last_ms: int | None = None,
                matrix: list[int] | None = None) -> Path:
    """RGB uint8 ``frames`` as a video; ``pts`` (in milliseconds) gives them their own times (a variable rate),
    ``last_ms`` the last frame's duration, ``matrix`` a display matrix (row-major 3x3, 16.16 fixed point)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.codec_context.gop_size = pix_fmt, GOP
        if matrix is not None:
            stream.set_display_matrix(matrix)
        if pts is not None:
            stream.time_base = Fraction(1, 1000)
        packets = []
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            packets += stream.encode(frame)
        packets += stream.encode()
        if last_ms is not None:
            last = max(packets, key=lambda p: p.pts)
            last.duration = round(Fraction(last_ms, 1000) / last.time_base)
        for packet in packets:
            out.mux(packet)
    return path


def video_of(folder: Path, dest: Path, **kw) -> list[str]:
    """The frame folder written as one video (frame n = the n-th file); the frame files' names, in order."""
    files = list_frames(folder)
    write_video(dest, [np.asarray(read_image(f)) for f in files], **kw)
    return [f.name for f in files]


def as_video_dataset(ds: Dataset, dest: Path, suffix: str = ".mkv", **kw) -> Dataset:
    """``ds`` with every clip a video file ``<clip_dir><suffix>``: its lists and box files re-keyed to match."""
    faces, bodies = ds.boxes(), json.loads(ds.body_boxes.read_text())
    new_faces, new_bodies = {}, {}
    for video_id in ds.video_ids():
        names = video_of(ds.root / video_id, dest / f"{video_id}{suffix}", **kw)
        number = {name: n for n, name in enumerate(names, start=1)}
        new_faces[video_id + suffix] = {frame_key(number[k]): box for k, box in faces[video_id].items()}
        new_bodies[video_id + suffix] = bodies[video_id]
    for ann in ds.annotations:
        lines = [line.split() for line in ann.read_text().splitlines() if line.strip()]
        (dest / ann.name).write_text("".join(f"{v}{suffix} {n} {label}\n" for v, n, label in lines))
    (dest / "face_boxes.json").write_text(json.dumps(new_faces))
    (dest / "body_boxes.json").write_text(json.dumps(new_bodies))
    return Dataset(dest)


@pytest.fixture(scope="module")
def videos(dataset, tmp_path_factory) -> Dataset:
    """The shared dataset with each clip an FFV1 .mkv (lossless RGB, a keyframe every 4 frames)."""
    return as_video_dataset(dataset, tmp_path_factory.mktemp("videos") / "ds")


@pytest.fixture(scope="module")
def video_cache(videos, clip_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("vcache") / "videos.zarr"
    return out, extract(settings_for(videos, out), clip_model)


# ------------------------------------------------------------------------------------------ the frame index

def noise_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_frames_are_numbered_from_one_and_decoded_exactly_with_seeks(tmp_path, monkeypatch):
    frames = noise_frames(12)
    index = index_video(write_video(tmp_path / "a.mkv", frames))
    assert index.count == 12 and index.keyframes == (1, 5, 9) and (index.width, index.height) == (64, 48)
    decoded: list[int] = []
    real = video_io._decoded

    def spy(*args):  # records the frames the decoder really produced
        for number, frame in real(*args):
            decoded.append(number)
            yield number, frame

    monkeypatch.setattr(video_io, "_decoded", spy)
    got = dict(video_io.decode_video(index, [11, 2, 12]))
    assert sorted(got) == [2, 11, 12] and all(np.array_equal(got[n], frames[n - 1]) for n in got)
    assert decoded == [1, 2, 9, 10, 11, 12]  # frames 3..8 are skipped by a seek to keyframe 9
    decoded.clear()
    assert [n for n, _ in video_io.decode_video(index, range(1, 13))] == list(range(1, 13))
    assert decoded == list(range(1, 13))  # every frame: one pass, no seek


def test_fps_keeps_the_frame_on_screen_at_each_tick_of_a_variable_rate_video(tmp_path):
    # frames start at these milliseconds: 25 frames/s with two pauses (a variable frame rate, handled exactly)
    starts = [0, 40, 80, 200, 240, 600, 640, 680, 720, 1000, 1040, 1080]
    index = index_video(write_video(tmp_path / "vfr.mp4", noise_frames(12), codec="libx264rgb", pix_fmt="rgb24",
                                    pts=starts, options={"crf": "0"}))
    assert [float(t) for t in index.times()] == [s / 1000 for s in starts]
    # ticks 0, .1, .2, ... s: frame 1 (0 ms), 3 (80), 4 (200), 5 (240), [.4: still 5], 6 (600), 8 (680), 9 (720),
    # [.9: still 9], 10 (1000); the next tick, 1.1 s, is past the last frame's start
    assert frames_at_rate(index, 10) == [1, 3, 4, 5, 6, 8, 9, 10]
    assert frames_at_rate(index, 0) == list(range(1, 13)) == frames_at_rate(index, 1000)  # never a frame twice
    assert frames_at_rate(index, 0.5) == [1]


def test_bad_video_files_are_one_clear_line(tmp_path):
    ann = tmp_path / "list.txt"
    good = write_video(tmp_path / "good.mkv", noise_frames(12))
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 100)
    (tmp_path / "cut.mkv").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with av.open(str(tmp_path / "empty.avi"), "w") as out:  # a video stream without a single frame
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height = 64, 48
        out.start_encoding()
    with av.open(str(tmp_path / "sound.mp4"), "w") as out:  # audio only
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    expected = {
        "garbage.mp4": "cannot read video (Invalid data found when processing input)",
        "cut.mkv": "truncated: its frames end at 0.200 s, its header says 0.480 s",
        "empty.avi": "the video stream holds no frames",
        "sound.mp4": "no video stream in the file",
        "missing.mp4": "does not exist",
    }
    for name, reason in expected.items():
        ann.write_text(f"good.mkv 12 1\n{name} 12 2\n")
        with pytest.raises(DataError) as err:
            read_annotations(ann, tmp_path, NUM_CLASSES)
        assert str(err.value).startswith(f"{ann}:2: ") and reason in str(err.value) and "\n" not in str(err.value)
        assert name in str(err.value)
        clips, bad = read_annotations(ann, tmp_path, NUM_CLASSES, skip_bad=True)
        assert [c.video_id for c in clips] == ["good.mkv"] and len(bad) == 1 and reason in bad[0].reason


@pytest.mark.parametrize("keyframes", ["every 4", "all"])
def test_a_clip_cut_with_stream_copy_numbers_only_the_frames_a_player_shows(keyframes, tmp_path):
    """``ffmpeg -ss T -i long.mp4 -c copy clip.mp4`` keeps the packets from the keyframe before T, at negative
    times that an MP4 edit list hides: those are not frames of the clip, and frame 1 is the one at T. When T is a
    keyframe, the demuxer drops the lead-in unread, though the header counts it."""
    options = {"bf": "0"} | ({"sc_threshold": "0"} if keyframes == "every 4" else {})  # noise: each frame a scene cut
    source = write_video(tmp_path / "long.mp4", noise_frames(12), codec="libx264", pix_fmt="yuv420p", options=options)
    with av.open(str(source)) as inp, av.open(str(tmp_path / "cut.mp4"), "w") as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        packets = [p for p in inp.demux(stream) if p.size]
        cut = sorted(p.pts for p in packets)[6]  # at source frame 7; its keyframe is frame 5
        for packet in sorted(packets, key=lambda p: p.dts)[4:]:  # from frame 5 (no B-frames: decode order)
            packet.pts, packet.dts, packet.stream = packet.pts - cut, packet.dts - cut, copy
            out.mux(packet)
    whole, clip = index_video(source), index_video(tmp_path / "cut.mp4")
    assert clip.count == 6 and clip.pts[0] == 0
    if keyframes == "every 4":
        assert whole.keyframes == (1, 5, 9) and clip.keyframes == (1, 3) and len(clip.hidden) == 2
    else:
        assert clip.keyframes == (1, 2, 3, 4, 5, 6) and not clip.hidden
    shown = dict(video_io.decode_video(whole, range(7, 13)))  # the same packets decode to the same pixels
    assert all(np.array_equal(rgb, shown[n + 6]) for n, rgb in video_io.decode_video(clip, range(1, 7)))
    assert all(np.array_equal(rgb, shown[n + 6]) for n, rgb in video_io.decode_video(clip, [2, 4]))


def test_a_matroska_video_that_starts_late_is_complete_and_a_cut_one_still_is_not(tmp_path):
    """Matroska's DURATION tag is when the track ends, counted from 0: a video track starting 80 ms in (after the
    audio) is complete; cut in half, it is truncated (times in the message count from its first frame)."""
    late = write_video(tmp_path / "late.mkv", noise_frames(12), pts=[80 + 40 * i for i in range(12)])
    index = index_video(late)
    assert index.count == 12 and index.pts[0] == 80 and [float(t) for t in index.times()][-1] == 0.44
    (tmp_path / "cut.mkv").write_bytes(late.read_bytes()[: late.stat().st_size // 2])
    with pytest.raises(DataError, match=r"truncated: its frames end at 0\.200 s, its header says 0\.480 s"):
        index_video(tmp_path / "cut.mkv")


def test_a_variable_rate_video_ending_on_a_long_still_is_complete(tmp_path):
    """The last frame lasts as long as its packet says (2 s here), not the median gap (40 ms)."""
    still = write_video(tmp_path / "still.mkv", noise_frames(8), pts=[40 * i for i in range(8)], last_ms=2000)
    assert index_video(still).count == 8


@pytest.mark.parametrize("matrix, turn", [
    pytest.param([0, 1, 0, -1, 0, 0], lambda a: np.rot90(a, -1), id="portrait"),  # phones' matrix: clockwise
    pytest.param([0, -1, 0, 1, 0, 0], lambda a: np.rot90(a, 1), id="counter-clockwise"),
    pytest.param([-1, 0, 0, 0, -1, 0], lambda a: a[::-1, ::-1], id="upside-down"),
    pytest.param([-1, 0, 0, 0, 1, 0], lambda a: a[:, ::-1], id="mirrored"),
])
def test_frames_are_turned_as_the_display_matrix_says(matrix, turn, tmp_path):
    """As ffmpeg's player shows them (OpenCV's autorotation agreed on the three turns; it ignores mirroring)."""
    frames = noise_frames(6)
    video = write_video(tmp_path / "phone.mp4", frames, codec="libx264rgb", pix_fmt="rgb24", options={"crf": "0"},
                        matrix=[v * 65536 for v in matrix] + [0, 0, 1 << 30])  # 16.16 fixed point; w in 2.30
    index = index_video(video)
    shown = turn(frames[0])
    assert (index.width, index.height) == (shown.shape[1], shown.shape[0])
    got = dict(video_io.decode_video(index, [1, 6]))  # 6: after a seek
    assert all(np.array_equal(got[n], turn(frames[n - 1])) and got[n].flags.c_contiguous for n in got)


def test_fps_rounds_each_tick_to_the_time_base_as_the_frames_times_were(tmp_path):
    """30 frames/s in Matroska's whole milliseconds: 0, 33, 67, 100, ... ms. At 15 frames/s, the tick 1/15 s
    (66.7 ms) is the frame at 67 ms; the ticks keep every other frame, as in an MP4's finer time base."""
    index = index_video(write_video(tmp_path / "r30.mkv", noise_frames(12), rate=30))
    assert index.time_base == Fraction(1, 1000) and index.pts[:4] == (0, 33, 67, 100)
    assert frames_at_rate(index, 15) == [1, 3, 5, 7, 9, 11] and frames_at_rate(index, 10) == [1, 4, 7, 10]


# ------------------------------------------------------------------------------------------ extraction

def test_a_video_extracts_exactly_as_its_frame_folder(dataset, zarr_cache, videos, video_cache):
    folders, vids = FeatureCache.open(zarr_cache[0]), FeatureCache.open(video_cache[0])
    assert vids.fingerprint["fps"] == 0.0 and folders.fingerprint == vids.fingerprint
    assert video_cache[1].frames == zarr_cache[1].frames and video_cache[1].frames_without_face == zarr_cache[1].frames_without_face
    for video_id in dataset.video_ids():
        folder, video = folders.clip(video_id), vids.clip(video_id + ".mkv")
        assert np.array_equal(folder, video), video_id  # lossless frames: bit for bit the same features
        assert vids.origin(video_id + ".mkv") == "video" and folders.origin(video_id) == "frames"
        assert vids.frame_names(video_id + ".mkv") == [frame_key(n) for n in range(1, folder.shape[2] + 1)]


def test_the_tensor_path_reads_videos(dataset, videos, clip_model, tmp_path):
    one = dict(annotations=[dataset.annotations[2]], decode="tensor", workers=1)
    folder = extract(settings_for(dataset, tmp_path / "f.zarr", **one), clip_model)
    video = extract(settings_for(videos, tmp_path / "v.zarr", **one | {"annotations": [videos.annotations[2]]}),
                    clip_model)
    assert folder.clips_extracted == video.clips_extracted > 0 and not video.skipped
    f, v = FeatureCache.open(tmp_path / "f.zarr"), FeatureCache.open(tmp_path / "v.zarr")
    assert v.fingerprint["decode"] == "tensor"
    for video_id in f.video_ids:
        assert np.array_equal(f.clip(video_id), v.clip(video_id + ".mkv")), video_id

    # on a GPU the workers hand over decoded frames (not bytes), which a thread of the main process cuts on the device
    clips = read_annotations(videos.annotations[2], videos.root, NUM_CLASSES)[0]
    views = TensorViews(ViewMaker.from_config(settings_for(videos, tmp_path).crop.resolved(), videos.root), clip_model.preprocess)
    deferred = ClipFrames(clips, views.view_maker, clip_model.preprocess, 1, views, defer=True)[0]
    frames = deferred["inputs"]["frames"]
    assert frames.dtype == torch.uint8 and frames.shape[:2] == (len(clips[0].frames), 3) and "data" not in deferred["inputs"]
    folder = list_frames(dataset.root / clips[0].video_id.removesuffix(".mkv"))  # the lossless video's own frames
    assert torch.equal(frames, torch.stack([torch.from_numpy(np.array(read_image(f))) for f in folder]).permute(0, 3, 1, 2))


def test_a_lossy_video_is_its_own_decoded_frames_and_close_to_the_originals(dataset, zarr_cache, clip_model, tmp_path):
    """H.264 (libx264, yuv420p, CRF 18, with B-frames) in .mp4: the features equal those of a folder of the frames
    decoded from the video, and stay within the codec's loss of the original frames (measured: cosine >= 0.9990
    on this data and model; asserted >= 0.998)."""
    ds = as_video_dataset(dataset, tmp_path / "lossy", suffix=".mp4", codec="libx264", pix_fmt="yuv420p",
                          options={"crf": "18"})
    test_list = [ds.annotations[2]]
    clips, _ = read_annotations(test_list[0], ds.root, NUM_CLASSES)
    decoded = tmp_path / "decoded"  # the frame folder made of the video's own decoded frames (PNG: lossless)
    boxes = ds.boxes()
    for clip in clips:
        for key, image in iter_clip_images(clip):
            (decoded / clip.video_id).mkdir(parents=True, exist_ok=True)
            image.save(decoded / clip.video_id / f"{key}.png")
        boxes[clip.video_id] = {f"{k}.png": box for k, box in boxes[clip.video_id].items()}
    (decoded / "face_boxes.json").write_text(json.dumps(boxes))
    shutil.copy(test_list[0], decoded / "test.txt")
    extract(settings_for(ds, tmp_path / "v.zarr", annotations=test_list), clip_model)
    extract(settings_for(Dataset(decoded), tmp_path / "d.zarr", annotations=[decoded / "test.txt"]), clip_model)
    video, folder, original = (FeatureCache.open(p) for p in (tmp_path / "v.zarr", tmp_path / "d.zarr", zarr_cache[0]))
    for clip in clips:
        got = video.clip(clip.video_id)
        assert np.array_equal(got, folder.clip(clip.video_id))
        want = original.clip(clip.video_id.removesuffix(".mp4")).astype(np.float32)
        got = got.astype(np.float32)
        cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cosine.min() >= 0.998, (clip.video_id, cosine.min())


def damage_packet(path: Path, k: int) -> None:
    """Overwrite the k-th packet (0-based, decode order) of an AVI with zeros: the file demuxes, that frame fails."""
    with av.open(str(path)) as container:
        packet = [p for p in container.demux(video=0) if p.size][k]
    data = bytearray(path.read_bytes())
    data[packet.pos : packet.pos + packet.size] = bytes(packet.size)
    path.write_bytes(bytes(data))


def as_damaged_avi(ds: Dataset, video_id: str) -> str:
    """Clip ``video_id`` of ``ds`` re-written as an MPEG-4 .avi whose frame 4 cannot be decoded; its new id."""
    clip = next(c for c in read_annotations(ds.annotations[1], ds.root, NUM_CLASSES)[0] if c.video_id == video_id)
    new_id = video_id.removesuffix(".mkv") + ".avi"
    write_video(ds.root / new_id, [np.asarray(image) for _, image in iter_clip_images(clip)], codec="mpeg4",
                pix_fmt="yuv420p")
    damage_packet(ds.root / new_id, 3)
    ds.annotations[1].write_text(ds.annotations[1].read_text().replace(video_id, new_id))
    faces = ds.boxes()
    faces[new_id] = faces.pop(video_id)
    ds.face_boxes.write_text(json.dumps(faces))
    return new_id


def test_a_corrupt_video_stops_extraction_naming_it_and_skip_bad_skips_it(videos, weights, tmp_path):
    ds = videos.copy(tmp_path / "ds")
    lines = ds.annotations[1].read_text().splitlines()  # val.txt
    longest = max(range(len(lines)), key=lambda i: int(lines[i].split()[1]))
    damaged = ds.root / as_damaged_avi(ds, lines[longest].split()[0])  # found by a worker, while decoding
    garbage_line = next(i for i in range(len(lines)) if i != longest)
    garbage = ds.root / lines[garbage_line].split()[0]  # found when the list is read
    garbage.write_bytes(b"\x00garbage" * 200)
    result = run_cli(extract_args(ds, tmp_path / "c.zarr", weights, "--workers", "1"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(f"error: {ds.annotations[1]}:{garbage_line + 1}: {garbage}: cannot read video (Invalid data "
                     "found when processing input)", result.output)
    garbage.unlink()
    shutil.copy(ds.root / lines[longest].split()[0], garbage)  # any valid video: the decode-time error is next
    result = run_cli(extract_args(ds, tmp_path / "c.zarr", weights, "--workers", "1"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(f"error: {damaged}: frame 4: cannot decode (Invalid data found when processing input)",
                     result.output)

    garbage.write_bytes(b"\x00garbage" * 200)
    result = run_cli(extract_args(ds, tmp_path / "c.zarr", weights, "--workers", "1", "--skip-bad"))
    assert result.exit_code == 0, result.output
    skipped = FeatureCache.open(tmp_path / "c.zarr").attrs["skipped"]
    assert len(skipped) == 2 and any(str(garbage) in s for s in skipped) and any(f"{damaged}: frame 4" in s for s in skipped)
    assert_in_output("clips skipped (bad input) │ 2", result.output)


# ------------------------------------------------------------------------------------------ raw frames and --fps

def raw_config(ds: Dataset, cache: Path | None, weights: Path, **overrides):
    settings = dict(body_boxes=str(ds.body_boxes), source="raw", num_frames=4) | overrides
    return tiny_run_config(ds, cache, weights, **settings)


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_raw_training_and_evaluation_read_a_video_as_its_frame_folder(decode, dataset, zarr_cache, videos,
                                                                     video_cache, weights, clip_model):
    """Stage 3 and raw eval items (T = 4 frames drawn by TSN sampling: the video is read with seeks) are the
    folder's, pixel for pixel; with the caches' geometry (pil) or without a cache (tensor, body crops)."""
    extra = {} if decode == "pil" else {"decode": "tensor", "crop_body": True}
    caches = (zarr_cache[0], video_cache[0]) if decode == "pil" else (None, None)
    for split, train, augment in (("train", True, True), ("val", False, False)):
        folder, video = (split_dataset(raw_config(ds, cache, weights, **extra), split, train, clip_model.preprocess,
                                       FeatureCache.open(cache) if cache else None, "raw", augment=augment)
                         for ds, cache in ((dataset, caches[0]), (videos, caches[1])))
        assert (video.tensor_views is not None) == (decode == "tensor")
        assert [v + ".mkv" for v in folder.video_ids] == video.video_ids and all(c.video for c in video.clips)
        for key in [(i, epoch) for i in range(len(folder)) for epoch in range(2 if train else 1)]:
            a, b = folder[key], video[key]
            assert torch.equal(a.face, b.face) and torch.equal(a.context, b.context) and a.flip == b.flip, key


def test_fps_resamples_videos_before_caching_and_raw_frames_follow_the_cache(videos, weights, clip_model, tmp_path):
    out = tmp_path / "fps.zarr"
    result = run_cli(extract_args(videos, out, weights, "--fps", "10", "--workers", "0"))
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(out)
    assert cache.fingerprint["fps"] == 10.0
    # the videos run at 25 frames/s: frame n starts at (n - 1) * 40 ms. Tick k (at k * 100 ms, up to the last frame's
    # start) keeps the frame then on screen, 1 + floor(k * 2.5): for 9 frames, 1, 3, 6 and 8
    lengths = set()
    for video_id in cache.video_ids:
        count = index_video(videos.root / video_id).count
        picked = [1 + (5 * k) // 2 for k in range(count) if 100 * k <= 40 * (count - 1)]
        assert cache.frame_names(video_id) == [frame_key(n) for n in picked], video_id
        lengths.add(len(picked))
    assert max(lengths) >= 3

    raw = split_dataset(raw_config(videos, out, weights), "val", False, clip_model.preprocess, cache, "raw")
    assert [[f.name for f in c.frames] for c in raw.clips] == [cache.frame_names(v) for v in raw.video_ids]
    with pytest.raises(ValueError, match="--fps 5.0 contradicts .*which was extracted with fps 10.0"):
        split_dataset(raw_config(videos, out, weights, fps=5), "val", False, clip_model.preprocess, cache, "raw")


def test_a_store_written_before_the_fps_key_kept_every_frame_and_resumes(tmp_path, dataset, zarr_cache, clip_model):
    old = tmp_path / "old.zarr"
    shutil.copytree(zarr_cache[0], old)
    root = zarr.open_group(str(old), mode="a")
    root.attrs["fingerprint"] = {k: v for k, v in root.attrs["fingerprint"].items() if k != "fps"}
    assert FeatureCache.open(old).fingerprint["fps"] == 0.0
    summary = extract(settings_for(dataset, old), clip_model)  # resumes: nothing to do, no fingerprint complaint
    assert summary.clips_extracted == 0 and summary.clips_already_done == len(dataset.video_ids())
    with pytest.raises(CacheError, match="fps: store has 0.0, this run has 10.0"):
        extract(settings_for(dataset, old, fps=10), clip_model)


def test_box_keys_that_name_no_frame_are_refused_or_warned_about_before_any_work(videos, weights, tmp_path):
    """A video's frames are keyed from 00001: an entry whose keys name none of the clip's frames would leave every
    face view the whole frame (refused, before the store is made); keys counted from 0 leave one unused (a warning)."""
    ds = videos.copy(tmp_path / "ds")
    boxes = json.loads(ds.face_boxes.read_text())
    shifted, renamed = [clip for clip, entry in boxes.items() if entry][:2]
    boxes[shifted] = {f"{int(key) - 1:05d}": box for key, box in boxes[shifted].items()}  # counted from 0
    good = boxes[renamed]
    boxes[renamed] = {f"frame_{key}.jpg": box for key, box in good.items()}
    ds.face_boxes.write_text(json.dumps(boxes))
    out = tmp_path / "c.zarr"
    result = run_cli(extract_args(ds, out, weights))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert_in_output(f"error: {ds.face_boxes}: none of the {len(good)} frame keys of {renamed!r} names one of its "
                     "frames", result.output)
    assert not out.exists()
    boxes[renamed] = good
    ds.face_boxes.write_text(json.dumps(boxes))
    result = run_cli(extract_args(ds, out, weights))
    assert result.exit_code == 0, result.output
    assert_in_output(f"warning: 1 frame keys in {ds.face_boxes} name no frame of their clip (first: '00000' of "
                     f"{shifted!r})", result.output)
