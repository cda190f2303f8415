"""The ``caer`` command line (Typer). Each command parses flags and calls one function in ``pipeline``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="caer",
    help="Context-aware academic emotion recognition on CLIP, with a feature cache that pays for the frozen encoder once.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)

DATA = "Data"
ENCODER = "Encoder"
OUTPUT = "Output"
RUNTIME = "Runtime"


def friendly_errors(fn):
    """Turn expected failures (bad data, bad cache, bad flag values) into one red message and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .cache import CacheError
        from .pipeline.data import DataError

        try:
            return fn(*args, **kwargs)
        except (DataError, CacheError, ValueError, FileNotFoundError) as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command(rich_help_panel="Data")
@friendly_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into.")],
    clips: Annotated[int, typer.Option(help="Number of clips in all splits.")] = 60,
    frames: Annotated[int, typer.Option(help="Mean frames per clip (lengths vary from half to 1.5x).")] = 12,
    width: Annotated[int, typer.Option(help="Frame width in pixels.")] = 128,
    height: Annotated[int, typer.Option(help="Frame height in pixels.")] = 96,
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Write a small synthetic dataset in the RAER layout (frames, train/val/test.txt, box JSONs).

    Some classes show only on the face, some only in the context, so both streams matter.

    Example: [cyan]caer synth data/synth --clips 100[/]
    """
    from .pipeline.synth import SynthSettings, synthesise

    counts = synthesise(SynthSettings(out, clips, frames, width, height, classes, seed))
    console.print(f"wrote {sum(counts.values())} clips to {out} ({', '.join(f'{k}: {v}' for k, v in counts.items())})")


@app.command("init-weights", rich_help_panel="Data")
@friendly_errors
def init_weights(
    out: Annotated[Path, typer.Argument(help="Checkpoint file to write (.pt).")],
    model: Annotated[str, typer.Option(help="open_clip model name.")] = "caer-tiny",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Save randomly initialised open_clip weights: the offline stand-in for real CLIP weights.

    Example: [cyan]caer init-weights tiny.pt && caer extract ... --model caer-tiny --pretrained tiny.pt[/]
    """
    from .pipeline.encoder import save_random_weights

    console.print(f"wrote {save_random_weights(model, out, seed)}")


@app.command(rich_help_panel="Pipeline")
@friendly_errors
def extract(
    annotations: Annotated[list[Path], typer.Argument(help="Annotation files (train.txt val.txt ...); each is a split.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache to write: a .zarr folder or a .h5 file.", rich_help_panel=OUTPUT)],
    face_boxes: Annotated[Path, typer.Option(help="Face boxes JSON.", rich_help_panel=DATA)],
    root: Annotated[Optional[Path], typer.Option(help="Dataset root the clip dirs are relative to [default: the first annotation file's folder].", rich_help_panel=DATA)] = None,
    body_boxes: Annotated[Optional[Path], typer.Option(help="Body boxes JSON (for --crop-body).", rich_help_panel=DATA)] = None,
    crop_body: Annotated[bool, typer.Option(help="Context view = body box crop instead of the whole frame.", rich_help_panel=DATA)] = False,
    margin: Annotated[float, typer.Option(help="Pixels added around each face box.", rich_help_panel=DATA)] = 20.0,
    num_classes: Annotated[int, typer.Option(help="Labels must lie in 1..N.", rich_help_panel=DATA)] = 5,
    skip_bad: Annotated[bool, typer.Option(help="Skip clips with bad input (listed in the summary) instead of stopping.", rich_help_panel=DATA)] = False,
    model: Annotated[str, typer.Option(help="open_clip model name.", rich_help_panel=ENCODER)] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="open_clip weights tag, a local checkpoint file, or 'random'.", rich_help_panel=ENCODER)] = "openai",
    views: Annotated[int, typer.Option(help="1, or 2 to add a horizontally flipped view.", rich_help_panel=OUTPUT)] = 1,
    frame_stride: Annotated[int, typer.Option(help="Keep every k-th frame.", rich_help_panel=OUTPUT)] = 1,
    format: Annotated[str, typer.Option(help="zarr, h5, or auto (by the --out suffix).", rich_help_panel=OUTPUT)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace a cache that was extracted with other settings.", rich_help_panel=OUTPUT)] = False,
    batch_size: Annotated[int, typer.Option(help="Images per encoder batch.", rich_help_panel=RUNTIME)] = 256,
    workers: Annotated[int, typer.Option(help="Decoding/cropping worker processes.", rich_help_panel=RUNTIME)] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUNTIME)] = "auto",
    use_amp: Annotated[bool, typer.Option(help="Autocast (bf16/fp16) on CUDA.", rich_help_panel=RUNTIME)] = True,
):
    """Run the frozen CLIP image encoder once over every frame and cache the features (resumable).

    Re-running the same command finishes an interrupted extraction; on a finished cache it does nothing.

    Example: [cyan]caer extract data/train.txt data/val.txt data/test.txt --face-boxes data/face_boxes.json -o cache.zarr[/]
    """
    from .pipeline.encoder import load_clip, resolve_device
    from .pipeline.extract import ExtractSettings, extract as run_extract

    settings = ExtractSettings(
        annotations=annotations, out=out, face_boxes=face_boxes, root=root, body_boxes=body_boxes, crop_body=crop_body,
        margin=margin, views=views, frame_stride=frame_stride, num_classes=num_classes, format=format,
        batch_size=batch_size, workers=workers, use_amp=use_amp, skip_bad=skip_bad, overwrite=overwrite,
    )
    clip_model = load_clip(model, pretrained, resolve_device(device))
    summary = run_extract(settings, clip_model, console)
    console.print(summary.table())
    for line in summary.skipped:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
