"""``caer compare``: one table of several runs, a row per run.

Each row holds the settings that differ between the runs (from each run's ``config.yaml``), the best epoch of
the run's last stage and its valid WAR/UAR (the last record of that stage in ``metrics.jsonl``), and the test
WAR/UAR and per-class recall of ``test_report.json``: blank when a run has none, or when its checkpoint is not that
stage's best epoch (a "test note" column then says why).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.table import Table

from ..config import RunConfig, from_saved, options, read_config_file
from ..files import check_outputs, write_atomically
from .curves import read_metrics
from .run_dir import RunDir

# settings that say where a run writes or how it reports, not what it computes: never a column
IGNORED = ("run_dir", "resume", "overwrite", "print_confusion", "tensorboard", "workers")
# the result columns; "last stage", not "stage", which names a setting (the stage a run trains)
RESULTS = ("last stage", "best epoch", "valid WAR", "valid UAR", "test WAR", "test UAR")
BLANK = ""


@dataclass
class RunSummary:
    """What ``caer compare`` reads from one run directory."""

    path: Path
    config: dict
    stage: int | None = None
    best_epoch: int | None = None  # 1-based, as the console prints it
    valid_war: float | None = None
    valid_uar: float | None = None
    test_war: float | None = None
    test_uar: float | None = None
    recall: dict[str, float] = field(default_factory=dict)
    test_note: str = ""  # why the test fields are blank although the run has a test report


def read_run(run_dir: str | Path) -> RunSummary:
    """The config, best valid pair and test report of a run directory (test fields None without a report)."""
    run = RunDir(run_dir)
    run_dir, config_file = run.path, run.config
    if not config_file.is_file():
        raise ValueError(f"{run_dir}: no config.yaml (is it a caer train run directory?)")
    summary = RunSummary(run_dir, read_config_file(config_file))
    metrics = run.metrics
    records = read_metrics(metrics) if metrics.is_file() else []
    if records:
        last_stage = max(int(r["stage"]) for r in records)
        last = [r for r in records if int(r["stage"]) == last_stage][-1]
        summary.stage = last_stage
        if last.get("best_epoch", -1) >= 0:
            summary.best_epoch = last["best_epoch"] + 1
            summary.valid_war, summary.valid_uar = last["best_war"], last["best_uar"]
    report = run.test_report
    if report.is_file():
        try:
            test = json.loads(report.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{report}: not a readable test report ({err})") from None
        summary.test_note = report_mismatch(test, summary)
        if not summary.test_note:
            summary.test_war, summary.test_uar = test["war"], test["uar"]
            summary.recall = {row["name"]: row["recall"] for row in test["per_class"]}
    return summary


def report_mismatch(test: dict, summary: RunSummary) -> str:
    """Why a test report does not belong to the stage and best epoch shown ("" when it does): e.g. a stage re-run
    after a later stage leaves the later stage's records but its own test report."""
    stage, epoch = test.get("checkpoint_stage"), test.get("checkpoint_epoch")
    if summary.stage is None:  # no metrics.jsonl records: no stage shown to disagree with
        return ""
    if stage is None:  # a report of an older caer: caer train names its checkpoints stage<N>-best.pt
        named = re.fullmatch(r"stage(\d+)-(best|last)\.pt", Path(str(test.get("checkpoint", ""))).name)
        if named is None:
            return "test_report.json does not say which stage its checkpoint is from"
        stage = int(named[1])
    tested = f"test_report.json is of stage {stage}" + (f" epoch {epoch + 1}" if epoch is not None else "")
    if stage != summary.stage:
        return f"{tested}, not of stage {summary.stage}"
    if epoch is not None and summary.best_epoch is not None and epoch + 1 != summary.best_epoch:
        return f"{tested}, not of its best epoch {summary.best_epoch}"
    return ""


