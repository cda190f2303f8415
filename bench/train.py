"""Benchmark: a warm training epoch of stage 1 and of stage 2 from the feature cache versus from raw frames.

On one synthetic RAER dataset (`caer synth`, --width x --height JPEGs) this extracts a feature cache (2 views),
then runs `caer.pipeline.train.train_stage` for --epochs raw epochs (default 2) and --cache-epochs cached ones
(default 5) of each of

  stage 1 (prompt context vectors)            --source cache   and   --source raw
  stage 2 (adapter, temporal encoders, fusion) --source cache   and   --source raw

with configs/raer.yaml's settings (ViT-B-32 at 224 px, T = 16, both streams, batch 8, SGD) but random weights
by default and --iec-base soft (stage 1 trains the prompts through the classification loss), the same data,
workers and seed for both sources, and prints a markdown table of seconds per epoch and the ratio raw / cache.
Goals (issue 3): stage 2 at least 100x faster from the cache, stage 1 at least 20x.

What is timed: the "seconds" of the epoch's line in metrics.jsonl, i.e. the training pass over the train split
plus the validation pass over the val split (the table also splits the two). Building the model, loading
weights and computing t_desc happen before the epoch and are not timed; neither is the one-off extraction
(reported separately, with the number of raw epochs it pays for). The first epoch of a run also starts the
data-loader workers (they persist after it), so the table reports each run's last epoch, warm on both sides, and
judges the goals on their ratio; the ratio of the two first (cold) epochs is shown apart. With --epochs 1 the raw
figure is a cold epoch and the goals are not judged.

Not a test: run it by hand, e.g.

    .venv/bin/python bench/train.py                                  # ViT-B-32, random weights
    .venv/bin/python bench/train.py --clips 25 --workers 2           # small, for a CPU-only machine
    .venv/bin/python bench/train.py --device cuda --clips 100 --workers 12
    .venv/bin/python bench/train.py --model caer-tiny --pretrained tiny.pt --num-frames 8   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from machine import machine  # bench/machine.py (scripts run from bench/ are on sys.path)
from rich.console import Console

from caer import runtime
from caer.config import ExtractConfig, SynthConfig, from_flat, load_config
from caer.data.synth import synthesise
from caer.model.encoder import load_backbone
from caer.pipeline import train as train_module
from caer.pipeline.curves import read_metrics
from caer.pipeline.extract import extract
from caer.pipeline.run_dir import RunDir

GOALS = {1: 20.0, 2: 100.0}
TRAINS = {1: "prompt context vectors", 2: "adapter, temporal encoders, fusion", 3: "everything, image encoder included"}


class ValidationTimer:
    """Wraps ``caer.pipeline.train.loader_logits`` (the validation pass, once per epoch) to split each epoch into
    training and validation."""

    def __init__(self):
        self.seconds: list[float] = []
        self.predict = train_module.loader_logits

    def __enter__(self):
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return self.predict(*a, **kw)
            finally:
                self.seconds.append(time.perf_counter() - start)

        train_module.loader_logits = timed
        return self

    def __exit__(self, *exc):
        train_module.loader_logits = self.predict


def time_epoch(args, tmp: Path, data: Path, cache: Path, stage: int, source: str, console: Console,
               decode: str = "auto", **overrides) -> dict:
    """Runs one stage from one source (``overrides``: more config keys); the seconds of its epochs, its last loss."""
    run_dir = tmp / f"run-stage{stage}-{source}-{decode}"
    # a cached epoch is cheap, and its first epochs still carry start-up costs: run a few more of them
    epochs = max(args.epochs, args.cache_epochs) if source == "cache" else args.epochs
    cfg = load_config("raer", dict(
        model=args.model, pretrained=args.pretrained, num_frames=args.num_frames, streams="both",
        # soft: the classification loss reaches the prompts, so stage 1 trains them from its first epoch (with
        # raer.yaml's desc they get gradients only from the MI/DC losses, which are off during their warm-up)
        iec_base="soft",
        train_list=str(data / "train.txt"), val_list=str(data / "val.txt"), test_list=str(data / "test.txt"),
        face_boxes=str(data / "face_boxes.json"),
        cache=str(cache), source=source, stage=stage, epochs=epochs, epochs_stage1=epochs,
        epochs_stage2=epochs, epochs_stage3=epochs, batch_size=args.batch_size, workers=args.workers, device=args.device,
        use_amp=args.amp, seed=args.seed, run_dir=str(run_dir), cache_in_memory=args.cache_in_memory, decode=decode,
        **overrides,
    ))
    with ValidationTimer() as val:
        start = time.perf_counter()
        train_module.train_stage(cfg, stage, console)
        wall = time.perf_counter() - start
    records = read_metrics(RunDir(run_dir).metrics)
    assert len(records) == len(val.seconds) == epochs, (len(records), len(val.seconds))
    seconds = [r["seconds"] for r in records]
    return {"stage": stage, "source": source, "decode": decode, "seconds": seconds[-1], "valid_seconds": val.seconds[-1],
            "train_seconds": seconds[-1] - val.seconds[-1], "first_epoch_seconds": seconds[0],
            "epoch_seconds": seconds, "valid_epoch_seconds": val.seconds, "wall_with_setup": wall,
            "loss": records[-1]["losses"]["loss"]}


def fmt(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model (caer-tiny for a quick run)")
    p.add_argument("--pretrained", default="random", help="weights: 'random' (no download), an open_clip tag, or a file")
    p.add_argument("--clips", type=int, default=60, help="synthetic clips in all splits (3/5 train, 1/5 val, 1/5 test)")
    p.add_argument("--frames", type=int, default=16, help="mean frames per clip (lengths vary from half to 1.5x)")
    p.add_argument("--num-frames", type=int, default=16, help="T: frames (TSN segments) per clip the model sees")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8, help="clips per batch (configs/raer.yaml: 8)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loader workers (training and extraction)")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs of the raw runs; the table shows the last (warm from 2 on: the goals need it) and the first apart")
    p.add_argument("--cache-epochs", type=int, default=5, help="epochs of the cached runs (cheap; start-up fades)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2, 3],
                   help="stage 3 reads raw frames in both pipelines, so it is timed once (raw)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no autocast on CUDA (on the CPU it is off anyway)")
    p.add_argument("--cache-in-memory", action="store_true", help="--source cache reads from RAM")
    p.add_argument("--threads", type=int, help="torch intra-op threads [default: torch's]")
    p.add_argument("--decode", nargs="+", default=["auto"], choices=["auto", "pil", "tensor"],
                   help="decode paths: the first for the cache and stages 1-2; stage 3 runs once per path (on a GPU, "
                        "tensor decodes in the loader's thread on the device, pil in the workers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show the training output")
    p.add_argument("--keep", action="store_true", help="keep the temporary dataset, cache and runs")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def resolve_device(args) -> torch.device:
    """Sets --threads, and args.device and args.amp to what they resolve to."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runtime.resolve_device(args.device)
    args.device = str(device)
    args.amp = args.amp and device.type == "cuda"
    return device


