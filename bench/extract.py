"""Benchmark: does `caer extract` keep the image encoder busy?

Measures, with the same model, device, batch size and autocast:
  (a) the bare encoder's images/s on ready, already-normalised tensors on the device, and
  (b) `caer extract`'s images/s end to end (decode, crop, letterbox, resize in DataLoader workers, or with
      --decode tensor on a GPU: workers read bytes, a thread decodes and cuts on the GPU ahead of the encoder; normalise +
      encode on the device; write float16 features) on a synthetic RAER dataset, once per --decode path,
and prints both and their ratios. The goal is a ratio of at least 0.85: decoding, cropping and
writing should hide behind the encoder. Model loading and warm-up are outside both timings.

Not a test: run it by hand, e.g.

    .venv/bin/python bench/extract.py                                   # ViT-B-32, random weights
    .venv/bin/python bench/extract.py --model caer-tiny --clips 20      # a quick smoke run
    .venv/bin/python bench/extract.py --device cuda --workers 12 --repeat 40
    .venv/bin/python bench/extract.py --device cuda --workers 4 --width 1280 --height 720 --decode pil tensor
    .venv/bin/python bench/extract.py --device cuda --decode tensor --writer-processes 0   # the writer thread instead
    .venv/bin/python bench/extract.py --device cuda --decode tensor --frames-per-decode 16 128 512   # nvJPEG call sizes

Images are counted as the encoder sees them: 2 per frame (face, context) times --views.
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


def time_extraction(args, settings, decode: str, clip_model: CLIPBackbone, enc_ips: float, annotations, tmp: Path,
                    quiet) -> dict:
    """One timed `caer extract` with one decode path (plus --diagnose's variants): its numbers, printed and returned."""
    suffix = ".h5" if args.format == "h5" else ".zarr"
    out = tmp / f"bench-{decode}-{extract_module.FRAMES_PER_DECODE}{suffix}"  # one store per decode path and call size
    # time spent in the device step (H2D copy, normalise, encode: on CUDA only the launches, since the features come
    # back asynchronously), and, with --decode tensor on a GPU, in the decode-ahead thread's decoding and cutting
    spent = {"encode": 0.0, "decode": 0.0}
    encode_pixels, decode_on_device = extract_module.encode_pixels, extract_module.decode_on_device

    def timed(fn, key):
        def run(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - start
        return run

    extract_module.encode_pixels = timed(encode_pixels, "encode")
    extract_module.decode_on_device = timed(decode_on_device, "decode")
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    try:
        summary = extract(settings(annotations, out, decode), clip_model, quiet)
    finally:
        extract_module.encode_pixels, extract_module.decode_on_device = encode_pixels, decode_on_device
    wall = time.perf_counter() - start
    if profiler:
        profiler.disable()
    resolved = FeatureCache.open(out).fingerprint["decode"]

    images = summary.frames * 2 * args.views
    ext_ips = images / wall
    print(f"caer extract --decode {decode} ({resolved}): {ext_ips:,.1f} images/s ({summary.clips_extracted} clips, "
          f"{summary.frames} frames, {images} images in {wall:.1f} s; {summary.frames_without_face} frames without a "
          f"face box; workers {args.workers}, batch {args.batch_size}, views {args.views}, {args.width}x{args.height} "
          "JPEGs)")
    print(f"  main thread in the device step (copy in, normalise, encode; on CUDA the launches only): {spent['encode']:.1f} s "
          f"({100 * spent['encode'] / wall:.0f}%); the bare encoder would need {images / enc_ips:.1f} s")
    if spent["decode"]:
        print(f"  decode-ahead thread decoding and cutting on the device (overlaps the encoder): {spent['decode']:.1f} s "
              f"({100 * spent['decode'] / wall:.0f}%)")
    ratio = ext_ips / enc_ips
    print(f"ratio extract / encoder: {ratio:.3f} ({'meets' if ratio >= 0.85 else 'misses'} the 0.85 goal)", flush=True)
    if profiler:
        import pstats

        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    diagnostics = diagnose(args, settings, decode, clip_model, images, tmp, quiet) if args.diagnose else {}
    return {"decode": resolved, "extract_images_per_s": ext_ips, "ratio": ratio, "frames": summary.frames,
            "extract_seconds": wall, "device_step_seconds": spent["encode"], "decode_seconds": spent["decode"],
            "diagnostics": diagnostics}


def diagnose(args, settings, decode: str, clip_model: CLIPBackbone, images: int, tmp: Path, quiet) -> dict:
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
            start = time.perf_counter()
            out = tmp / f"diag{i}-{decode}-{extract_module.FRAMES_PER_DECODE}{suffix}"
            extract(settings(annotations, out, decode), clip_model, quiet)
            seconds = time.perf_counter() - start
        finally:
            extract_module.write_clips, extract_module.encode_pixels = write, encode_pixels
            extract_module.WRITER_PROCESSES = processes
        diagnostics[name] = images / seconds
        print(f"  {name}: {images / seconds:,.1f} images/s ({seconds:.1f} s)", flush=True)
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
        print("\n| decode | caer extract images/s | bare encoder images/s | ratio |\n|---|---:|---:|---:|")
        for r in results.values():
            print(f"| {r['name']} | {r['extract_images_per_s']:,.1f} | {enc_ips:,.1f} | {r['ratio']:.3f} |")
        if args.json:
            first = next(iter(results.values()))
            args.json.write_text(json.dumps({
                "machine": machine(), "device": str(device), "model": args.model, "batch_size": args.batch_size,
                "workers": args.workers, "views": args.views, "frame_size": [args.width, args.height],
                "encoder_images_per_s": enc_ips,
                "writer_processes": extract_module.WRITER_PROCESSES.get(device.type, 0),
                **{k: first[k] for k in ("extract_images_per_s", "ratio", "frames", "extract_seconds",
                                         "device_step_seconds", "diagnostics")},
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
