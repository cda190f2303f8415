"""`caer boxes`: face boxes found in real photographs (scikit-image's astronaut, matplotlib's Grace Hopper) turned into
a video and a frame folder, tracked across frames to one person per clip, and written as RAER box files.

Tracking itself is tested on synthetic boxes: gap filling, association of crossing tracks, the person rule.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import matplotlib
import numpy as np
import pytest
import typer
from PIL import Image
from rich.console import Console
from skimage.data import astronaut

from caer.cli import app
from caer.config import BoxesConfig, CropConfig, options
from caer.data.faces import Track, body_box, choose_person, clip_person, iou_matrix, make_detector, track_faces
from caer.data.raer import ViewMaker, load_body_boxes, load_face_boxes, read_annotations
from caer.pipeline.boxes import find_boxes
from conftest import assert_in_output, run_cli

# the astronaut's face in skimage's 512x512 astronaut(): the hog, cnn and haar detectors agree within a few pixels
ASTRONAUT_FACE = np.array([172, 70, 268, 166])
WINDOW = (256, 192)  # width, height of the frames cut from the photograph


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return astronaut()


def grace_hopper(scale: float) -> np.ndarray:
    image = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    return np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR))


def astronaut_window(photo: np.ndarray, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """A frame cut from the photograph with the face moved ``shift`` px right and down, and the face's box in it."""
    left, top = 90 - shift, 20 - shift
    frame = np.ascontiguousarray(photo[top:top + WINDOW[1], left:left + WINDOW[0]])
    return frame, ASTRONAUT_FACE - [left, top, left, top]


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    """H.264 (lossy, as real videos are), 25 frames/s."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": "20"})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for rgb in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def iou(a, b) -> float:
    return float(iou_matrix(np.array([a]), np.array([b]))[0, 0])


def boxes_cli(annotation: Path, out: Path, *extra: str):
    return run_cli(["boxes", str(annotation), "-o", str(out), "--workers", "0", *extra])


# ------------------------------------------------------------------------------------------ real photographs

@pytest.mark.parametrize("name, upsample", [("hog", 1), ("cnn", 0), ("haar", 1)])
def test_every_shipped_detector_finds_the_astronauts_face_offline(photo, name, upsample):
    frame, face = astronaut_window(photo, 0)
    found = make_detector(name, upsample)(frame)
    assert found.shape[1] == 5 and len(found) >= 1
    assert max(iou(box, face) for box in found[:, :4]) > 0.6


def test_boxes_follows_the_face_through_a_video_made_from_a_photograph(photo, tmp_path):
    """Eight H.264 frames, the face 2 px further right and down in each: a box in every frame, on the face."""
    frames, faces = zip(*(astronaut_window(photo, 2 * i) for i in range(8)))
    write_video(tmp_path / "astronaut.mp4", list(frames))
    (tmp_path / "list.txt").write_text("astronaut.mp4 8 1\n")
    result = boxes_cli(tmp_path / "list.txt", tmp_path / "face_boxes.json", "--body-boxes", str(tmp_path / "body.json"))
    assert result.exit_code == 0, result.output
    assert_in_output("caer boxes", result.output)  # the summary table
    boxes = json.loads((tmp_path / "face_boxes.json").read_text())["astronaut.mp4"]
    assert sorted(boxes) == [f"{n:05d}" for n in range(1, 9)]  # the video's frame keys
    for n, face in enumerate(faces, start=1):
        assert iou(boxes[f"{n:05d}"], face) > 0.6, n
    # the body box holds every face box and stays inside the frame
    body = json.loads((tmp_path / "body.json").read_text())["astronaut.mp4"]
    assert body[0] >= 0 and body[1] >= 0 and body[2] <= WINDOW[0] and body[3] <= WINDOW[1]
    assert all(body[0] <= b[0] and body[1] <= b[1] and body[2] >= b[2] and body[3] >= b[3] for b in boxes.values())
    # caer extract reads the files as they are: every frame of the video finds its box
    clip = read_annotations(tmp_path / "list.txt", tmp_path, 5)[0][0]
    views = ViewMaker.from_config(CropConfig(face_boxes=str(tmp_path / "face_boxes.json"),
                                             body_boxes=str(tmp_path / "body.json"), crop_body=True), tmp_path)
    assert all(views.frame_boxes(clip, frame)[0] is not None for frame in clip.frames)
    assert load_body_boxes(tmp_path / "body.json", tmp_path)["astronaut.mp4"] == tuple(body)


def test_videos_and_frame_folders_given_themselves_get_boxes_keyed_from_the_root(photo, tmp_path):
    """New videos have no list and no label: given as inputs, each is a clip keyed by its path from --root (the first
    input's folder): the keys caer predict --face-boxes looks up beside the box file."""
    new = tmp_path / "new"
    (new / "f").mkdir(parents=True)
    frames, faces = zip(*(astronaut_window(photo, 2 * i) for i in range(4)))
    write_video(new / "a.mp4", list(frames))
    for n, frame in enumerate(frames, start=1):
        Image.fromarray(frame).save(new / "f" / f"{n}.png")
    out = new / "boxes.json"
    missing = new / "gone.mp4"
    stopped = run_cli(["boxes", str(new / "a.mp4"), str(new / "f"), str(missing), "-o", str(out), "--workers", "0"])
    assert stopped.exit_code == 2 and not out.exists(), stopped.output
    assert_in_output(f"video file {missing} does not exist", stopped.output)
    done = run_cli(["boxes", str(new / "a.mp4"), str(new / "f"), str(missing), "-o", str(out), "--workers", "0",
                    "--skip-bad"])
    assert done.exit_code == 0, done.output
    boxes = json.loads(out.read_text())
    assert sorted(boxes) == ["a.mp4", "f"]
    assert sorted(boxes["a.mp4"]) == [f"{n:05d}" for n in range(1, 5)] and sorted(boxes["f"]) == ["1.png", "2.png",
                                                                                                 "3.png", "4.png"]
    assert all(iou(boxes["a.mp4"][f"{n:05d}"], face) > 0.6 for n, face in enumerate(faces, start=1))
    other = shutil.copytree(new / "f", tmp_path / "other")
    outside = run_cli(["boxes", str(new / "a.mp4"), str(other), "-o", str(tmp_path / "b.json"), "--workers", "0"])
    assert outside.exit_code == 2, outside.output
    assert_in_output(f"{other} is not under --root {new}", outside.output)


def two_faces(photo: np.ndarray, shift: int, hide_astronaut: bool, hide_grace: bool) -> tuple[np.ndarray, np.ndarray]:
    """The astronaut (face ~96 px) beside Grace Hopper (face ~65 px), both moving; either face can be covered.
    Returns the frame and the astronaut's face box in it."""
    left, face = astronaut_window(photo, shift)
    right = np.full((WINDOW[1], 160, 3), 90, np.uint8)
    grace = grace_hopper(0.3)[:WINDOW[1] - 2 * shift, :150]
    right[2 * shift:2 * shift + grace.shape[0], 4:4 + grace.shape[1]] = grace
    if hide_astronaut:
        left = left.copy()
        left[face[1]:face[3], face[0]:face[2]] = 120
    if hide_grace:
        right[:110] = 90
    return np.concatenate([left, right], axis=1), face


def test_with_two_faces_the_clip_keeps_one_person_and_fills_its_short_gap(photo, tmp_path):
    """A frame folder, two real faces in every frame. The astronaut is covered in frame 6 and Grace Hopper in frames
    2-4, so the astronaut is found in more frames and is the clip's person. Picking the largest face frame by frame
    would jump to Grace in frame 6; the track keeps to the astronaut there, with an interpolated box."""
    clip_dir = tmp_path / "two"
    clip_dir.mkdir()
    faces = []
    for n in range(1, 9):
        frame, face = two_faces(photo, n, hide_astronaut=n == 6, hide_grace=n in (2, 3, 4))
        Image.fromarray(frame).save(clip_dir / f"{n:05d}.png")
        faces.append(face)
    (tmp_path / "list.txt").write_text("two 8 1\n")
    cfg = BoxesConfig([str(tmp_path / "list.txt")], str(tmp_path / "face_boxes.json"))
    summary = find_boxes(cfg, console=Console(file=io.StringIO()))
    assert (summary.frames, summary.frames_detected, summary.frames_filled, summary.frames_without_face) == (8, 7, 1, 0)
    assert summary.tracks == 2 and summary.faces == 7 + 5  # both faces were found and tracked
    boxes = load_face_boxes(tmp_path / "face_boxes.json", tmp_path)["two"]
    assert sorted(boxes) == [f"{n:05d}.png" for n in range(1, 9)]
    for n, face in enumerate(faces, start=1):
        assert iou(boxes[f"{n:05d}.png"], face) > 0.5, n  # the astronaut's face, never Grace Hopper's


@pytest.mark.slow
def test_worker_processes_write_the_same_boxes(photo, tmp_path):
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    for n in range(1, 7):
        Image.fromarray(two_faces(photo, n, False, False)[0]).save(clip_dir / f"{n:05d}.png")
    (tmp_path / "list.txt").write_text("clip 6 1\n")
    assert boxes_cli(tmp_path / "list.txt", tmp_path / "a.json").exit_code == 0
    result = run_cli(["boxes", str(tmp_path / "list.txt"), "-o", str(tmp_path / "b.json"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


# ------------------------------------------------------------------------------------------ the command's edges

def test_boxes_has_one_flag_per_declared_option():
    command = typer.main.get_command(app).commands["boxes"]
    flags = sorted(p.name for p in command.params if p.name != "help")
    assert flags == sorted([f.name for f, _ in options(BoxesConfig)] + ["root", "workers", "skip_bad"])


def test_bad_input_is_one_line_and_leaves_no_half_written_file(photo, tmp_path):
    (tmp_path / "good").mkdir()
    Image.fromarray(astronaut_window(photo, 0)[0]).save(tmp_path / "good" / "1.png")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    (tmp_path / "list.txt").write_text("good 1 1\n")
    (tmp_path / "bad.txt").write_text("good 1 1\nbroken.mp4 5 1\n")
    out = tmp_path / "face_boxes.json"
    out.write_text("{}")
    refused = boxes_cli(tmp_path / "list.txt", out)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert_in_output(f"{out} already exists: pass --overwrite to replace it", refused.output)
    failed = boxes_cli(tmp_path / "bad.txt", out, "--overwrite")
    assert failed.exit_code == 2 and "Traceback" not in failed.output
    assert_in_output("broken.mp4", failed.output)
    assert out.read_text() == "{}"  # the old file stands, and no temporary file is left beside it
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    unknown = boxes_cli(tmp_path / "list.txt", out, "--overwrite", "--detector", "mtcnn")
    assert_in_output("--detector mtcnn: unknown detector; choose one of hog, cnn, haar, yunet:PATH.onnx", unknown.output)
    missing = boxes_cli(tmp_path / "list.txt", out, "--overwrite", "--detector", f"yunet:{tmp_path / 'yunet.onnx'}")
    assert missing.exit_code == 2
    assert_in_output(f"--detector yunet:{tmp_path / 'yunet.onnx'}: no such file", missing.output)
    assert boxes_cli(tmp_path / "list.txt", out, "--overwrite").exit_code == 0
    assert list(json.loads(out.read_text())["good"]) == ["1.png"]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_skip_bad_leaves_out_clips_with_bad_input_and_keeps_the_others(photo, tmp_path, workers):
    """Without --skip-bad one unreadable frame stops the run and nothing is written (hours of detection lost on a
    long dataset); with it the clip is left out and listed, and every other clip gets its boxes."""
    for name in ("good", "damaged"):
        (tmp_path / name).mkdir()
        for n in range(1, 5):
            Image.fromarray(astronaut_window(photo, 2 * n)[0]).save(tmp_path / name / f"{n}.png")
    (tmp_path / "damaged" / "3.png").write_bytes(b"not a png")
    (tmp_path / "list.txt").write_text("damaged 4 1\ngood 4 1\nmissing 4 1\n")
    out = tmp_path / "face_boxes.json"
    stopped = boxes_cli(tmp_path / "list.txt", out, "--workers", workers)
    assert stopped.exit_code == 2 and not out.exists(), stopped.output
    done = boxes_cli(tmp_path / "list.txt", out, "--workers", workers, "--skip-bad")
    assert done.exit_code == 0, done.output
    assert list(json.loads(out.read_text())) == ["good"]
    assert list(json.loads(out.read_text())["good"]) == [f"{n}.png" for n in range(1, 5)]
    assert_in_output(f"skipped {tmp_path / 'list.txt'}:1: {tmp_path / 'damaged' / '3.png'}: cannot read image", done.output)
    assert_in_output(f"{tmp_path / 'list.txt'}:3:", done.output)
    assert_in_output("clips skipped (bad input) │ 2", done.output)
    assert_in_output("│ clips │ 1 │", done.output)  # the clips with boxes: the damaged one is counted once, as skipped


def test_the_summary_names_the_clips_where_no_face_was_found(photo, tmp_path):
    for name in ("face", "blank"):
        (tmp_path / name).mkdir()
        for n in range(1, 3):
            image = astronaut_window(photo, 2 * n)[0] if name == "face" else np.full((96, 128, 3), 90, np.uint8)
            Image.fromarray(image).save(tmp_path / name / f"{n}.png")
    (tmp_path / "list.txt").write_text("blank 2 1\nface 2 1\n")
    done = boxes_cli(tmp_path / "list.txt", tmp_path / "boxes.json")
    assert done.exit_code == 0, done.output
    assert_in_output("clips with no face at all │ 1 (first: blank)", done.output)


def test_an_input_list_is_never_an_output(photo, tmp_path):
    (tmp_path / "good").mkdir()
    Image.fromarray(astronaut_window(photo, 0)[0]).save(tmp_path / "good" / "1.png")
    lists = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path in lists:
        path.write_text("good 1 1\n")
    refused = boxes_cli(lists[0], lists[0], "--overwrite")
    assert refused.exit_code == 2, refused.output
    assert_in_output(f"--out {lists[0]} is the input list {lists[0]}: write the output elsewhere", refused.output)
    other = tmp_path / "sub" / ".." / "b.txt"  # another spelling of the second list
    (tmp_path / "sub").mkdir()
    refused = run_cli(["boxes", *map(str, lists), "-o", str(tmp_path / "f.json"), "--body-boxes", str(other),
                       "--overwrite", "--workers", "0"])
    assert refused.exit_code == 2, refused.output
    assert_in_output(f"--body-boxes {other} is the input list {lists[1]}", refused.output)
    assert all(path.read_text() == "good 1 1\n" for path in lists) and not (tmp_path / "f.json").exists()


def test_an_existing_output_is_refused_before_any_clip_is_read(tmp_path):
    (tmp_path / "list.txt").write_text("missing 4 1\n")
    out = tmp_path / "face_boxes.json"
    out.write_text("{}")
    refused = boxes_cli(tmp_path / "list.txt", out)
    assert refused.exit_code == 2, refused.output
    assert_in_output(f"--out {out} already exists: pass --overwrite to replace it", refused.output)


def test_a_clip_s_video_or_frame_folder_is_never_an_output(photo, tmp_path):
    (tmp_path / "good").mkdir()
    Image.fromarray(astronaut_window(photo, 0)[0]).save(tmp_path / "good" / "1.png")
    video = write_video(tmp_path / "clip.mp4", [astronaut_window(photo, 2 * n)[0] for n in range(3)])
    (tmp_path / "list.txt").write_text("good 1 1\nclip.mp4 3 1\n")
    before = video.read_bytes()
    refused = boxes_cli(tmp_path / "list.txt", video, "--overwrite")
    assert refused.exit_code == 2, refused.output
    assert_in_output(f"--out {video} is the clip clip.mp4's video {video}: write the output elsewhere", refused.output)
    assert video.read_bytes() == before
    inside = tmp_path / "good" / "boxes.json"
    refused = boxes_cli(tmp_path / "list.txt", inside)
    assert refused.exit_code == 2 and not inside.exists(), refused.output
    assert_in_output(f"--out {inside} lies inside the clip good's frame folder {tmp_path / 'good'}", refused.output)


# ------------------------------------------------------------------------------------------ Ctrl-C, and a killed run

def session_processes(session: int, command: bytes = b"") -> list[int]:
    """The live (not zombie) processes of ``session`` whose command line holds ``command``, from Linux's /proc."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state, _, _, sid = (proc / "stat").read_text().rpartition(")")[2].split()[:4]
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # ended meanwhile
        if int(sid) == session and state != "Z" and command in cmdline:
            found.append(int(proc.name))
    return found


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def boxes_run(photo, tmp_path):
    """Start `caer boxes --workers 2` in a session of its own over a clip of N copies of one frame: a function of
    (N, extra flags) that returns the process and its output file once both workers run. Every session it started is
    killed afterwards."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux's /proc to find the worker processes")
    Image.fromarray(astronaut_window(photo, 0)[0]).save(tmp_path / "frame.png")
    runs = []

    def start(frames: int, *extra: str) -> tuple[subprocess.Popen, Path]:
        (tmp_path / "clip").mkdir()
        for n in range(1, frames + 1):
            (tmp_path / "clip" / f"{n:05d}.png").symlink_to(tmp_path / "frame.png")
        (tmp_path / "list.txt").write_text(f"clip {frames} 1\n")
        output = tmp_path / "output.txt"
        with open(output, "w") as out:
            run = subprocess.Popen([sys.executable, "-m", "caer.cli", "boxes", str(tmp_path / "list.txt"), "-o",
                                    str(tmp_path / "out.json"), "--workers", "2", *extra],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        runs.append(run)
        started = wait_until(lambda: len(session_processes(run.pid, b"spawn_main")) == 2 or run.poll() is not None, 60)
        assert started and run.poll() is None, output.read_text()
        return run, output

    yield start
    for run in runs:
        try:
            os.killpg(run.pid, signal.SIGKILL)  # whatever a failed test left
        except ProcessLookupError:
            pass
        run.wait()


def test_the_workers_ignore_sigint(boxes_run, tmp_path):
    """SIGINT sent to the workers alone (a Ctrl-C reaches them too, but it is the run's to handle) changes nothing:
    the run finishes every frame."""
    run, output = boxes_run(40)
    for pid in session_processes(run.pid, b"spawn_main"):
        os.kill(pid, signal.SIGINT)
    assert run.wait(timeout=60) == 0, output.read_text()
    assert len(json.loads((tmp_path / "out.json").read_text())["clip"]) == 40


def test_ctrl_c_stops_the_run_and_its_workers_quietly(boxes_run):
    """A terminal's Ctrl-C reaches every process of the foreground group: the run stops (hog at --upsample 2 would take
    minutes over these frames), without a traceback, and leaves no process behind."""
    run, output = boxes_run(400, "--upsample", "2")
    os.killpg(run.pid, signal.SIGINT)
    try:
        code = run.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"caer boxes still runs 30 s after Ctrl-C:\n{output.read_text()}")
    assert code != 0 and "Traceback" not in output.read_text(), output.read_text()
    assert wait_until(lambda: not session_processes(run.pid), 10), session_processes(run.pid)


def test_the_workers_end_when_the_run_is_killed(boxes_run):
    run, output = boxes_run(400, "--upsample", "2")
    run.kill()
    run.wait()
    assert wait_until(lambda: not session_processes(run.pid, b"spawn_main"), 10), output.read_text()


# ------------------------------------------------------------------------------------------ tracking, on synthetic boxes

def box_at(x: float, y: float = 0.0, size: float = 40.0) -> np.ndarray:
    return np.array([x, y, x + size, y + size])


def test_crossing_faces_keep_their_tracks():
    """Two faces moving towards each other and past: each track keeps its direction. Matching on the last box alone
    would swap them at frame 6 (the other face's box overlaps more), the expected box at the track's speed does not."""
    frames = []
    for t in range(12):
        right, left = box_at(10 * t), box_at(105 - 10 * t, y=3)
        frames.append(np.stack([left, right] if t % 2 else [right, left]))  # the detector's order means nothing
    tracks = track_faces(frames, min_iou=0.3, max_gap=2)
    assert len(tracks) == 2
    for track in tracks:
        xs = [track.boxes[t][0] for t in range(12)]
        steps = set(np.diff(xs).round(6))
        assert steps in ({10.0}, {-10.0}), xs


def test_short_gaps_are_interpolated_and_long_ones_stay_missing():
    frames = [[box_at(0)], [box_at(4)], [], [], [box_at(16)], [], [], [], [], [], [box_at(24)]]
    (track,) = track_faces(frames, min_iou=0.3, max_gap=3)  # found again 6 frames later, where it was: the same track
    assert sorted(track.boxes) == [0, 1, 4, 10]
    filled = track.filled(max_gap=3)
    assert sorted(filled) == [0, 1, 2, 3, 4, 10]  # frames 5..9 (a gap of 5) stay without a box
    np.testing.assert_allclose(filled[2], box_at(8))
    np.testing.assert_allclose(filled[3], box_at(12))
    person = clip_person(frames, 200, 100, max_gap=3)
    assert sorted(person.faces) == [0, 1, 2, 3, 4, 10] and person.detected == 4 and person.tracks == 1


def test_a_lost_track_expects_its_face_where_it_was_last_seen():
    track = Track({0: box_at(0), 1: box_at(5)})
    np.testing.assert_allclose(track.expected(3, max_gap=2), box_at(15))  # moving on at 5 px per frame
    np.testing.assert_allclose(track.expected(9, max_gap=2), box_at(5))  # lost too long: where it was


def test_the_person_is_the_longest_track_then_the_larger_face():
    big_short = Track({0: box_at(0, size=80), 1: box_at(0, size=80)})
    small_long = Track({0: box_at(100), 1: box_at(100), 2: box_at(100)})
    assert choose_person([big_short, small_long]) is small_long
    small_same = Track({0: box_at(100), 1: box_at(100)})
    assert choose_person([small_same, big_short]) is big_short
    assert choose_person([]) is None
    nobody = clip_person([[], []], 320, 240)
    assert nobody.faces == {} and nobody.body == (0.0, 0.0, 320.0, 240.0) and nobody.tracks == 0


def test_the_body_box_rule():
    """Union of the face boxes grown by 1 face width sideways, 0.5 face height up and 3 down, clipped to the frame."""
    assert body_box([np.array([100, 50, 140, 90])], 320, 240) == (60.0, 30.0, 180.0, 210.0)
    assert body_box([np.array([100, 50, 140, 90]), np.array([110, 60, 150, 100])], 320, 240) == (60.0, 30.0, 190.0, 220.0)
    assert body_box([np.array([0, 0, 40, 80])], 100, 200) == (0.0, 0.0, 80.0, 200.0)


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [50, 50, 50, 60]])
    np.testing.assert_allclose(iou_matrix(a, b), [[1 / 3, 1, 0], [0, 0, 0]])
