"""One short GPU check: CUDA/AMP paths of extract and of stages 1, 2 (cache and raw) and 3, with timings.

python bench/gpu_check.py [--clips 48] [--model ViT-B-32]   (random weights; no download)
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from caer.config import ExtractConfig, SynthConfig, from_flat, load_config
from caer.data.synth import synthesise
from caer.model.encoder import load_backbone
from caer.pipeline.extract import extract
from caer.pipeline.train import train_stage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("device:", torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch", torch.__version__)
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "data"
    synthesise(SynthConfig(str(data), clips=args.clips, frames=args.frames, width=320, height=240))
    lists = [data / f"{s}.txt" for s in ("train", "val", "test")]
    quiet = Console(file=io.StringIO())
    clip = load_backbone(args.model, "random", device)
    t = time.perf_counter()
    s = extract(from_flat(ExtractConfig, {
        "annotations": [str(p) for p in lists], "out": str(tmp / "c.zarr"), "face_boxes": str(data / "face_boxes.json"),
        "views": 2, "workers": args.workers, "batch_size": 256, "use_amp": True, "model": args.model,
        "pretrained": "random", "device": device,
    }, where="bench/gpu_check.py"), clip, quiet)
    print(f"extract: {s.frames} frames, {2 * s.frames / s.seconds:.0f} images/s (2 streams, views 2 -> x2 encoder work), "
          f"{time.perf_counter() - t:.1f}s")
    del clip
    rows = []
    base = dict(model=args.model, pretrained="random", device=device, use_amp=True, num_frames=16, batch_size=8,
                workers=args.workers, cache=str(tmp / "c.zarr"), face_boxes=str(data / "face_boxes.json"),
                train_list=str(lists[0]), val_list=str(lists[1]), epochs=1, temperature=0.2)
    for i, (stage, source) in enumerate([(2, "cache"), (2, "cache"), (2, "raw"), (1, "cache"), (1, "raw"), (3, "raw")]):
        run_dir = tmp / f"run{i}{stage}{source}"  # the first run is a warm-up (CUDA init, workers)
        cfg = load_config("tiny", dict(base, source=source, run_dir=str(run_dir), grad_checkpointing=stage == 3))
        torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
        init = None
        if stage == 3:
            init = tmp / "run12cache" / "stage2-best.pt"
        train_stage(cfg, stage, quiet, init_from=init)
        rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0
        rows.append((stage, source, rec["seconds"], peak, rec["losses"]["loss"]))
        print(f"stage {stage} {source:5s}: epoch+valid {rec['seconds']:.2f}s  peak GPU mem {peak:.1f} GiB  "
              f"loss {rec['losses']['loss']:.4f}", flush=True)
    by = {(r[0], r[1]): r[2] for r in rows}
    print("| stage | cache s | raw s | raw/cache |\n|---|---|---|---|")
    for st in (1, 2):
        print(f"| {st} | {by[(st, 'cache')]:.2f} | {by[(st, 'raw')]:.2f} | {by[(st, 'raw')] / by[(st, 'cache')]:.1f}x |")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
