"""Shared fixtures: one small synthetic RAER dataset, tiny random CLIP weights, and one extracted cache.

Everything here is offline: the encoder is the tiny ``caer-tiny`` config from ``configs/clip`` with
randomly initialised weights saved to a file, exactly as a user would pass a local checkpoint.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from caer.config import ExtractConfig, RunConfig, SynthConfig, from_flat, load_config
from caer.data.synth import synthesise
from caer.model.encoder import load_backbone, save_random_weights
from caer.pipeline.extract import extract

# The tiny model's tensors are far too small to gain from intra-op threads, and on a 2-core machine with
# anything else running, OpenMP spin-waiting makes a 2-thread forward pass ~100x slower than 1 thread.
torch.set_num_threads(1)

MODEL = "caer-tiny"
NUM_CLASSES = 5
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    root: Path

    @property
    def annotations(self) -> list[Path]:
        return [self.root / f"{s}.txt" for s in SPLITS]

    @property
    def face_boxes(self) -> Path:
        return self.root / "face_boxes.json"

    @property
    def body_boxes(self) -> Path:
        return self.root / "body_boxes.json"

    def lines(self) -> list[tuple[Path, int, str]]:
        """(annotation file, 1-based line number, clip dir) of every clip, in extraction order."""
        out = []
        for ann in self.annotations:
            for n, line in enumerate(ann.read_text().splitlines(), start=1):
                if line.strip():
                    out.append((ann, n, line.split()[0]))
        return out

    def video_ids(self) -> list[str]:
        return [v for _, _, v in self.lines()]

    def boxes(self) -> dict:
        return json.loads(self.face_boxes.read_text())

    def copy(self, dest: Path) -> Dataset:
        shutil.copytree(self.root, dest)
        return Dataset(dest)


def extract_args(ds: Dataset, out: Path, weights: Path, *extra: str) -> list[str]:
    """The `caer extract` arguments for ``ds`` with the tiny model (CLI form, without the program name)."""
    return [
        "extract", *map(str, ds.annotations), "--face-boxes", str(ds.face_boxes), "--out", str(out),
        "--model", MODEL, "--pretrained", str(weights), "--device", "cpu", "--num-classes", str(NUM_CLASSES),
        *extra,
    ]


def run_cli(args: list[str]):
    """Run the `caer` Typer app in-process; returns click's Result (exit_code, output, stderr)."""
    from caer.cli import app

    return CliRunner().invoke(app, args)


def squash(text: str) -> str:
    """Text without any whitespace: rich wraps long lines (paths) at the console width."""
    return re.sub(r"\s+", "", text)


def assert_in_output(fragment: str, output: str) -> None:
    assert squash(fragment) in squash(output), f"{fragment!r} not in output:\n{output}"


def quiet_console(width: int | None = None) -> Console:
    """A console whose output nobody reads."""
    return Console(file=io.StringIO(), width=width)


def tiny_run_values(ds: Dataset, cache: Path | None, weights: Path, run_dir: Path | None = None, **overrides) -> dict:
    """Flat options of a ``configs/tiny.yaml`` run on ``ds``: its train, val and test lists and face boxes, the
    feature cache ``cache``, the tiny weights, no worker processes, on the CPU; ``overrides`` win.

    load_config ignores None values: a None here (``cache``, ``run_dir``, ``test_list=None``, ...) leaves the option
    at its tiny.yaml or default value.
    """
    train_list, val_list, test_list = map(str, ds.annotations)
    values = dict(pretrained=str(weights), train_list=train_list, val_list=val_list, test_list=test_list,
                  cache=None if cache is None else str(cache), face_boxes=str(ds.face_boxes),
                  run_dir=None if run_dir is None else str(run_dir), workers=0, device="cpu")
    return values | overrides


def tiny_run_config(ds: Dataset, cache: Path | None, weights: Path, run_dir: Path | None = None, **overrides) -> RunConfig:
    """``configs/tiny.yaml`` with the options of :func:`tiny_run_values`."""
    return load_config("tiny", tiny_run_values(ds, cache, weights, run_dir, **overrides))


def one_epoch_config(ds: Dataset, cache: Path, weights: Path, run_dir: Path, **overrides) -> RunConfig:
    """A tiny run of 1 epoch a stage in batches of 1 (the session dataset's 2 training clips: 2 steps an epoch)."""
    settings = dict(epochs_stage1=1, epochs_stage2=1, epochs_stage3=1, batch_size=1) | overrides
    return tiny_run_config(ds, cache, weights, run_dir, **settings)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Dataset:
    """12 clips of 3..9 frames (128x96 JPEGs), some frames without a face box. Read-only: copy to change it."""
    root = tmp_path_factory.mktemp("synth") / "ds"
    synthesise(SynthConfig(str(root), clips=12, frames=6, classes=NUM_CLASSES, seed=0))
    return Dataset(root)


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    return save_random_weights(MODEL, tmp_path_factory.mktemp("weights") / "tiny.pt", seed=0)


@pytest.fixture(scope="session")
def clip_model(weights):
    return load_backbone(MODEL, str(weights), "cpu")


def settings_for(ds: Dataset, out: Path, **kw) -> ExtractConfig:
    """Extraction settings for ``ds`` with the tiny model; ``kw`` are flat option names (``views``, ``margin``, ...)."""
    base = dict(annotations=ds.annotations, out=out, face_boxes=ds.face_boxes, num_classes=NUM_CLASSES,
                views=2, batch_size=16, workers=0, model=MODEL, device="cpu")
    return from_flat(ExtractConfig, base | kw)


