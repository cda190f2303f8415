"""The ``caer`` command line (Typer).

Flags are not written here: each command's flags are generated from the option declarations of its
config record in ``caer.config`` (name, type, default, range, help, help panel), and each command
calls one recipe in ``caer.pipeline``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import re
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from .config import (
    EVAL_OVERRIDES,
    IMPORT_OVERRIDES,
    PREDICT_DETECTION,
    PREDICT_OVERRIDES,
    TTA,
    BoxesConfig,
    CompareConfig,
    DemoConfig,
    EvalConfig,
    ExtractConfig,
    ImportReferenceConfig,
    InitWeightsConfig,
    PlotConfig,
    PredictConfig,
    RunConfig,
    SplitConfig,
    SynthConfig,
    VerifyConfig,
    default_of,
    from_flat,
    option_type,
    options,
)
from .pipeline.display import print_unfolded

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


# ------------------------------------------------------------------------------------------ flags from declarations

def _shown_default(f: dataclasses.Field, default) -> str | bool:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    if default is None or default == []:
        return False
    return str(getattr(default, "value", default))


def flag_parameter(f: dataclasses.Field, panel: str, optional: bool, shown: str | bool | None = None) -> inspect.Parameter:
    """The Typer parameter of one declared option. ``optional``: None when not given, so that a config
    file's value (or the declared default) stands; ``--help`` shows the declared default, or ``shown``."""
    meta, kind = f.metadata, option_type(f)
    default = default_of(f)
    text = escape(meta["help"])
    if meta["argument"]:
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                 annotation=Annotated[kind, typer.Argument(help=text, show_default=False,
                                                                          metavar=f.name.upper())])
    info = typer.Option(*meta["flags"], help=text, rich_help_panel=panel, min=meta["min"], max=meta["max"],
                        show_default=_shown_default(f, default) if shown is None else shown)
    if optional:
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[Optional[kind], info])
    required = default is None and kind is f.type  # declared without "| None" and no default: must be given
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                             default=inspect.Parameter.empty if required else default, annotation=Annotated[f.type, info])


def flags_of(record, optional: bool = False, reuse: tuple[str, ...] = (), extra: tuple[inspect.Parameter, ...] = (),
             borrow: tuple = (), shown: dict | None = None):
    """Decorator: the command takes the flags of ``record`` (plus ``reuse``: options of ``RunConfig`` given
    as optional overrides; ``borrow``: ``(record, names)`` pairs, other records' options taken the same way; and
    ``extra`` parameters) and its body receives them as one dict. ``shown``: what ``--help`` gives as the default
    of a reused option whose default is not the declared one here (e.g. "the checkpoint's")."""
    shown = shown or {}
    params = [flag_parameter(f, panel, optional) for f, panel in options(record)]
    for other, names in ((RunConfig, reuse), *borrow):
        params += [flag_parameter(f, panel, True, shown.get(f.name)) for f, panel in options(other) if f.name in names]

    def wrap(body):
        @functools.wraps(body)
        def command(**values):
            return body(values)

        command.__signature__ = inspect.Signature([*params, *extra])
        command.__annotations__ = {}
        return command

    return wrap