def cache_config(args, data: Path, cache: Path) -> ExtractConfig:
    """`caer extract` of the train and val splits, 2 views (the flip), into ``cache``."""
    return from_flat(ExtractConfig, {
        "annotations": [str(data / "train.txt"), str(data / "val.txt")], "out": str(cache),
        "face_boxes": str(data / "face_boxes.json"), "views": 2, "batch_size": 64, "workers": args.workers,
        "use_amp": args.amp, "num_classes": 5, "model": args.model, "pretrained": args.pretrained,
        "device": args.device, "decode": args.decode[0],
    }, where="bench/train.py")


def extract_cache(args, data: Path, cache: Path, device: torch.device, console: Console) -> tuple[int, int, float]:
    """The feature cache of the train and val splits (2 views): (image size, frames, seconds)."""
    clip_model = load_backbone(args.model, args.pretrained, device)
    start = time.perf_counter()
    summary = extract(cache_config(args, data, cache), clip_model, console)
    return clip_model.preprocess.image_size, summary.frames, time.perf_counter() - start


def time_stages(args, tmp: Path, data: Path, cache: Path, console: Console) -> dict:
    """The epoch timings by (stage, source), and for stage 3 by (3, decode path)."""
    results = {}
    for stage in args.stages:
        # stage 3 reads raw frames whatever the source; it runs once per --decode path, without the cache
        runs = [("raw", d) for d in args.decode] if stage == 3 else [("cache", args.decode[0]), ("raw", args.decode[0])]
        for source, decode in runs:
            print(f"timing stage {stage} --source {source} --decode {decode} ...", flush=True)
            where = tmp / "no-cache.zarr" if stage == 3 else cache
            results[stage, source if stage != 3 else decode] = r = time_epoch(args, tmp, data, where, stage, source,
                                                                             console, decode)
            n = len(r["epoch_seconds"])
            print(f"  epoch {n} of {n}: {fmt(r['seconds'])} s (train {fmt(r['train_seconds'])} s + valid "
                  f"{fmt(r['valid_seconds'])} s); all epochs: {', '.join(map(fmt, r['epoch_seconds']))}", flush=True)
    return results


