"""``caer demo``: the whole pipeline on a synthetic dataset, offline, in a minute or two on a laptop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .config import load_config
from .encoder import load_clip, resolve_device, save_random_weights
from .extract import ExtractSettings, extract
from .synth import SynthSettings, synthesise
from .train import run


def demo(out: Path, clips: int = 400, frames: int = 8, epochs: int | None = None, model: str = "caer-tiny",
         pretrained: str | None = None, device: str = "cpu", console: Console | None = None) -> dict:
    """synth -> (tiny weights) -> extract -> stages 1, 2, 3 -> test report. Returns the test report as a dict."""
    console = console or Console()
    if model == "caer-tiny":
        # a width-64 model gains nothing from intra-op threads, and spin-waiting threads on a busy laptop
        # slow it down many times over
        torch.set_num_threads(1)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: folder exists and is not empty; choose a new one")
    start = time.perf_counter()
    data = out / "data"
    console.rule("1/4 caer synth")
    counts = synthesise(SynthSettings(data, clips=clips, frames=frames))
    console.print(f"{sum(counts.values())} clips in {data}: {counts}")
    if pretrained is None:
        if model != "caer-tiny":
            raise ValueError("--pretrained is needed with --model (e.g. --pretrained openai, or a local checkpoint file)")
        pretrained = str(save_random_weights(model, out / "tiny-clip.pt"))
        console.print(f"random tiny CLIP weights: {pretrained}")

    console.rule("2/4 caer extract")
    annotations = [data / f"{s}.txt" for s in ("train", "val", "test")]
    cache = out / "cache.zarr"
    summary = extract(
        ExtractSettings(annotations=annotations, out=cache, face_boxes=data / "face_boxes.json", views=2, workers=0),
        load_clip(model, pretrained, resolve_device(device)), console,
    )
    console.print(summary.table())

    console.rule("3/4 caer train --staged-training")
    overrides = {
        "model": model, "pretrained": pretrained, "device": device, "cache": str(cache), "face_boxes": str(data / "face_boxes.json"),
        "train_list": str(annotations[0]), "val_list": str(annotations[1]), "test_list": str(annotations[2]),
        "run_dir": str(out / "run"), "staged_training": True, "epochs": epochs,
    }
    cfg = load_config("tiny", overrides)
    results = run(cfg, console)

    console.rule("4/4 results")
    report = json.loads((out / "run" / "test_report.json").read_text())
    table = Table(title=f"caer demo finished in {time.perf_counter() - start:.0f} s", show_header=False)
    table.add_row("test WAR / UAR", f"{report['war']:.2f} / {report['uar']:.2f} (chance UAR {100 / len(report['classes']):.0f})")
    for r in results:
        table.add_row(f"stage {r.stage} best checkpoint", f"{r.best_path} (valid UAR {r.best['valid_uar']:.2f})")
    table.add_row("dataset", str(data))
    table.add_row("feature cache", str(cache))
    table.add_row("metrics per epoch", str(out / "run" / "metrics.jsonl"))
    table.add_row("test report", f"{out / 'run' / 'test_report.json'}, {out / 'run' / 'test_confusion.png'}")
    console.print(table)
    return report
