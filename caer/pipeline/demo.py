"""``caer demo``: the whole pipeline on a synthetic dataset, offline, in a minute or two on a laptop."""

from __future__ import annotations

import json
import logging
import time
from fractions import Fraction
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..config import DemoConfig, ExtractConfig, PredictConfig, SynthConfig, from_flat, load_config
from ..data.raer import list_frames, read_image
from ..data.synth import check_new_folder, synthesise
from ..data.video import frame_key
from ..model.encoder import check_weights, save_random_weights
from ..runtime import resolve_device
from .annotate import write_video
from .compare import compare_runs, rich_tables
from .display import print_unfolded
from .extract import extract
from .predict import predict
from .run_dir import RunDir
from .train import run

# configs/ablations/<name>.yaml, each applied on top of configs/tiny.yaml by `caer demo --ablations`
ABLATIONS = ("no_eaa", "no_iec", "no_mi", "no_dc", "face_only", "context_only")
ABLATION_EPOCHS = 15  # stage-2 epochs of each ablation run, unless --epochs says otherwise


def demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """synth -> (tiny weights) -> extract -> stages 1, 2, 3 -> test report (then, with ``--ablations``, the
    ablation runs and their comparison). Returns the test report as a dict."""
    console = console or Console()
    if cfg.model == "caer-tiny":
        # a width-64 model gains nothing from intra-op threads, and spin-waiting threads on a busy laptop
        # slow it down many times over
        torch.set_num_threads(1)
    out = Path(cfg.out or f"caer-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    check_settings(cfg, out)
    start = time.perf_counter()
    data = out / "data"
    console.rule("1/5 caer synth")
    counts = synthesise(SynthConfig(str(data), clips=cfg.clips, frames=cfg.frames))
    console.print(f"{sum(counts.values())} clips in {data}: {counts}")
    pretrained = cfg.pretrained
    if pretrained is None:
        pretrained = str(save_random_weights(cfg.model, out / "tiny-clip.pt"))
        console.print(f"random tiny CLIP weights: {pretrained}")

    console.rule("2/5 caer extract")
    annotations = [str(data / f"{s}.txt") for s in ("train", "val", "test")]
    shared = {"model": cfg.model, "pretrained": pretrained, "device": cfg.device, "face_boxes": str(data / "face_boxes.json")}
    cache = out / "cache.zarr"
    summary = extract(from_flat(ExtractConfig, shared | {"annotations": annotations, "out": str(cache), "views": 2,
                                                         "workers": 0}), console=console)
    console.print(summary.table())

    console.rule("3/5 caer train --staged-training")
    base = shared | {"cache": str(cache), "train_list": annotations[0], "val_list": annotations[1],
                     "test_list": annotations[2], "staged_training": True, "epochs_stage2": cfg.epochs,
                     "print_confusion": "end"}  # one confusion matrix a stage, not one an epoch
    run_dir = RunDir(out / "run")
    results = run(load_config("tiny", base | {"run_dir": str(run_dir.path)}), console)

    console.rule("4/5 caer predict on a video")
    predicted = predict_on_video(data, out / "video", results[-1].best_path, cfg.device, console)

    console.rule("5/5 results")
    report = json.loads(run_dir.test_report.read_text())
    table = Table(title=f"caer demo finished in {time.perf_counter() - start:.0f} s", show_header=False)
    table.add_row("test WAR / UAR", f"{report['war']:.2f} / {report['uar']:.2f} (chance UAR {100 / len(report['classes']):.0f})")
    for r in results:
        table.add_row(f"stage {r.stage} best checkpoint", f"{r.best_path} (valid UAR {r.best['valid_uar']:.2f})")
    table.add_row("dataset", str(data))
    table.add_row("feature cache", str(cache))
    table.add_row("metrics per epoch", str(run_dir.metrics))
    table.add_row("test report", f"{run_dir.test_report}, {run_dir.test_confusion}")
    table.add_row("training curves", str(run_dir.curves))
    table.add_row("caer predict on a video", predicted)
    console.print(table)
    if cfg.ablations:
        run_ablations(out / "ablations", base | {"epochs_stage2": cfg.epochs or ABLATION_EPOCHS}, console)
    return report


def check_settings(cfg: DemoConfig, out: Path) -> None:
    """Refuse, before anything is written, a non-empty ``out``, a bad ``--device``, an unknown ``--model``, and
    ``--pretrained`` missing (another model than caer-tiny) or neither a file nor a tag of the model."""
    check_new_folder("--out", out)
    resolve_device(cfg.device)
    check_weights(cfg.model, cfg.pretrained)
    if cfg.pretrained is None and cfg.model != "caer-tiny":
        raise ValueError("--pretrained is needed with --model (e.g. --pretrained openai, or a local checkpoint file)")


def predict_on_video(data: Path, out: Path, checkpoint: Path, device: str, console: Console) -> str:
    """The first test clip written as an mp4 (lossless H.264, 25 frames/s), and ``caer predict`` on it with the
    last stage's checkpoint. Its faces come from the dataset's own boxes, keyed by the video's frame numbers: the
    synthetic faces are plain squares that no face detector would find. Returns a line for the summary table."""
    video_id, _, label = (data / "test.txt").read_text().split("\n")[0].split()
    frames = list_frames(data / video_id)
    video = out / f"{Path(video_id).name}.mp4"
    write_video(video, ((read_image(f), n) for n, f in enumerate(frames)), Fraction(25), lossless=True)
    boxes = json.loads((data / "face_boxes.json").read_text())[video_id]
    keyed = {frame_key(n): boxes[f.name] for n, f in enumerate(frames, start=1) if f.name in boxes}
    (out / "face_boxes.json").write_text(json.dumps({video.name: keyed}))
    settings = PredictConfig(checkpoint=str(checkpoint), inputs=[str(video)], json=str(out / "predict.json"),
                             annotate=str(out / "labelled.mp4"))
    result = predict(settings, {"face_boxes": str(out / "face_boxes.json"), "device": device}, {}, console)
    result.show(console)
    person = result.as_dict()["inputs"][0]["persons"][0]
    classes = result.predictor.classes
    return (f"{video}: {person['label']} (p {max(person['probabilities']):.2f}; true class {classes[int(label) - 1]}); "
            f"{out / 'predict.json'}, {out / 'labelled.mp4'}")


def run_ablations(out: Path, base: dict, console: Console) -> tuple[list[str], list[list[str]]]:
    """``caer demo --ablations``: the full tiny model and each of ``ABLATIONS`` (``-c tiny -c ablations/<name>``),
    stages 1 and 2 (no stage 3), each with its test report; prints and returns their ``caer compare`` table."""
    console.rule(f"ablations: the full model and {len(ABLATIONS)} ablations, stages 1 and 2, "
                 f"{base['epochs_stage2']} stage-2 epochs each")
    quiet, library = Console(quiet=True), logging.getLogger("caer")
    run_dirs, level = [], library.level
    library.setLevel(logging.WARNING)  # the encoder's load message, three times per run, says nothing new here
    try:
        for i, name in enumerate(("full", *ABLATIONS), start=1):
            files = ["tiny"] if name == "full" else ["tiny", f"ablations/{name}"]
            start = time.perf_counter()
            run_dir = out / name
            run(load_config(files, base | {"run_dir": str(run_dir), "epochs_stage3": 0}), quiet)
            report = json.loads(RunDir(run_dir).test_report.read_text())
            console.print(f"{i}/{1 + len(ABLATIONS)} {name}: test WAR {report['war']:.2f} UAR {report['uar']:.2f} "
                          f"({time.perf_counter() - start:.0f} s)", highlight=False)
            run_dirs.append(run_dir)
    finally:
        library.setLevel(level)
    columns, rows = compare_runs(run_dirs)
    print_unfolded(console, *rich_tables(columns, rows, title=f"caer compare {out}/*"))
    return columns, rows
