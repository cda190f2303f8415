"""All benchmarks in one run, one markdown table: the cached pipeline beside the reference-style raw one.

    python bench/run.py                      # ViT-B-32 (random weights), 224 px, T = 16, 2 streams
    python bench/run.py --device cuda --clips 100 --workers 12

Rows: extraction overhead (caer extract's steady-state encoder images/s, from its first finished batch, vs the
bare encoder on ready tensors; start-up shown apart) and a warm epoch of stages 1, 2 and 3 (cache vs raw frames;
stage 3 reads raw frames in both): each run's last epoch, raw --epochs (at least 2) and cached 5. Ratios are
measured side by side in this one run; bench/extract.py and bench/train.py print the details.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import extract as extract_bench
import train as train_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--device", default="auto")
    p.add_argument("--clips", type=int, default=25, help="synthetic clips for the training timings")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="raw epochs; the last is reported (the first includes start-up)")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the ratios compare warm epochs (the first one starts the loader workers)")
    out = Path(tempfile.mkdtemp(prefix="caer-bench-"))
    common = ["--model", args.model, "--device", args.device, "--workers", str(args.workers)]
    # 12 clips x ~12 frames x 2 streams = ~290 images: ~9 encoder batches of 32, the rate taken after the first
    extract_bench.main([*common, "--clips", "12", "--frames", "12", "--batch-size", "32", "--encoder-seconds", "5",
                        "--json", str(out / "e.json")])
    train_bench.main([*common, "--clips", str(args.clips), "--epochs", str(args.epochs), "--stages", "1", "2", "3",
                      "--json", str(out / "t.json")])
    e = json.loads((out / "e.json").read_text())
    t = json.loads((out / "t.json").read_text())
    m = t["machine"]
    by = {(r["stage"], r["source"]): r["seconds"] for r in t["results"]}  # each run's last epoch
    n = {(r["stage"], r["source"]): len(r["epoch_seconds"]) for r in t["results"]}
    print(f"\n## caer benchmarks: {t['model']} at {t['image_size']} px, T = {t['num_frames']}, 2 streams\n")
    print(f"machine: {m['cpu']}, {m['cores usable']} cores, GPU: {m['gpu']}; device {t['device']}\n")
    print("| what | cached pipeline | reference-style raw | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| extraction: encoder images/s from the first finished batch on (start-up {e['startup_seconds']:.1f} s "
          "apart), caer extract vs the bare encoder on ready tensors | "
          f"{e['extract_images_per_s']:,.1f} | {e['encoder_images_per_s']:,.1f} | {e['ratio']:.2f} (goal >= 0.85) |")
    for stage, goal in ((1, 20), (2, 100)):
        c, r, nc, nr = by[stage, "cache"], by[stage, "raw"], n[stage, "cache"], n[stage, "raw"]
        print(f"| stage {stage}: s/epoch (cached epoch {nc} of {nc}, raw {nr} of {nr}) | {c:.2f} | {r:.2f} | "
              f"{r / c:.1f}x faster (goal >= {goal}x) |")
    print(f"| stage 3: s/epoch (epoch {n[3, 'raw']} of {n[3, 'raw']}; both read raw frames) | {by[3, 'raw']:.2f} | "
          f"{by[3, 'raw']:.2f} | 1x |")


if __name__ == "__main__":
    main()
