"""Benchmark (CUDA only): where `--decode tensor`'s time goes on 720p JPEGs, part by part.

Times, per frame, on 32 JPEGs made from scikit-learn's sample photographs (quality 90) and 32 `caer synth` frames
(noisier, larger files): torchvision's nvJPEG decode in one batched call, one call per frame, and split over 2, 4
and 8 threads, with 4x the frames per call and with pinned input; nvImageCodec's decoder, when it is installed (its
hardware JPEG decoder: a candidate); libjpeg-turbo on one CPU thread; caer's cut + resize of both views
(``render``); and caer's whole step (decode + cut) a clip a call (``TensorViews.pixels``) and 8 clips a call
(``pixels_of``, as `caer extract` and stage 3 decode on a GPU), and that again with its small index and weight
copies synchronising the stream, as they did before ``runtime.to_device``.
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
    many = datas * 4
    r["nvjpeg batched, 4x the frames per call"] = per_frame_ms(lambda: decode_jpeg(many, mode=rgb, device="cuda"), 4 * n)
    pinned = [d.pin_memory() for d in datas]
    r["nvjpeg batched, pinned input"] = per_frame_ms(lambda: decode_jpeg(pinned, mode=rgb, device="cuda"), n)
    r.update(probe_nvimgcodec(datas))
    r["cpu libjpeg-turbo (1 thread)"] = per_frame_ms(lambda: [decode_jpeg(d, mode=rgb) for d in datas], n, 2)
    frames = torch.stack(decode_jpeg(datas, mode=rgb, device="cuda"))
    specs = []
    for j in range(n):
        face = (500 + j, 200, 500 + j + 180, 380)
        specs += [view_spec(j, face, (180, 180), 224, 224), view_spec(j, (0, 0, 1280, 720), (1280, 1280), 224, 224)]
    r["cut + resize of both views (render)"] = per_frame_ms(lambda: render(frames, specs, 224), n)
    return r


def probe_nvimgcodec(datas: list[torch.Tensor]) -> dict[str, float]:
    """nvImageCodec's batched decode (its hardware JPEG decoder where the GPU has one), if it is installed
    (``pip install nvidia-nvimgcodec-cu12[nvjpeg]``): a candidate replacement for torchvision's nvJPEG call."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return {}
    raw = [d.numpy().tobytes() for d in datas]
    out = {}
    for name, backends in (("default backends", None), ("hardware only", [nvimgcodec.Backend(nvimgcodec.HW_GPU_ONLY)])):
        try:
            decoder = nvimgcodec.Decoder(backends=backends) if backends else nvimgcodec.Decoder()
            images = decoder.decode(raw)
            assert all(img is not None for img in images), "a frame was not decoded"
            torch.as_tensor(images[0], device="cuda")  # the __cuda_array_interface__ hand-over caer would use
            out[f"nvimgcodec batched, {name}"] = per_frame_ms(lambda: decoder.decode(raw), len(raw))  # noqa: B023
        except Exception as err:  # report and go on: this is a probe
            print(f"  nvimgcodec ({name}): {type(err).__name__}: {err}")
    return out


def probe_pixels(datas: list[torch.Tensor], device: str = "cuda") -> dict[str, float]:
    """ms per frame of caer's whole step on CUDA (decode + both views) for 16-frame clips: one clip a call
    (``TensorViews.pixels``), and every clip of 4x the frames in one decode call (``pixels_of``, as extraction does)."""
    from torchvision import transforms as T

    from caer.data import tensor_views
    from caer.data.raer import ViewMaker
    from caer.data.tensor_views import TensorViews
    from caer.model.encoder import Preprocess

    preprocess = Preprocess(T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)]),
                            (0.0,) * 3, (1.0,) * 3, 224)
    views = TensorViews(ViewMaker(), preprocess)
    clips = []
    for c in range(0, 4 * len(datas) - 15, 16):
        part = [datas[(c + i) % len(datas)] for i in range(16)]
        offsets = torch.tensor([0, *np.cumsum([len(d) for d in part])])
        clips.append({"data": torch.cat(part), "offsets": offsets, "files": [f"{c + i}.jpg" for i in range(16)],
                      "faces": [(500 + i, 200, 680 + i, 380) for i in range(16)], "body": None, "video_id": "v"})
    frames = 16 * len(clips)
    r = {"caer TensorViews.pixels (a 16-frame clip a call)": per_frame_ms(
             lambda: [views.pixels(clip, device) for clip in clips], frames),
         f"caer TensorViews.pixels_of ({len(clips)} clips a call)": per_frame_ms(
             lambda: views.pixels_of(clips, device), frames)}
    quick = tensor_views.to_device  # the small index and weight tensors, copied without a stream synchronisation
    tensor_views.to_device = lambda values, where: torch.as_tensor(values).to(where)  # each copy waits for the stream
    try:
        r[f"  the same, small copies synchronising ({len(clips)} clips a call)"] = per_frame_ms(
            lambda: views.pixels_of(clips, device), frames)
    finally:
        tensor_views.to_device = quick
    return r


def main() -> None:
    for name, datas in (("photos, quality 90", jpegs_from_photos(32)), ("caer synth", jpegs_from_synth(32))):
        print(f"\n{name}: {len(datas)} JPEGs 1280x720, mean {np.mean([len(d) for d in datas]) / 1024:.0f} KiB")
        parts = probe(datas) | probe_pixels(datas)
        for part, ms in parts.items():
            print(f"  {part:44s} {ms:7.3f} ms/frame  ({1000 / ms:8,.0f} frames/s)")


if __name__ == "__main__":
    main()
