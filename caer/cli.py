"""The ``caer`` command line (Typer). Each command parses flags and calls one function in ``pipeline``."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

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
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command(rich_help_panel="Start here")
@friendly_errors
def demo(
    out: Annotated[Optional[Path], typer.Option(help="Folder for everything the demo writes \\[default: ./caer-demo-<time>].")] = None,
    clips: Annotated[int, typer.Option(help="Clips in the synthetic dataset.")] = 400,
    frames: Annotated[int, typer.Option(help="Mean frames per clip.")] = 8,
    epochs: Annotated[Optional[int], typer.Option(help="Stage-2 epochs \\[default: configs/tiny.yaml's].")] = None,
    model: Annotated[str, typer.Option(help="open_clip model; the default is the offline tiny one.")] = "caer-tiny",
    pretrained: Annotated[Optional[str], typer.Option(help="Weights for --model: an open_clip tag or a local file \\[default: random tiny weights].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
):
    """Run the whole pipeline offline: synth -> extract -> stages 1, 2, 3 -> test report (a minute or two on a laptop).

    Examples:
      [cyan]caer demo[/]
      [cyan]caer demo --model ViT-B-32 --pretrained openai --device auto[/]
    """
    import time as _time

    from .pipeline.demo import demo as run_demo

    out = out or Path(f"caer-demo-{_time.strftime('%Y%m%d-%H%M%S')}")
    run_demo(out, clips, frames, epochs, model, pretrained, device, console)


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
    root: Annotated[Optional[Path], typer.Option(help="Dataset root the clip dirs are relative to \\[default: the first annotation file's folder].", rich_help_panel=DATA)] = None,
    body_boxes: Annotated[Optional[Path], typer.Option(help="Body boxes JSON (for --crop-body).", rich_help_panel=DATA)] = None,
    crop_body: Annotated[bool, typer.Option(help="Context view = body box crop instead of the whole frame.", rich_help_panel=DATA)] = False,
    margin: Annotated[float, typer.Option(help="Pixels added around each face box.", rich_help_panel=DATA)] = 20.0,
    num_classes: Annotated[int, typer.Option(help="Labels must lie in 1..N.", rich_help_panel=DATA)] = 5,
    skip_bad: Annotated[bool, typer.Option(help="Skip clips with bad input (listed in the summary) instead of stopping.", rich_help_panel=DATA)] = False,
    model: Annotated[str, typer.Option(help="open_clip model name.", rich_help_panel=ENCODER)] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="open_clip weights tag, a local checkpoint file, or 'random'.", rich_help_panel=ENCODER)] = "openai",
    from_checkpoint: Annotated[Optional[Path], typer.Option(help="Use the image encoder of a caer checkpoint (e.g. fine-tuned by stage 3) instead of --model/--pretrained.", rich_help_panel=ENCODER)] = None,
    views: Annotated[int, typer.Option(help="1, or 2 to add a horizontally flipped view.", rich_help_panel=OUTPUT)] = 1,
    frame_stride: Annotated[int, typer.Option(help="Keep every k-th frame.", rich_help_panel=OUTPUT)] = 1,
    format: Annotated[str, typer.Option(help="zarr, h5, or auto (by the --out suffix).", rich_help_panel=OUTPUT)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace a cache that was extracted with other settings.", rich_help_panel=OUTPUT)] = False,
    batch_size: Annotated[int, typer.Option(help="Images per encoder batch.", rich_help_panel=RUNTIME)] = 256,
    workers: Annotated[Optional[int], typer.Option(help="Decoding/cropping worker processes \\[default: CPU cores - 1, at most 16].", rich_help_panel=RUNTIME)] = None,
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
        batch_size=batch_size, use_amp=use_amp, skip_bad=skip_bad, overwrite=overwrite,
    )
    if workers is not None:
        settings.workers = workers
    from .pipeline.distributed import local_device

    target = local_device(resolve_device(device))
    if from_checkpoint is not None:
        from .pipeline.train import clip_from_checkpoint

        clip_model = clip_from_checkpoint(from_checkpoint, target)
    else:
        clip_model = load_clip(model, pretrained, target)
    summary = run_extract(settings, clip_model, console)
    if len(summary.clips_per_rank) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 prints the summary
    console.print(summary.table())
    for line in summary.skipped:
        console.print(f"[yellow]skipped[/] {escape(line)}", highlight=False)



def _opt(panel: str, help: str, *names: str, field: str | None = None):
    """An optional train flag: None means "not given", so the config file's value (or the default) stands."""
    from .pipeline.config import FIELDS

    default = FIELDS[field].default if field and field in FIELDS and not callable(FIELDS[field].default) else None
    shown = "from config" if default is None else str(default)
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=shown)


