"""A short GPU smoke check: the CUDA/AMP paths of extract and of stages 1, 2 (cache and raw) and 3 run, with their
losses and each stage's peak GPU memory (stage 3: batch 8 x 16 frames x 2 streams, --grad-checkpointing).

    python bench/gpu_check.py [--clips 48] [--model ViT-B-32] [--workers 8]   (random weights; no download)

It calls bench/extract.py's timed_extract and bench/train.py's time_epoch, one epoch a run: the epochs are cold
(loader start-up included), so their seconds are not a benchmark. Cache-vs-raw speed: bench/train.py (warm epochs);
extraction against the bare encoder: bench/extract.py. Images are encoder images (frames x 2 streams x 2 views),
images/s the steady state from the first finished encoder batch, as in bench/extract.py.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from pathlib import Path

import extract as extract_bench  # bench/extract.py (scripts run from bench/ are on sys.path)
import torch
import train as train_bench  # bench/train.py
from rich.console import Console

from caer.config import SynthConfig
from caer.data.synth import synthesise
from caer.model.encoder import load_backbone

RUNS = [(1, "cache"), (1, "raw"), (2, "cache"), (2, "raw"), (3, "raw")]


def peak_memory(device: torch.device) -> str:
    return f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="auto")
    mine = ap.parse_args(argv)
    args = train_bench.parse_args(["--model", mine.model, "--device", mine.device, "--clips", str(mine.clips),
                                   "--frames", str(mine.frames), "--workers", str(mine.workers),
                                   "--epochs", "1", "--cache-epochs", "1"])
    device = train_bench.resolve_device(args)
    print("device:", torch.cuda.get_device_name() if device.type == "cuda" else device, "torch", torch.__version__,
          "AMP", "on" if args.amp else "off")
    tmp = Path(tempfile.mkdtemp(prefix="caer-gpu-check-"))
    try:
        data, cache = tmp / "ds", tmp / "cache.zarr"
        synthesise(SynthConfig(str(data), clips=args.clips, frames=args.frames, width=args.width, height=args.height))
        quiet = Console(file=io.StringIO())
        clip_model = load_backbone(args.model, args.pretrained, device)
        r = extract_bench.timed_extract(train_bench.cache_config(args, data, cache), clip_model, quiet)
        print(f"extract (train + val, batch 64): {r['summary'].frames} frames x 2 streams x 2 views; "
              f"{extract_bench.rate_line(r)}", flush=True)
        del clip_model
        losses = {}
        for stage, source in RUNS:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            where = tmp / "no-cache.zarr" if stage == 3 else cache
            t = train_bench.time_epoch(args, tmp, data, where, stage, source, quiet, args.decode[0],
                                       **({"grad_checkpointing": True} if stage == 3 else {}))
            losses[stage, source] = t["loss"]
            print(f"stage {stage} {source:5s}: 1 epoch (cold) {t['seconds']:.2f} s{peak_memory(device)}, loss {t['loss']:.4f}",
                  flush=True)
        for stage in (1, 2):
            print(f"stage {stage} loss, cache vs raw: {losses[stage, 'cache']:.4f} vs {losses[stage, 'raw']:.4f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