def user_message(err: BaseException) -> str:
    """The one line a user needs: for an OS error the path and its cause; for an error re-raised from a
    data-loader worker (which carries the worker's traceback) the original message alone."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        found = list(re.finditer(rf"\n(?:[\w.]+\.)?{type(err).__name__}: ", text))
        if found:
            text = text[found[-1].end():].strip()
    # an OS error re-raised from a worker has lost its fields: "[Errno 2] No such file or directory: 'x.jpg'"
    os_error = re.fullmatch(r"\[Errno \d+\] (.+?): '(.+)'", text)
    return f"{os_error.group(2)}: {os_error.group(1)}" if os_error else text


# what a Ctrl-C leaves, by command (the commands that write as they go)
INTERRUPTED = {
    "extract": "the clips finished so far are kept; run the same command again to extract the rest",
    "train": "the epochs finished so far are kept; the same command with --resume goes on from the last one",
    "boxes": "nothing was written (the box files are written once every clip is done)",
}


def friendly_errors(fn):
    """Turn expected failures (bad data, bad cache, bad flag values, OS faults, a diverging loss) into one red
    message and exit 2; a Ctrl-C into one line on what it left, and exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .cache import CacheError
        from .data.raer import DataError

        try:
            return fn(*args, **kwargs)
        except (DataError, CacheError, ValueError, OSError, FloatingPointError) as err:
            err_console.print(f"[bold red]error:[/] {escape(user_message(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            left = INTERRUPTED.get(fn.__name__)
            err_console.print(f"[yellow]interrupted[/]{': ' + left if left else ''}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


CONFIG_FILE = inspect.Parameter(
    "config", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[list[str]], typer.Option(
        "--config", "-c", help="YAML config (a path, or a shipped one: raer, tiny, ablations/no_eaa, ...). Repeat it to "
        "apply several in order (-c raer -c ablations/no_eaa): a later file's keys win. Flags win over them all.",
        rich_help_panel="Run")],
)


# ------------------------------------------------------------------------------------------ commands

@app.command(rich_help_panel="Start here")
@friendly_errors
@flags_of(DemoConfig)
def demo(values: dict):
    """Run the whole pipeline offline: synth -> extract -> stages 1, 2, 3 -> test report (a minute or two on a laptop).

    Examples:
      [cyan]caer demo[/]
      [cyan]caer demo --ablations[/]   (then the full model and six ablations, compared in one table)
      [cyan]caer demo --model ViT-B-32-quickgelu --pretrained openai --device auto[/]
    """
    from .pipeline.demo import demo as run_demo

    run_demo(DemoConfig(**values), console)


@app.command(rich_help_panel="Data")
@friendly_errors
@flags_of(SynthConfig)
def synth(values: dict):
    """Write a small synthetic dataset in the RAER layout (frames, train/val/test.txt, box JSONs).

    Some classes show only on the face, some only in the context, so both streams matter. OUT must be a new or
    empty folder.

    Example: [cyan]caer synth data/synth --clips 100[/]
    """
    from .data.synth import synthesise

    settings = SynthConfig(**values)
    counts = synthesise(settings)
    console.print(f"wrote {sum(counts.values())} clips to {values['out']} "
                  f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    if settings.clips < 3 * settings.classes:  # each class gives val and test a clip first
        console.print(f"[yellow]note:[/] with fewer than 3 x --classes clips ({3 * settings.classes}), some classes "
                      "have no training clip", highlight=False)


@app.command("init-weights", rich_help_panel="Data")
@friendly_errors
@flags_of(InitWeightsConfig)
def init_weights(values: dict):
    """Save randomly initialised open_clip weights: the offline stand-in for real CLIP weights.

    An existing OUT is replaced only with --overwrite.

    Example: [cyan]caer init-weights tiny.pt && caer extract ... --model caer-tiny --pretrained tiny.pt[/]
    """
    from pathlib import Path

    from .files import check_outputs
    from .model.encoder import save_random_weights

    cfg = InitWeightsConfig(**values)
    check_outputs([("OUT", Path(cfg.out))], [], cfg.overwrite)
    console.print(f"wrote {save_random_weights(cfg.model, cfg.out, cfg.seed)}")


@app.command(rich_help_panel="Data")
@friendly_errors
@flags_of(BoxesConfig, reuse=("root", "workers"), borrow=((ExtractConfig, ("skip_bad",)),))
def boxes(values: dict):
    """Find face boxes (and body boxes) for clips that have none: detect faces in every frame, track them, keep each
    clip's person.

    Writes the RAER box files that caer extract and caer train read (--face-boxes, --body-boxes).

    Example: [cyan]caer boxes data/train.txt data/val.txt data/test.txt -o data/face_boxes.json --body-boxes data/body_boxes.json[/]
    """
    from .config import default_workers
    from .pipeline.boxes import find_boxes

    root, workers, skip_bad = values.pop("root"), values.pop("workers"), bool(values.pop("skip_bad"))
    summary = find_boxes(from_flat(BoxesConfig, values, "flag"), root, default_workers() if workers is None else workers,
                         console, skip_bad)
    print_unfolded(console, summary.table())
    for line in summary.skipped:
        console.print(f"[yellow]skipped[/] {escape(line)}", highlight=False, soft_wrap=True)


@app.command(rich_help_panel="Data")
@friendly_errors
@flags_of(SplitConfig, borrow=((ExtractConfig, ("num_classes",)),))
def split(values: dict):
    """Hold out a validation list from a training list: stratified by label, seeded, and with --group never one
    person or video on both sides.

    The test list must not choose the epoch; when a dataset ships only train and test lists, make the val list here.

    Examples:
      [cyan]caer split data/train.txt --train-out data/train-fit.txt --val-out data/val.txt[/]
      [cyan]caer split RAER/train.txt --train-out RAER/train-fit.txt --val-out RAER/val.txt --group '^([^/]+)/'[/]
    """
    from .pipeline.split import split_list

    num_classes = values.pop("num_classes")
    summary = split_list(SplitConfig(**values), ExtractConfig().num_classes if num_classes is None else num_classes)
    print_unfolded(console, summary.table())


@app.command(rich_help_panel="Pipeline")
@friendly_errors
@flags_of(ExtractConfig)
def extract(values: dict):
    """Run the frozen CLIP image encoder once over every frame and cache the features (resumable).

    Re-running the same command finishes an interrupted extraction; on a finished cache it does nothing.

    Example: [cyan]caer extract data/train.txt data/val.txt data/test.txt --face-boxes data/face_boxes.json -o cache.zarr[/]
    """
    from .pipeline.extract import extract as run_extract
    from .runtime import rank

    summary = run_extract(from_flat(ExtractConfig, values, "flag"), console=console)
    if rank() != 0:
        return  # under torchrun, rank 0 prints the summary
    print_unfolded(console, summary.table())
    for line in summary.skipped:
        console.print(f"[yellow]skipped[/] {escape(line)}", highlight=False)


@app.command(rich_help_panel="Pipeline")
@friendly_errors
@flags_of(RunConfig, optional=True, extra=(CONFIG_FILE,))
def train(values: dict):
    """Train from the feature cache (stages 1 and 2) or raw frames (stage 3).

    Examples:
      [cyan]caer train -c raer --stage 2[/]
      [cyan]caer train -c raer --staged-training --epochs-stage1 5 --epochs-stage2 30 --epochs-stage3 3[/]
    """
    from .config import load_config
    from .pipeline.train import run
    from .runtime import rank

    config = values.pop("config") or None
    results = run(load_config(config, {k: v for k, v in values.items() if v not in (None, [])}), console)
    if rank() != 0:
        return  # under torchrun, rank 0 reports
    for r in results:
        console.print(f"stage {r.stage}: best valid UAR {r.best['valid_uar']:.2f} (epoch {r.best['epoch'] + 1}) -> {r.best_path}")


@app.command("eval", rich_help_panel="Pipeline")
@friendly_errors
@flags_of(EvalConfig, reuse=EVAL_OVERRIDES, shown=dict.fromkeys(EVAL_OVERRIDES, "the checkpoint's"))
def eval_(values: dict):
    """Evaluate a checkpoint: WAR, UAR, per-class recall/precision/F1 and the confusion matrix.

    Options of the run (cache, root, ...) default to the checkpoint's. --json and --plot are checked before anything
    is loaded: never the checkpoint or another input; an existing file is replaced only with --overwrite.

    Examples:
      [cyan]caer eval runs/raer/stage2-best.pt --split test --json report.json --plot cm.png[/]
      [cyan]caer eval runs/raer/stage3-best.pt --source raw --tta flip[/]
    """
    from pathlib import Path

    from .pipeline.evaluate import evaluate
    from .pipeline.report import check_eval_outputs

    overrides = {k: values.pop(k) for k in EVAL_OVERRIDES}
    cfg = EvalConfig(**values)
    check_eval_outputs(cfg, overrides, cfg.overwrite)
    report = evaluate(cfg.checkpoint, cfg.split, cfg.source, cfg.tta == TTA.flip, overrides, console)
    console.print(report.tables())
    if cfg.json:
        report.write_json(Path(cfg.json))
        console.print(f"report: {cfg.json}")
    if cfg.plot:
        report.plot(Path(cfg.plot))
        console.print(f"confusion matrix picture: {cfg.plot}")


@app.command("import-reference", rich_help_panel="Pipeline")
@friendly_errors
@flags_of(ImportReferenceConfig, reuse=IMPORT_OVERRIDES,
          shown=dict.fromkeys(("crop_body", "margin"), "the clip-caer-reference config's"))
def import_reference(values: dict):
    """Convert the authors' released CLIP-CAER checkpoint into a caer checkpoint (stage 3, reference mode).

    Every tensor of the official file is mapped, or repeats a mapped one (checked, then left out); any other key,
    or a missing one, is an error naming it. The data options given here go into the checkpoint's run config.

    Example: [cyan]caer import-reference CLIP-CAER.pth -o clip-caer.pt --root RAER --face-boxes RAER/face_boxes.json[/]
    """
    from .pipeline.import_reference import import_reference as run_import

    overrides = {k: values.pop(k) for k in IMPORT_OVERRIDES}
    cfg = ImportReferenceConfig(**values)
    print_unfolded(console, run_import(cfg, {k: v for k, v in overrides.items() if v is not None}, console))
    console.print(f"next: [cyan]caer eval {escape(cfg.out)} --split test[/] (raw frames; add --root/--face-boxes "
                  "if they differ from the ones given here)", highlight=False, soft_wrap=True)


@app.command(rich_help_panel="Pipeline")
@friendly_errors
@flags_of(PredictConfig, reuse=PREDICT_OVERRIDES, borrow=((BoxesConfig, PREDICT_DETECTION),),
          shown={"root": "the --face-boxes file's folder", "pretrained": "the checkpoint's", "device": "the checkpoint's"})
def predict(values: dict):
    """Predict the emotion of the people in videos or frame folders with a checkpoint of any stage.

    Faces come from --face-boxes (RAER format, keyed by each input's path) or from a face detector and tracking
    (--detector, default hog): the clip's person, or every tracked face with --all-faces. Each person gets class
    probabilities per window of --window frames (every --stride frames) and their mean as the clip-level label.

    Here --root defaults to the --face-boxes file's folder, and --pretrained and --device to the checkpoint's.

    Examples:
      [cyan]caer predict runs/raer/stage2-best.pt lesson.mp4 --json lesson.json --annotate lesson-labelled.mp4[/]
      [cyan]caer predict runs/raer/stage3-best.pt videos/*.mp4 --all-faces --window 32 --stride 16[/]
      [cyan]caer predict ckpt.pt data/videos/a.mp4 --face-boxes data/face_boxes.json --root data[/]
    """
    from .pipeline.predict import predict as run_predict

    overrides = {k: values.pop(k) for k in PREDICT_OVERRIDES}
    detection = {k: values.pop(k) for k in PREDICT_DETECTION}
    result = run_predict(PredictConfig(**values), overrides, detection, console)
    result.show(console)
    for path in result.written:
        console.print(f"written: {escape(path)}", highlight=False, soft_wrap=True)


@app.command(rich_help_panel="Results")
@friendly_errors
@flags_of(PlotConfig)
def plot(values: dict):
    """Draw the training curves of a run (WAR/UAR, loss terms, MI/DC weights, learning rates; one column per stage).

    caer train writes RUN_DIR/curves.png at the end of every stage; this redraws it, e.g. while a run is going on.
    Another existing -o file is replaced only with --overwrite.

    Example: [cyan]caer plot runs/raer -o raer-curves.png[/]
    """
    from .pipeline.curves import write_curves

    cfg = PlotConfig(**values)
    path = write_curves(cfg.run_dir, cfg.out, cfg.overwrite)
    console.print(f"training curves: {path}", highlight=False, soft_wrap=True)


@app.command(rich_help_panel="Results")
@friendly_errors
@flags_of(CompareConfig)
def compare(values: dict):
    """One table of several runs: the settings that differ, best epoch, valid and test WAR/UAR, per-class test recall.

    Never columns: settings that say only where a run writes or how it reports (run_dir, resume, overwrite, workers,
    print_confusion, tensorboard).

    Test columns are blank for a run without test_report.json, or whose report is not of the best epoch of the
    stage shown (the test note column says why). --csv is never inside a compared run directory, and replaces an
    existing file only with --overwrite.

    Examples:
      [cyan]caer compare runs/full runs/no_eaa runs/no_iec[/]
      [cyan]caer compare runs/* --markdown --csv runs.csv[/]
    """
    from .pipeline.compare import check_csv, compare_runs, markdown_table, rich_tables, write_csv

    cfg = CompareConfig(**values)
    if cfg.csv:
        check_csv(cfg.csv, cfg.run_dirs, cfg.overwrite)
    columns, rows = compare_runs(cfg.run_dirs)
    if cfg.markdown:
        console.print(markdown_table(columns, rows), markup=False, highlight=False, soft_wrap=True)
    else:
        print_unfolded(console, *rich_tables(columns, rows))
    if cfg.csv:
        console.print(f"table: {write_csv(columns, rows, cfg.csv)}", highlight=False, soft_wrap=True)


cache_app = typer.Typer(help="Look after a feature cache.", rich_markup_mode="rich", no_args_is_help=True,
                        context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(cache_app, name="cache", rich_help_panel="Data")


@cache_app.command("verify")
@friendly_errors
@flags_of(VerifyConfig)
def cache_verify(values: dict):
    """Read every clip of a cache and check it against the checksum written with it; list damaged clips.

    Exit code 0 when every clip is intact, 1 when some are damaged (re-run the same [cyan]caer extract[/] to
    repair them), 2 when the path is not a readable cache.

    Example: [cyan]caer cache verify cache/raer-vitb32.zarr[/]
    """
    from rich.table import Table

    from .cache import FeatureCache

    cache = FeatureCache.open(VerifyConfig(**values).path)
    problems = cache.verify()
    if problems:
        table = Table(title=f"{len(problems)} damaged or missing clip(s) in {cache.path}", title_justify="left")
        table.add_column("clip")
        table.add_column("problem")
        for video_id, problem in sorted(problems.items()):
            table.add_row(video_id, problem)
        console.print(table)
        console.print("Re-run the caer extract that made this cache to repair them.")
        raise typer.Exit(1)
    unchecked = cache.clips_without_checksum()
    note = f" ({unchecked} written before checksums were recorded: read, not compared)" if unchecked else ""
    console.print(f"{cache.path}: all {len(cache.video_ids)} clips intact{note}")


def main() -> None:
    # caer's own library messages at INFO; other libraries' (open_clip's chatter) only from WARNING up
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)])
    logging.getLogger("caer").setLevel(logging.INFO)
    app()


if __name__ == "__main__":
    main()