T_DATA, T_MODEL, T_CLS, T_LOSS, T_OPT, T_STAGE, T_RUN = (
    "Data", "Model", "Prompts and classifier", "Losses and imbalance", "Optimisation", "Stages", "Run",
)


@app.command(rich_help_panel="Pipeline")
@friendly_errors
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (a path, or a shipped one: raer, tiny). Flags win over it.", rich_help_panel=T_RUN)] = None,
    stage: Annotated[Optional[int], _opt(T_STAGE, "Stage to run: 1 prompts, 2 adapter/temporal/fusion, 3 end to end.", field="stage")] = None,
    staged_training: Annotated[Optional[bool], _opt(T_STAGE, "Run stages 1 -> 2 -> 3, each from the previous best.", "--staged-training/--no-staged-training", field="staged_training")] = None,
    epochs: Annotated[Optional[int], _opt(T_STAGE, "Epochs (of any stage without its own count).", field="epochs")] = None,
    epochs_stage1: Annotated[Optional[int], _opt(T_STAGE, "Epochs of stage 1.", field="epochs_stage1")] = None,
    epochs_stage2: Annotated[Optional[int], _opt(T_STAGE, "Epochs of stage 2.", field="epochs_stage2")] = None,
    epochs_stage3: Annotated[Optional[int], _opt(T_STAGE, "Epochs of stage 3.", field="epochs_stage3")] = None,
    unfreeze_last: Annotated[Optional[int], _opt(T_STAGE, "Stage 3: unfreeze only the last N encoder blocks.", field="unfreeze_last")] = None,
    rotate_degrees: Annotated[Optional[float], _opt(T_STAGE, "Stage 3 augmentation: random rotation in [-r, r] degrees per clip (plus a random flip).", field="rotate_degrees")] = None,
    grad_accum: Annotated[Optional[int], _opt(T_STAGE, "Accumulate gradients over N batches.", field="grad_accum")] = None,
    grad_checkpointing: Annotated[Optional[bool], _opt(T_STAGE, "Stage 3: activation checkpointing in the image encoder.", "--grad-checkpointing/--no-grad-checkpointing", field="grad_checkpointing")] = None,
    train_list: Annotated[Optional[Path], _opt(T_DATA, "Training annotation file.", field="train_list")] = None,
    val_list: Annotated[Optional[Path], _opt(T_DATA, "Validation annotation file.", field="val_list")] = None,
    test_list: Annotated[Optional[Path], _opt(T_DATA, "Test annotation file.", field="test_list")] = None,
    cache: Annotated[Optional[Path], _opt(T_DATA, "Feature cache from caer extract.", field="cache")] = None,
    source: Annotated[Optional[str], _opt(T_DATA, "cache, or raw (decode frames and run the encoder every step, as the reference).", field="source")] = None,
    cache_in_memory: Annotated[Optional[bool], _opt(T_DATA, "Load the whole cache into RAM.", "--cache-in-memory/--no-cache-in-memory", field="cache_in_memory")] = None,
    root: Annotated[Optional[Path], _opt(T_DATA, "Dataset root for --source raw.", field="root")] = None,
    face_boxes: Annotated[Optional[Path], _opt(T_DATA, "Face boxes JSON for --source raw.", field="face_boxes")] = None,
    body_boxes: Annotated[Optional[Path], _opt(T_DATA, "Body boxes JSON for --source raw.", field="body_boxes")] = None,
    crop_body: Annotated[Optional[bool], _opt(T_DATA, "Raw source: context view = body crop.", "--crop-body/--no-crop-body", field="crop_body")] = None,
    margin: Annotated[Optional[float], _opt(T_DATA, "Raw source: face box margin in pixels.", field="margin")] = None,
    num_frames: Annotated[Optional[int], _opt(T_DATA, "T: frames (TSN segments) per clip.", field="num_frames")] = None,
    workers: Annotated[Optional[int], _opt(T_DATA, "Data-loader worker processes.", field="workers")] = None,
    model: Annotated[Optional[str], _opt(T_MODEL, "open_clip model name.", field="model")] = None,
    pretrained: Annotated[Optional[str], _opt(T_MODEL, "open_clip tag, local checkpoint file, or random.", field="pretrained")] = None,
    streams: Annotated[Optional[str], _opt(T_MODEL, "both, face or context (single-stream ablations).", field="streams")] = None,
    adapter: Annotated[Optional[bool], _opt(T_MODEL, "Expression-Aware Adapter on the face stream.", "--adapter/--no-adapter", field="adapter")] = None,
    adapter_mode: Annotated[Optional[str], _opt(T_MODEL, "residual, or replace (the reference's ReLU output).", field="adapter_mode")] = None,
    temporal_layers: Annotated[Optional[int], _opt(T_MODEL, "Layers of each temporal transformer.", field="temporal_layers")] = None,
    contexts_number: Annotated[Optional[int], _opt(T_CLS, "CoOp context vectors per prompt.", field="contexts_number")] = None,
    class_specific_contexts: Annotated[Optional[bool], _opt(T_CLS, "One set of context vectors per class.", "--class-specific-contexts/--shared-contexts", field="class_specific_contexts")] = None,
    class_token_position: Annotated[Optional[str], _opt(T_CLS, "end, middle or front.", field="class_token_position")] = None,
    temperature: Annotated[Optional[float], _opt(T_CLS, "tau in logits = cos / tau.", field="temperature")] = None,
    slerp_weight: Annotated[Optional[float], _opt(T_CLS, "IEC: lambda of slerp(prototype, z); 0 turns IEC off.", field="slerp_weight")] = None,
    iec_base: Annotated[Optional[str], _opt(T_CLS, "Prototype base: desc (fixed sentences) or soft (learnable prompts).", field="iec_base")] = None,
    class_balanced_loss: Annotated[Optional[bool], _opt(T_LOSS, "Effective-number class weights in the CE loss.", "--class-balanced-loss/--no-class-balanced-loss", field="class_balanced_loss")] = None,
    logit_adj: Annotated[Optional[bool], _opt(T_LOSS, "Add tau * log prior to the training logits.", "--logit-adj/--no-logit-adj", field="logit_adj")] = None,
    logit_adj_tau: Annotated[Optional[float], _opt(T_LOSS, "tau of --logit-adj.", field="logit_adj_tau")] = None,
    label_smoothing: Annotated[Optional[float], _opt(T_LOSS, "Label smoothing, 0..1.", field="label_smoothing")] = None,
    use_weighted_sampler: Annotated[Optional[bool], _opt(T_LOSS, "Sample clips with inverse class frequency.", "--use-weighted-sampler/--no-weighted-sampler", field="use_weighted_sampler")] = None,
    lambda_mi: Annotated[Optional[float], _opt(T_LOSS, "Weight of the mutual-information loss.", "--lambda-mi", "--lambda_mi", field="lambda_mi")] = None,
    mi_warmup: Annotated[Optional[int], _opt(T_LOSS, "Epochs with the MI loss off.", field="mi_warmup")] = None,
    mi_ramp: Annotated[Optional[int], _opt(T_LOSS, "Epochs to ramp the MI weight up.", field="mi_ramp")] = None,
    lambda_dc: Annotated[Optional[float], _opt(T_LOSS, "Weight of the decorrelation loss.", "--lambda-dc", "--lambda_dc", field="lambda_dc")] = None,
    dc_warmup: Annotated[Optional[int], _opt(T_LOSS, "Epochs with the DC loss off.", field="dc_warmup")] = None,
    dc_ramp: Annotated[Optional[int], _opt(T_LOSS, "Epochs to ramp the DC weight up.", field="dc_ramp")] = None,
    optimizer: Annotated[Optional[str], _opt(T_OPT, "sgd (momentum 0.9) or adamw.", field="optimizer")] = None,
    lr: Annotated[Optional[float], _opt(T_OPT, "Learning rate (temporal encoders, fusion; default of the others).", field="lr")] = None,
    lr_adapter: Annotated[Optional[float], _opt(T_OPT, "Learning rate of the adapter.", field="lr_adapter")] = None,
    lr_prompt: Annotated[Optional[float], _opt(T_OPT, "Learning rate of the prompt context vectors.", field="lr_prompt")] = None,
    lr_image_encoder: Annotated[Optional[float], _opt(T_OPT, "Learning rate of the image encoder (stage 3).", field="lr_image_encoder")] = None,
    lr_stage1: Annotated[Optional[float], _opt(T_OPT, "--lr for stage 1.", field="lr_stage1")] = None,
    lr_stage2: Annotated[Optional[float], _opt(T_OPT, "--lr for stage 2.", field="lr_stage2")] = None,
    lr_stage3: Annotated[Optional[float], _opt(T_OPT, "--lr for stage 3.", field="lr_stage3")] = None,
    weight_decay: Annotated[Optional[float], _opt(T_OPT, "Weight decay.", field="weight_decay")] = None,
    scheduler: Annotated[Optional[str], _opt(T_OPT, "cosine or step.", field="scheduler")] = None,
    batch_size: Annotated[Optional[int], _opt(T_OPT, "Clips per batch.", field="batch_size")] = None,
    grad_clip: Annotated[Optional[float], _opt(T_OPT, "Clip the gradient norm to this value.", field="grad_clip")] = None,
    use_amp: Annotated[Optional[bool], _opt(T_OPT, "bf16/fp16 autocast on CUDA (no-op on CPU).", "--use-amp/--no-amp", field="use_amp")] = None,
    seed: Annotated[Optional[int], _opt(T_OPT, "Random seed (data order, sampled frames, init).", field="seed")] = None,
    run_dir: Annotated[Optional[Path], _opt(T_RUN, "Where config, metrics.jsonl and checkpoints go.", field="run_dir")] = None,
    init_from: Annotated[Optional[Path], _opt(T_RUN, "Checkpoint a single stage starts from \\[default: stage{N-1}-best.pt of the run dir, if there].", field="init_from")] = None,
    resume: Annotated[Optional[bool], _opt(T_RUN, "Continue a stopped run from its last checkpoint.", "--resume/--no-resume", field="resume")] = None,
    device: Annotated[Optional[str], _opt(T_RUN, "auto, cpu, cuda or cuda:N.", field="device")] = None,
):
    """Train from the feature cache (stages 1 and 2) or raw frames (stage 3).

    Examples:
      [cyan]caer train -c raer --stage 2[/]
      [cyan]caer train -c raer --staged-training --epochs-stage1 5 --epochs-stage2 30 --epochs-stage3 3[/]
    """
    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k != "config"}
    from .pipeline.config import load_config
    from .pipeline.train import run

    cfg = load_config(config, overrides)
    results = run(cfg, console)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    for r in results:
        console.print(f"stage {r.stage}: best valid UAR {r.best['valid_uar']:.2f} (epoch {r.best['epoch'] + 1}) -> {r.best_path}")