def print_tables(args, results: dict, extract_seconds: float) -> None:
    """Seconds per epoch and the raw / cache ratios against the goals, then the training and validation passes."""
    raw_n, cache_n = args.epochs, max(args.epochs, args.cache_epochs)
    warm = raw_n >= 2  # the cached runs have at least as many epochs
    print(f"| stage | trains | cache s/epoch (epoch {cache_n} of {cache_n}) | raw s/epoch (epoch {raw_n} of {raw_n}) | "
          "raw / cache | raw / cache, epoch 1 of each (cold) | goal, on the warm ratio |")
    print("|---|---|---:|---:|---:|---:|---|")
    for stage in args.stages:
        if stage == 3:
            for decode in args.decode:
                r = results[3, decode]
                print(f"| 3 (--decode {decode}) | {TRAINS[3]} | - | {fmt(r['seconds'])} | 1x: both pipelines read "
                      "raw frames | | - |")
            continue
        c, r = results[stage, "cache"], results[stage, "raw"]
        ratio = r["seconds"] / c["seconds"]
        verdict = ("met" if ratio >= GOALS[stage] else "missed") if warm else "not judged: raw epoch 1 is cold"
        print(f"| {stage} | {TRAINS[stage]} | {fmt(c['seconds'])} | {fmt(r['seconds'])} | {ratio:,.1f}x | "
              f"{r['first_epoch_seconds'] / c['first_epoch_seconds']:,.1f}x | >= {GOALS[stage]:.0f}x ({verdict}) |")
    print()
    print("| stage | source | train pass s, last epoch | valid pass s, last epoch | raw / cache, train pass | "
          "raw / cache, valid pass |")
    print("|---|---|---:|---:|---:|---:|")
    cached_stages = [s for s in args.stages if s != 3]
    for stage in cached_stages:
        c, r = results[stage, "cache"], results[stage, "raw"]
        for source, x in (("cache", c), ("raw", r)):
            ratios = ("", "") if source == "cache" else (
                f"{r['train_seconds'] / c['train_seconds']:,.1f}x", f"{r['valid_seconds'] / c['valid_seconds']:,.1f}x")
            print(f"| {stage} | {source} | {fmt(x['train_seconds'])} | {fmt(x['valid_seconds'])} | {ratios[0]} | {ratios[1]} |")
    print()
    saved = [results[s, "raw"]["seconds"] - results[s, "cache"]["seconds"] for s in cached_stages]
    if saved:
        stage = cached_stages[saved.index(max(saved))]
        print(f"The extraction ({extract_seconds:.1f} s, train + val) costs about {extract_seconds / max(saved):.1f} "
              f"{'warm ' if warm else ''}raw epochs of stage {stage}.")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args)
    console = Console() if args.verbose else Console(file=open(os.devnull, "w"))
    info = machine()

    tmp = Path(tempfile.mkdtemp(prefix="caer-bench-train-"))
    try:
        data, cache = tmp / "ds", tmp / "cache.zarr"
        counts = synthesise(SynthConfig(str(data), clips=args.clips, frames=args.frames, width=args.width,
                                        height=args.height, seed=args.seed))
        frames = {s: sum(int(line.split()[1]) for line in (data / f"{s}.txt").read_text().splitlines() if line.strip())
                  for s in ("train", "val")}
        print(f"dataset: {counts['train']} train clips ({frames['train']} frames), {counts['val']} val clips "
              f"({frames['val']} frames), {args.width}x{args.height} JPEGs, in {tmp}", flush=True)
        size, extracted, extract_seconds = extract_cache(args, data, cache, device, console)
        print(f"extraction (once): {extract_seconds:.1f} s for {extracted} frames x 2 streams x 2 views", flush=True)
        results = time_stages(args, tmp, data, cache, console)

        print()
        print(f"## Seconds per epoch, --source cache vs --source raw ({args.model}, {size} px, T = {args.num_frames}, 2 streams)")
        print()
        print(f"- machine: {info['cpu']}, {info['cores usable']} of {info['cores']} cores, {info['torch threads']} torch "
              f"threads, GPU: {info['gpu']}; device {device}, AMP {'on' if args.amp else 'off'}")
        print(f"- data: `caer synth` {args.width}x{args.height}, {counts['train']} train clips ({frames['train']} frames), "
              f"{counts['val']} val clips ({frames['val']} frames); batch {args.batch_size}, workers {args.workers}, "
              f"weights {args.pretrained}")
        cache_n = max(args.epochs, args.cache_epochs)
        which = (f"each run's last epoch: raw {args.epochs} of {args.epochs}, cached {cache_n} of {cache_n}, both warm"
                 if args.epochs > 1 else f"raw: its only epoch, cold (workers' start-up included); cached {cache_n} of "
                 f"{cache_n}")
        print(f"- seconds per epoch = the `seconds` of metrics.jsonl ({which}): training pass + validation pass "
              "(split below); model building and t_desc are not timed")
        print()
        print_tables(args, results, extract_seconds)
        if args.json:
            args.json.write_text(json.dumps({
                "machine": info, "device": str(device), "amp": args.amp, "model": args.model, "image_size": size,
                "num_frames": args.num_frames, "batch_size": args.batch_size, "workers": args.workers,
                "clips": counts, "frames": frames, "frame_size": [args.width, args.height],
                "extract_seconds": extract_seconds, "results": [results[k] for k in sorted(results)],
            }, indent=1))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
