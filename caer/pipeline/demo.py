"""``caer demo``: the whole pipeline on a synthetic dataset, offline, in a minute or two on a laptop."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..config import DemoConfig, ExtractConfig, SynthConfig, from_flat, load_config
from ..data.synth import synthesise
from ..model.encoder import save_random_weights
from .compare import compare_runs, rich_tables
from .extract import extract
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
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: folder exists and is not empty; choose a new one")
    start = time.perf_counter()
    data = out / "data"
    console.rule("1/4 caer synth")
    counts = synthesise(SynthConfig(str(data), clips=cfg.clips, frames=cfg.frames))
    console.print(f"{sum(counts.values())} clips in {data}: {counts}")
    pretrained = cfg.pretrained
    if pretrained is None:
        if cfg.model != "caer-tiny":
            raise ValueError("--pretrained is needed with --model (e.g. --pretrained openai, or a local checkpoint file)")
        pretrained = str(save_random_weights(cfg.model, out / "tiny-clip.pt"))
        console.print(f"random tiny CLIP weights: {pretrained}")

    console.rule("2/4 caer extract")
    annotations = [str(data / f"{s}.txt") for s in ("train", "val", "test")]
    shared = {"model": cfg.model, "pretrained": pretrained, "device": cfg.device, "face_boxes": str(data / "face_boxes.json")}
    cache = out / "cache.zarr"
    summary = extract(from_flat(ExtractConfig, shared | {"annotations": annotations, "out": str(cache), "views": 2,
                                                         "workers": 0}), console=console)
    console.print(summary.table())

    console.rule("3/4 caer train --staged-training")
    base = shared | {"cache": str(cache), "train_list": annotations[0], "val_list": annotations[1],
                     "test_list": annotations[2], "staged_training": True, "epochs": cfg.epochs}
    results = run(load_config("tiny", base | {"run_dir": str(out / "run")}), console)

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
    table.add_row("training curves", str(out / "run" / "curves.png"))
    console.print(table)
    if cfg.ablations:
        run_ablations(out / "ablations", base | {"epochs_stage2": cfg.epochs or ABLATION_EPOCHS}, console)
    return report


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
            report = json.loads((run_dir / "test_report.json").read_text())
            console.print(f"{i}/{1 + len(ABLATIONS)} {name}: test WAR {report['war']:.2f} UAR {report['uar']:.2f} "
                          f"({time.perf_counter() - start:.0f} s)", highlight=False)
            run_dirs.append(run_dir)
    finally:
        library.setLevel(level)
    columns, rows = compare_runs(run_dirs)
    console.print(*rich_tables(columns, rows, title=f"caer compare {out}/*"))
    return columns, rows
