"""Benchmark (CUDA only): where `--decode tensor`'s time goes on 720p JPEGs, part by part.

Times, per frame, on 32 JPEGs made from scikit-learn's sample photographs (quality 90) and 32 `caer synth` frames
(noisier, larger files): torchvision's nvJPEG decode in one batched call, one call per frame, and split over 2, 4
and 8 threads; libjpeg-turbo on one CPU thread; and caer's cut + resize of both views (``render``).
On one H200 `caer extract --decode tensor` decoded and cut about 860 720p frames/s in its one decode-ahead thread
(README, Benchmarks): this says which part to speed up.

    python bench/decode_probe.py
"""
import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.io import ImageReadMode, decode_jpeg

from caer.config import SynthConfig
from caer.data.synth import synthesise
from caer.data.tensor_views import render, view_spec


def jpegs_from_photos(n):
    out = []
    for k in range(n):
        img = Image.fromarray(load_sample_images().images[k % 2]).resize((1280 + 8 * k, 720), Image.BICUBIC).crop((0, 0, 1280, 720))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def jpegs_from_synth(n):
    with tempfile.TemporaryDirectory() as tmp:
        synthesise(SynthConfig(tmp, clips=11, frames=4, width=1280, height=720))
        files = sorted(Path(tmp).rglob("*.jpg"))[:n]
        return [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]


def per_frame_ms(fn, frames: int, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / (repeat * frames)


def probe(datas: list[torch.Tensor]) -> dict[str, float]:
    """ms per frame of each part, for these JPEGs."""
    n, rgb = len(datas), ImageReadMode.RGB
    r = {"nvjpeg batched (1 call)": per_frame_ms(lambda: decode_jpeg(datas, mode=rgb, device="cuda"), n),
         "nvjpeg one call per frame": per_frame_ms(lambda: [decode_jpeg(d, mode=rgb, device="cuda") for d in datas], n)}
    for threads in (2, 4, 8):
        with ThreadPoolExecutor(threads) as pool:
            parts = [datas[i::threads] for i in range(threads)]
            r[f"nvjpeg batched, {threads} threads"] = per_frame_ms(
                lambda: list(pool.map(lambda p: decode_jpeg(p, mode=rgb, device="cuda"), parts)), n)  # noqa: B023
    r["cpu libjpeg-turbo (1 thread)"] = per_frame_ms(lambda: [decode_jpeg(d, mode=rgb) for d in datas], n, 2)
    frames = torch.stack(decode_jpeg(datas, mode=rgb, device="cuda"))
    specs = []
    for j in range(n):
        face = (500 + j, 200, 500 + j + 180, 380)
        specs += [view_spec(j, face, (180, 180), 224, 224), view_spec(j, (0, 0, 1280, 720), (1280, 1280), 224, 224)]
    r["cut + resize of both views (render)"] = per_frame_ms(lambda: render(frames, specs, 224), n)
    return r


def main() -> None:
    for name, datas in (("photos, quality 90", jpegs_from_photos(32)), ("caer synth", jpegs_from_synth(32))):
        print(f"\n{name}: {len(datas)} JPEGs 1280x720, mean {np.mean([len(d) for d in datas]) / 1024:.0f} KiB")
        for part, ms in probe(datas).items():
            print(f"  {part:40s} {ms:7.3f} ms/frame  ({1000 / ms:8,.0f} frames/s)")


if __name__ == "__main__":
    main()