@app.command("eval", rich_help_panel="Pipeline")
@friendly_errors
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from caer train (e.g. runs/x/stage2-best.pt).")],
    split: Annotated[str, typer.Option(help="train, val, test, or an annotation file.")] = "test",
    source: Annotated[str, typer.Option(help="cache, or raw frames (needed for a stage-3 checkpoint unless re-extracted).")] = "cache",
    cache: Annotated[Optional[Path], typer.Option(help="Feature cache \\[default: the one the checkpoint was trained on].")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Dataset root for --source raw.")] = None,
    face_boxes: Annotated[Optional[Path], typer.Option(help="Face boxes JSON for --source raw \\[default: the checkpoint's].")] = None,
    tta: Annotated[str, typer.Option(help="none, or flip: average the logits of the plain and mirrored view.")] = "none",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report (metrics, confusion matrix, predictions) as JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of the row-normalised confusion matrix.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Clips per batch \\[default: the checkpoint's].")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data-loader workers \\[default: the checkpoint's].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
):
    """Evaluate a checkpoint: WAR, UAR, per-class recall/precision/F1 and the confusion matrix.

    Examples:
      [cyan]caer eval runs/raer/stage2-best.pt --split test --json report.json --plot cm.png[/]
      [cyan]caer eval runs/raer/stage3-best.pt --source raw --tta flip[/]
    """
    from .pipeline.evaluate import evaluate

    if tta not in ("none", "flip"):
        raise ValueError(f"--tta must be none or flip, got {tta!r}")
    overrides = {"cache": str(cache) if cache else None, "root": str(root) if root else None,
                 "face_boxes": str(face_boxes) if face_boxes else None, "batch_size": batch_size, "workers": workers,
                 "device": device}
    report = evaluate(checkpoint, split, source, tta == "flip", overrides, console)
    console.print(report.tables())
    if json_path:
        report.write_json(json_path)
        console.print(f"report: {json_path}")
    if plot:
        report.plot(plot)
        console.print(f"confusion matrix picture: {plot}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
