"""Benchmark: does `caer extract` keep the image encoder busy?

Measures, with the same model, device, batch size and autocast:
  (a) the bare encoder's images/s on ready, already-normalised tensors on the device, and
  (b) `caer extract`'s images/s end to end (decode, crop, letterbox, resize in DataLoader workers, or with
      --decode tensor on a GPU: workers read bytes, a thread decodes and cuts on the GPU ahead of the encoder; normalise +
      encode on the device; write float16 features) on a synthetic RAER dataset, once per --decode path,
and prints both and their ratios. The goal is a ratio of at least 0.85: decoding, cropping and
writing should hide behind the encoder. Model loading and warm-up are outside both timings.

(b) is a steady-state rate: the encoder images of the 2nd to the last encoder batch over the time from the first
batch's end to the last one's (CUDA events on a GPU). The start-up before the first batch (workers and writers
spawning, the store opening, the first clips decoding) and the tail after the last (writers closing, the store's
summary) are printed apart, with the end-to-end rate. The loader prefetches 4 clips a worker during the start-up,
so the run should hold many more batches than that (--clips, --frames, --repeat, a smaller --batch-size).

Not a test: run it by hand, e.g.

    .venv/bin/python bench/extract.py                                   # ViT-B-32, random weights
    .venv/bin/python bench/extract.py --model caer-tiny --clips 20      # a quick smoke run
    .venv/bin/python bench/extract.py --device cuda --workers 12 --repeat 40
    .venv/bin/python bench/extract.py --device cuda --workers 4 --width 1280 --height 720 --decode pil tensor
    .venv/bin/python bench/extract.py --device cuda --decode tensor --writer-processes 0   # the writer thread instead
    .venv/bin/python bench/extract.py --device cuda --decode tensor --frames-per-decode 16 128 512   # nvJPEG call sizes

Images are counted as the encoder sees them: frames x 2 streams (face, context) x --views; bench/gpu_check.py counts
and times them the same way (timed_extract).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine  # bench/machine.py (scripts run from bench/ are on sys.path)

from caer import runtime
from caer.cache import FeatureCache, store_key
from caer.config import ExtractConfig, SynthConfig, from_flat
from caer.data.synth import synthesise
from caer.model.encoder import CLIPBackbone, load_backbone
from caer.pipeline import extract as extract_module
from caer.pipeline.extract import extract


def make_dataset(root: Path, args) -> tuple[list[Path], Path]:
    """A synthetic RAER dataset; --repeat lists every clip R times (as symlinked clip dirs) to make it longer cheaply."""
    synthesise(SynthConfig(str(root / "base"), clips=args.clips, frames=args.frames, width=args.width,
                           height=args.height, seed=args.seed))
    base_boxes = json.loads((root / "base" / "face_boxes.json").read_text())
    lines, boxes = [], {}
    for r in range(args.repeat):
        for split in ("train", "val", "test"):
            for line in (root / "base" / f"{split}.txt").read_text().split("\n"):
                if not line.strip():
                    continue
                clip_dir, n, label = line.split()
                new = f"copy{r}/{clip_dir}"
                (root / new).parent.mkdir(parents=True, exist_ok=True)
                (root / new).symlink_to((root / "base" / clip_dir).resolve(), target_is_directory=True)
                boxes[new] = base_boxes[clip_dir]
                lines.append(f"{new} {n} {label}")
    (root / "all.txt").write_text("\n".join(lines) + "\n")
    (root / "warmup.txt").write_text("\n".join(lines[:4]) + "\n")
    (root / "face_boxes.json").write_text(json.dumps(boxes))
    return [root / "all.txt"], root / "face_boxes.json"


@contextlib.contextmanager
def writers_skip_this_script():
    """Spawned store-writing processes re-run the main script, here torch and open_clip: seconds of start-up inside
    each timed extraction, where `caer extract` re-runs only its light CLI module. They need nothing from it, and
    without ``__file__`` spawn runs nothing."""
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


def time_encoder(clip_model: CLIPBackbone, batch_size: int, use_amp: bool, seconds: float) -> tuple[float, int]:
    """Images/s of ``encode_image`` alone on a ready, normalised batch already on the device."""
    device = clip_model.device
    size = clip_model.preprocess.image_size
    pixels = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    x = clip_model.preprocess.normalize(pixels)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), runtime.autocast(device, use_amp, dtype=torch.float16):  # as extract.encode_pixels
        for _ in range(3 if device.type == "cuda" else 1):  # warm-up
            clip_model.model.encode_image(x)
        sync()
        start, n = time.perf_counter(), 0
        while True:
            clip_model.model.encode_image(x)
            n += 1
            if n % 5 == 0 or device.type != "cuda":
                sync()
                if time.perf_counter() - start >= seconds:
                    break
        sync()
        elapsed = time.perf_counter() - start
    return n * batch_size / elapsed, n


class BatchClock:
    """Patches extract's device steps for one run: the end of every encoder batch and its encoder images
    (frames x 2 streams x views), and the time the main thread spends in them. On CUDA the ends are CUDA events,
    as the encoder runs asynchronously; on the CPU, the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.images: list[int] = []
        self.ends: list = []
        self.spent = {"encode": 0.0, "decode": 0.0}

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def between(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def timed(self, fn, key: str):
        def run(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.spent[key] += time.perf_counter() - start
        return run

    def __enter__(self):
        self.patched = extract_module.encode_pixels, extract_module.decode_on_device
        encode = self.timed(self.patched[0], "encode")

        def encode_and_mark(backbone, pixels, views, use_amp):
            feats = encode(backbone, pixels, views, use_amp)
            self.images.append(len(pixels) * views)  # pixels: the face and context images of the batch's frames
            self.ends.append(self.mark())
            return feats

        extract_module.encode_pixels = encode_and_mark
        extract_module.decode_on_device = self.timed(self.patched[1], "decode")
        self.start = self.mark()
        return self

    def __exit__(self, *exc):
        self.end = self.mark()
        if self.cuda:
            torch.cuda.synchronize()
        extract_module.encode_pixels, extract_module.decode_on_device = self.patched

    def result(self) -> dict:
        """Seconds and encoder images: start-up (to the first batch's end), steady (first to last end), tail."""
        wall = self.between(self.start, self.end)
        ends = self.ends or [self.end]
        startup, steady = self.between(self.start, ends[0]), self.between(ends[0], ends[-1])
        steady_images = sum(self.images[1:])
        return {"images": sum(self.images), "batches": len(self.images), "seconds": wall, "startup_seconds": startup,
                "steady_seconds": steady, "steady_images": steady_images, "tail_seconds": wall - startup - steady,
                "images_per_s": steady_images / steady if steady > 0 else float("nan"),
                "end_to_end_images_per_s": sum(self.images) / wall,
                "device_step_seconds": self.spent["encode"], "decode_seconds": self.spent["decode"]}


def timed_extract(cfg: ExtractConfig, clip_model: CLIPBackbone, console) -> dict:
    """One `caer extract` with ``clip_model``: its summary and BatchClock's timings (images/s = steady state)."""
    with writers_skip_this_script(), BatchClock(clip_model.device) as clock:
        summary = extract(cfg, clip_model, console)
    return clock.result() | {"summary": summary}


def rate_line(r: dict) -> str:
    """The steady-state rate, then start-up, tail and end to end, in words."""
    return (f"{r['images_per_s']:,.1f} images/s steady ({r['steady_images']} images after the first of {r['batches']} "
            f"encoder batches, in {r['steady_seconds']:.1f} s); start-up {r['startup_seconds']:.1f} s to the first batch, tail "
            f"{r['tail_seconds']:.1f} s; end to end {r['images']} images in {r['seconds']:.1f} s = "
            f"{r['end_to_end_images_per_s']:,.1f} images/s")


def time_extraction(args, settings, decode: str, clip_model: CLIPBackbone, enc_ips: float, annotations, tmp: Path,
                    quiet) -> dict:
    """One timed `caer extract` with one decode path (plus --diagnose's variants): its numbers, printed and returned."""
    suffix = ".h5" if args.format == "h5" else ".zarr"
    out = tmp / f"bench-{decode}-{extract_module.FRAMES_PER_DECODE}{suffix}"  # one store per decode path and call size
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    r = timed_extract(settings(annotations, out, decode), clip_model, quiet)
    if profiler:
        profiler.disable()
    summary, wall = r.pop("summary"), r["seconds"]
    resolved = FeatureCache.open(out).fingerprint["decode"]
    print(f"caer extract --decode {decode} ({resolved}): {rate_line(r)}")
    print(f"  {summary.clips_extracted} clips, {summary.frames} frames x 2 streams x {args.views} views; "
          f"{summary.frames_without_face} frames without a face box; workers {args.workers}, batch {args.batch_size}, "
          f"{args.width}x{args.height} JPEGs")
    print(f"  main thread in the device step (copy in, normalise, encode; on CUDA the launches only): "
          f"{r['device_step_seconds']:.1f} s ({100 * r['device_step_seconds'] / wall:.0f}%); the bare encoder would "
          f"need {r['images'] / enc_ips:.1f} s")
    if r["decode_seconds"]:
        print(f"  decode-ahead thread decoding and cutting on the device (overlaps the encoder): "
              f"{r['decode_seconds']:.1f} s ({100 * r['decode_seconds'] / wall:.0f}%)")
    ratio = r["images_per_s"] / enc_ips
    print(f"ratio extract / encoder, steady state: {ratio:.3f} ({'meets' if ratio >= 0.85 else 'misses'} the 0.85 goal); "
          f"end to end: {r['end_to_end_images_per_s'] / enc_ips:.3f}", flush=True)
    if profiler:
        import pstats

        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    diagnostics = diagnose(args, settings, decode, clip_model, tmp, quiet) if args.diagnose else {}
    return {"decode": resolved, "extract_images_per_s": r["images_per_s"], "ratio": ratio, "frames": summary.frames,
            "extract_seconds": wall, **{k: r[k] for k in ("images", "startup_seconds", "steady_seconds", "tail_seconds",
                                                          "end_to_end_images_per_s", "device_step_seconds",
                                                          "decode_seconds")},
            "diagnostics": diagnostics}


def diagnose(args, settings, decode: str, clip_model: CLIPBackbone, tmp: Path, quiet) -> dict:
    """Where the time goes: the same extraction with parts switched off (their features are not kept)."""
    suffix = ".h5" if args.format == "h5" else ".zarr"
    annotations = [tmp / "all.txt"]
    write, encode_pixels, processes = extract_module.write_clips, extract_module.encode_pixels, extract_module.WRITER_PROCESSES
    dim, views = clip_model.embed_dim, args.views

    def no_write(clips):  # counts each clip as done without writing it
        return [(store_key(video_id), attrs) for video_id, _, attrs in clips]

    switched = {
        "no store writes": None,
        "no store writes, no encoder (decode + pack only)": (
            lambda clip, px, *a: torch.zeros(len(px), views, dim, dtype=torch.float16)),
    }
    diagnostics = {}
    for i, (name, fake_encode) in enumerate(switched.items()):
        # the writer thread runs the no-op: a process would have to import it
        extract_module.write_clips, extract_module.WRITER_PROCESSES = no_write, {}
        if fake_encode:
            extract_module.encode_pixels = fake_encode
        try:
            out = tmp / f"diag{i}-{decode}-{extract_module.FRAMES_PER_DECODE}{suffix}"
            r = timed_extract(settings(annotations, out, decode), clip_model, quiet)
        finally:
            extract_module.write_clips, extract_module.encode_pixels = write, encode_pixels
            extract_module.WRITER_PROCESSES = processes
        diagnostics[name] = r["images_per_s"]
        print(f"  {name}: {rate_line(r)}", flush=True)
    return diagnostics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model (caer-tiny for a quick run)")
    p.add_argument("--pretrained", default="random", help="weights: 'random' (no download), a tag, or a file")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--clips", type=int, default=60, help="synthetic clips (before --repeat)")
    p.add_argument("--frames", type=int, default=24, help="mean frames per clip")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--repeat", type=int, default=1, help="list every clip this many times (symlinks): a longer run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="zarr", choices=["zarr", "h5"])
    p.add_argument("--encoder-seconds", type=float, default=10.0, help="how long to time the bare encoder")
    p.add_argument("--no-amp", action="store_true", help="no autocast on CUDA")
    p.add_argument("--profile", action="store_true", help="cProfile the main process during extraction")
    p.add_argument("--writer-processes", type=int,
                   help="store-writing processes (0: one writer thread); default: extract's own choice for the device")
    p.add_argument("--diagnose", action="store_true",
                   help="also time extraction with store writes disabled, and with writes and encoder disabled")
    p.add_argument("--decode", nargs="+", default=["pil"], choices=["pil", "tensor", "auto"],
                   help="decode-and-crop path(s) to time, one extraction each (e.g. --decode pil tensor)")
    p.add_argument("--frames-per-decode", nargs="+", type=int, default=[extract_module.FRAMES_PER_DECODE],
                   help="with --decode tensor on a GPU: frames of consecutive clips per decode call, one extraction each")
    p.add_argument("--keep", action="store_true", help="keep the temporary dataset and cache")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    use_amp = not args.no_amp

    device = runtime.resolve_device(args.device)
    print("machine:", json.dumps(machine()))
    tmp = Path(tempfile.mkdtemp(prefix="caer-bench-"))
    writer_processes, frames_per_decode = extract_module.WRITER_PROCESSES, extract_module.FRAMES_PER_DECODE
    try:
        t = time.perf_counter()
        annotations, face_boxes = make_dataset(tmp, args)
        print(f"dataset: {tmp} ({time.perf_counter() - t:.1f} s to make)", flush=True)
        clip_model = load_backbone(args.model, args.pretrained, device)
        size = clip_model.preprocess.image_size

        enc_ips, iters = time_encoder(clip_model, args.batch_size, use_amp, args.encoder_seconds)
        print(f"encoder only: {enc_ips:,.1f} images/s ({iters} batches of {args.batch_size}, {size} px)", flush=True)

        def settings(ann: list[Path], out: Path, decode: str) -> ExtractConfig:
            # the loaded encoder is passed to extract(), so model/pretrained/device only describe it here
            return from_flat(ExtractConfig, {
                "annotations": [str(a) for a in ann], "out": str(out), "face_boxes": str(face_boxes), "root": str(tmp),
                "views": args.views, "format": args.format, "batch_size": args.batch_size, "workers": args.workers,
                "use_amp": use_amp, "num_classes": 5, "model": args.model, "pretrained": args.pretrained,
                "device": str(device), "decode": decode,
            }, where="bench/extract.py")

        from rich.console import Console

        quiet = Console(file=open(os.devnull, "w"))
        if args.writer_processes is not None:
            extract_module.WRITER_PROCESSES = {device.type: args.writer_processes}
        suffix = ".h5" if args.format == "h5" else ".zarr"

        results = {}
        with writers_skip_this_script():
            for decode in args.decode:
                extract(settings([tmp / "warmup.txt"], tmp / f"warmup-{decode}{suffix}", decode), clip_model, quiet)
                sizes = args.frames_per_decode if decode != "pil" and device.type == "cuda" else [frames_per_decode]
                for n in sizes:
                    extract_module.FRAMES_PER_DECODE = n
                    if len(sizes) > 1:
                        print(f"--frames-per-decode {n}:")
                    result = time_extraction(args, settings, decode, clip_model, enc_ips, annotations, tmp, quiet)
                    name = result["decode"] + (f", {n} frames a decode call" if len(sizes) > 1 else "")
                    results[name if len(sizes) > 1 else decode] = result | {"name": name, "frames_per_decode": n}
        print("\n| decode | caer extract images/s, steady | bare encoder images/s | ratio | start-up s | end to end "
              "images/s |\n|---|---:|---:|---:|---:|---:|")
        for r in results.values():
            print(f"| {r['name']} | {r['extract_images_per_s']:,.1f} | {enc_ips:,.1f} | {r['ratio']:.3f} | "
                  f"{r['startup_seconds']:.1f} | {r['end_to_end_images_per_s']:,.1f} |")
        if args.json:
            first = next(iter(results.values()))
            args.json.write_text(json.dumps({
                "machine": machine(), "device": str(device), "model": args.model, "batch_size": args.batch_size,
                "workers": args.workers, "views": args.views, "frame_size": [args.width, args.height],
                "encoder_images_per_s": enc_ips,
                "writer_processes": extract_module.WRITER_PROCESSES.get(device.type, 0),
                **{k: first[k] for k in ("extract_images_per_s", "ratio", "frames", "images", "extract_seconds",
                                         "startup_seconds", "end_to_end_images_per_s", "device_step_seconds",
                                         "diagnostics")},
                "by_decode": results,
            }, indent=1))
    finally:
        # undo the patches (run.py calls main() in-process)
        extract_module.WRITER_PROCESSES, extract_module.FRAMES_PER_DECODE = writer_processes, frames_per_decode
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