@pytest.fixture(scope="session")
def zarr_cache(tmp_path_factory, dataset, clip_model):
    """The dataset extracted once into Zarr (views 2, in-process, no workers): (path, summary)."""
    out = tmp_path_factory.mktemp("cache") / "features.zarr"
    summary = extract(settings_for(dataset, out), clip_model)
    return out, summary


@pytest.fixture(scope="session")
def h5_cache(tmp_path_factory, dataset, weights):
    """The same extraction into HDF5, through the CLI and with 2 DataLoader worker processes."""
    out = tmp_path_factory.mktemp("cache") / "features.h5"
    result = run_cli(extract_args(dataset, out, weights, "--views", "2", "--batch-size", "16", "--workers", "2"))
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------- the independent reference

class Reference:
    """open_clip used directly, as a user would: its own model, checkpoint loader and eval transform.

    Crops are made here with PIL from the SPEC's words, not with ``caer.pipeline.data``, and go through
    open_clip's full transform, not through caer's worker/device split of it.
    """

    def __init__(self, weights: Path, margin: float = 20):
        import open_clip

        from caer.model.encoder import CLIP_CONFIG_DIR

        open_clip.add_model_config(CLIP_CONFIG_DIR)
        model, _, self.transform = open_clip.create_model_and_transforms(MODEL, pretrained=None)
        open_clip.load_checkpoint(model, str(weights))
        self.model = model.eval()
        self.margin = margin

    @staticmethod
    def letterbox(img):
        from PIL import Image

        side = max(img.size)
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        return canvas

    def crops(self, frame: Path, box, body=None):
        """(face crop, context view) of a frame: box grown by the margin and clipped; whole frame letterboxed."""
        from PIL import Image

        with Image.open(frame) as f:
            img = f.convert("RGB")
        face = img
        if box is not None:
            left, top, right, bottom = box
            m = self.margin
            face = img.crop((max(0, left - m), max(0, top - m), min(img.width, right + m), min(img.height, bottom + m)))
        context = img
        if body is not None:
            left, top, right, bottom = body
            context = img.crop((max(0, left), max(0, top), min(img.width, right), min(img.height, bottom)))
        return face, self.letterbox(context)

    def encode(self, images, flip: bool = False):
        """float32 numpy [N, D] features of PIL images; ``flip`` mirrors the preprocessed tensors (view 1)."""
        import torch

        x = torch.stack([self.transform(img) for img in images])
        if flip:
            x = x.flip(-1)
        with torch.no_grad():
            return self.model.encode_image(x).numpy()


@pytest.fixture(scope="session")
def reference(weights) -> Reference:
    return Reference(weights)


def assert_fp16_equal(cached, expected, what: str = "") -> None:
    """``cached`` (float16) holds the features ``expected`` (float32) to float16 precision.

    Each value may be off by ``ulp16(max(|cached|, |expected|)) + 2**-14 * ||expected||``, the norm taken
    along the last axis (the feature dimension D), per feature vector:

    * ``ulp16(...)``, one float16 ulp at the larger of the two values: rounding to float16 moves a value
      by at most half an ulp, and ``expected`` may itself be a float16 rounding (another cache), so two
      roundings can sit half an ulp either side. Taking the ulp at the larger value covers the case where
      the two fall on either side of a binade edge (0.25, 0.5, 1, ...), where the spacing halves.
    * ``2**-14 * ||expected||``, a floor for float32 noise. Matrix kernels differ between CPU kinds (Intel,
      AMD; MKL/oneDNN code paths) and batch shapes, so float32 features differ in their last bits, and
      that noise is relative to the vector's length, not to each coordinate: a coordinate near zero can
      carry noise many times its own float16 ulp. Measured on the tiny test model across batch sizes
      1..126, 1 or 2 threads, ATen AVX-512/AVX2/scalar kernels, MKL AVX-512/AVX2/SSE4.2/"compatible"
      paths, with and without oneDNN: at most 2.3e-7 * ||v|| (~2 float32 eps). The floor, 6.1e-5 * ||v||,
      is ~270x that, yet 8x finer than float16's own relative precision (2**-11) at the vector's length
      (for the test model, whose largest coordinates are ~0.35 * ||v||, a quarter of their float16 ulp),
      so it does not relax what "equal to float16 precision" means for the vector as a whole.

    Real errors stay far outside: over all 60 boxed frames of the test data, a face crop moved by one
    pixel misses by 21x-290x the tolerance (median ~70x), one grown by one pixel on one side by 9.7x-280x
    (median ~40x); see
    tests/test_extract.py::test_reference_check_catches_a_one_pixel_crop_error.
    """
    import numpy as np

    cached = np.asarray(cached)
    expected = np.asarray(expected, dtype=np.float32)
    assert cached.dtype == np.float16 and cached.shape == expected.shape, (what, cached.dtype, cached.shape, expected.shape)
    got = cached.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or inf: reported below, not warned about
        ulp = np.spacing(np.maximum(np.abs(got), np.abs(expected)).astype(np.float16)).astype(np.float32)
        floor = np.float32(2.0**-14) * np.linalg.norm(expected, axis=-1, keepdims=True)
        tol = ulp + floor
        err = np.abs(got - expected)
        ok = err <= tol  # False where either side is NaN or inf
        if ok.all():
            return
        ratio = np.where(ok, 0.0, np.nan_to_num(err / tol, nan=np.inf))
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(ratio), err.shape))
    raise AssertionError(
        f"{what}: {int((~ok).sum())} of {ok.size} values differ beyond float16 precision; worst at {worst}: "
        f"cached {got[worst]:.6g}, expected {expected[worst]:.6g}, off by {err[worst]:.3g} = {ratio[worst]:.3g}x "
        f"the tolerance {tol[worst]:.3g} (float16 ulp {ulp[worst]:.3g} + floor {floor[worst[:-1]][0]:.3g})"
    )