def differing_settings(configs: list[dict]) -> list[str]:
    """The config keys whose values are not the same in every run (a key missing from a run counts as differing),
    in the order ``caer train --help`` lists them; ``IGNORED`` keys never."""
    declared = [f.name for f, _ in options(RunConfig)]
    keys = declared + sorted({k for c in configs for k in c} - set(declared))
    missing = object()
    return [k for k in keys if k not in IGNORED and len({repr(c.get(k, missing)) for c in configs}) > 1]


def _setting(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _number(value: float | int | None) -> str:
    if value is None:
        return BLANK
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def compare_runs(run_dirs: list[str | Path]) -> tuple[list[str], list[list[str]]]:
    """(column names, one row of cells per run). The run column is the folder name, or the path as given when
    two runs share a name."""
    if not run_dirs:
        raise ValueError("caer compare needs at least one run directory")
    runs = [read_run(d) for d in run_dirs]
    for r in runs:  # --staged-training trains its stages of 1 epoch or more: its `stage` (unused) would mislead
        if r.config.get("staged_training"):
            settings = from_saved(r.config, str(RunDir(r.path).config))
            r.config["stage"] = ", ".join(str(n) for n in (1, 2, 3) if settings.stage_epochs(n) > 0)
    settings = differing_settings([r.config for r in runs])
    classes = list(dict.fromkeys(name for r in runs for name in r.recall))
    names = [Path(d).name for d in run_dirs]
    labels = names if len(set(names)) == len(names) else [str(d) for d in run_dirs]
    notes = any(r.test_note for r in runs)
    columns = ["run", *settings, *RESULTS, *(f"{c} recall" for c in classes), *(["test note"] if notes else [])]
    rows = []
    for label, r in zip(labels, runs):
        rows.append([label, *(_setting(r.config.get(k)) for k in settings), _number(r.stage), _number(r.best_epoch),
                     _number(r.valid_war), _number(r.valid_uar), _number(r.test_war), _number(r.test_uar),
                     *(_number(r.recall.get(c)) for c in classes), *([r.test_note] if notes else [])])
    return columns, rows


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(columns), line(["---:" if _is_number(c) else "---" for c in columns]),
                      *(line(row) for row in rows)])


def _is_number(column: str) -> bool:
    return column in RESULTS or column.endswith(" recall")


def check_csv(path: str | Path, run_dirs: list[str | Path], overwrite: bool) -> None:
    """``--csv``, checked before any run is read (``files.check_outputs``): never inside a compared run directory
    (which holds the files read, and belongs to caer train), never a folder; an existing file only with ``overwrite``."""
    check_outputs([("--csv", Path(path))], [("the run directory", Path(d)) for d in run_dirs], overwrite)


def write_csv(columns: list[str], rows: list[list[str]], path: str | Path) -> Path:
    """The table as CSV (written atomically)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows(rows)
    write_atomically({Path(path): text.getvalue()})
    return Path(path)


def rich_tables(columns: list[str], rows: list[list[str]], title: str | None = None) -> list[Table]:
    """The console form, as two tables: the settings with the valid and test pairs, and the test recall per class
    (``display.print_unfolded`` prints them whole on any console)."""
    recall = [i for i, c in enumerate(columns) if c.endswith(" recall")]
    main = [i for i in range(len(columns)) if i not in recall]
    tables = [_table([columns[i] for i in main], [[row[i] for i in main] for row in rows], title)]
    if recall:
        tables.append(_table(["run", *(columns[i].removesuffix(" recall") for i in recall)],
                             [[row[0], *(row[i] for i in recall)] for row in rows], "test recall per class (%)",
                             numbers=len(recall)))
    return tables


def _table(columns: list[str], rows: list[list[str]], title: str | None, numbers: int = 0) -> Table:
    """A compact table, headers over two lines; ``numbers``: the last so many columns hold numbers (else told by
    their names)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for i, c in enumerate(columns):
        number = _is_number(c) or i >= len(columns) - numbers
        table.add_column(c.replace(" ", "\n").replace("_", "_\n", 1), justify="right" if number else "left")
    for row in rows:
        table.add_row(*row)
    return table
