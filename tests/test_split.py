"""``caer split``: a validation list held out of a training list, stratified by label, reproducible, and with
--group never one person on both sides (README, "caer split")."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

from caer.config import SplitConfig
from caer.data.raer import DataError
from caer.pipeline.split import split_list
from conftest import assert_in_output, run_cli

GROUP = r"^([^/]+)/"
# clips per class (labels 1..5): uneven, as real data is
COUNTS = {1: 14, 2: 9, 3: 6, 4: 11, 5: 2}


def write_list(path: Path, counts: dict[int, int] = COUNTS, students: int = 8) -> list[str]:
    """An annotation list over ``students`` folders, with a comment, a blank line and uneven spacing (which
    must survive verbatim); returns its clip lines in order."""
    lines, n = [], 0
    for label, count in counts.items():
        for _ in range(count):
            spaces = "  " if n % 7 == 0 else " "
            lines.append(f"s{(n * 5) % students:02d}/clip{n:03d}{spaces}{10 + n % 4} {label}")
            n += 1
    order = lines[::3] + lines[1::3] + lines[2::3]  # labels interleaved, not in blocks
    path.write_text("# student/clip frames label\n\n" + "\n".join(order) + "\n")
    return order


def split(tmp_path: Path, source: Path, **options) -> tuple[list[str], list[str], object]:
    cfg = SplitConfig(str(source), str(tmp_path / "train-fit.txt"), str(tmp_path / "val.txt"), **options)
    summary = split_list(cfg, num_classes=5)
    return (tmp_path / "train-fit.txt").read_text().splitlines(), (tmp_path / "val.txt").read_text().splitlines(), summary


def labels(lines: list[str]) -> Counter:
    return Counter(int(line.split()[2]) for line in lines)


def group_of(line: str) -> str:
    return line.split("/")[0]


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_is_disjoint_verbatim_in_order_and_stratified(tmp_path, fraction):
    lines = write_list(tmp_path / "train.txt")
    train, val, summary = split(tmp_path, tmp_path / "train.txt", val_fraction=fraction)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(lines)  # every line verbatim (double spaces kept), comments dropped
    assert train == [line for line in lines if line in set(train)]  # the input order
    assert val == [line for line in lines if line in set(val)]
    held = labels(val)
    for label, count in COUNTS.items():
        expected = min(count - 1, max(1, math.floor(fraction * count + 0.5)))
        assert held[label] == expected, (label, count)
    assert [(c.train_clips, c.val_clips) for c in summary.classes] == [
        (labels(train)[k], held[k]) for k in COUNTS]


def test_the_seed_decides_the_split(tmp_path):
    write_list(tmp_path / "train.txt")
    runs = []
    for n, seed in enumerate((0, 0, 1, 2)):
        out = tmp_path / f"run{n}"
        out.mkdir()
        runs.append(split(out, tmp_path / "train.txt", val_fraction=0.3, seed=seed)[1])
    assert runs[0] == runs[1]
    assert runs[2] != runs[0] or runs[3] != runs[0]


def test_groups_stay_on_one_side_and_the_shares_are_reported(tmp_path):
    lines = write_list(tmp_path / "train.txt", students=12)
    train, val, summary = split(tmp_path, tmp_path / "train.txt", val_fraction=0.3, group=GROUP)
    assert sorted(train + val) == sorted(lines)
    assert val and not {group_of(x) for x in train} & {group_of(x) for x in val}
    groups = len({group_of(x) for x in lines})
    assert sum(c.train_units + c.val_units for c in summary.classes) == groups
    assert sum(c.val_units for c in summary.classes) == len({group_of(x) for x in val})
    held = labels(val)
    for c in summary.classes:  # shares reached, by label
        assert c.val_share == pytest.approx(held[c.label] / COUNTS[c.label])
    table = summary.table()
    assert [col.header for col in table.columns][4:6] == ["train groups", "val groups"]


def test_a_class_with_one_clip_stays_in_training(tmp_path):
    write_list(tmp_path / "train.txt", counts={1: 6, 2: 1, 3: 5, 4: 4, 5: 3})
    train, val, summary = split(tmp_path, tmp_path / "train.txt", val_fraction=0.5)
    assert labels(val)[2] == 0 and labels(train)[2] == 1
    assert summary.classes[1].note(grouped=False) == "1 clip: kept in training"


def test_no_clip_to_hold_out_is_refused(tmp_path):
    (tmp_path / "train.txt").write_text("a/1 4 1\nb/2 4 2\n")
    with pytest.raises(ValueError, match="no clip went to validation"):
        split(tmp_path, tmp_path / "train.txt")
    assert not (tmp_path / "val.txt").exists() and not (tmp_path / "train-fit.txt").exists()


@pytest.mark.parametrize("bad_line, options, error, message", [
    ("s01/clip900 10 9", {}, DataError, r"train\.txt:6: label 9 is outside 1\.\.5"),
    ("loose-clip 10 1", {"group": GROUP}, DataError,
     r"train\.txt:6: clip path 'loose-clip' does not match --group '\^\(\[\^/\]\+\)/'"),
    ("", {"val_fraction": 1.0}, ValueError, "--val-fraction 1.0 must lie strictly between 0 and 1"),
    ("", {"val_fraction": 0.0}, ValueError, "--val-fraction 0.0 must lie strictly between 0 and 1"),
    ("", {"group": "s0"}, ValueError, "has no capture group"),
])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, bad_line, options, error, message):
    write_list(tmp_path / "train.txt")
    text = (tmp_path / "train.txt").read_text().splitlines()
    (tmp_path / "train.txt").write_text("\n".join(text[:5] + [bad_line] + text[5:]) + "\n")
    with pytest.raises(error, match=message) as err:
        split(tmp_path, tmp_path / "train.txt", **options)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "val.txt").exists() and not (tmp_path / "train-fit.txt").exists()


def test_existing_outputs_and_the_input_are_never_overwritten_by_a_refused_run(tmp_path):
    lines = write_list(tmp_path / "train.txt")
    before = (tmp_path / "train.txt").read_text()
    (tmp_path / "val.txt").write_text("old\n")
    with pytest.raises(ValueError, match=r"--val-out .*val\.txt already exists: pass --overwrite"):
        split(tmp_path, tmp_path / "train.txt")
    assert (tmp_path / "val.txt").read_text() == "old\n" and not (tmp_path / "train-fit.txt").exists()
    cfg = SplitConfig(str(tmp_path / "train.txt"), str(tmp_path / "train.txt"), str(tmp_path / "other.txt"))
    with pytest.raises(ValueError, match="--train-out .* is the input list"):
        split_list(cfg, 5)
    assert (tmp_path / "train.txt").read_text() == before
    train, val, _ = split(tmp_path, tmp_path / "train.txt", overwrite=True)
    assert sorted(train + val) == sorted(lines) and "old" not in val
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-fit.txt", "train.txt", "val.txt"]  # no temp files


def test_cli_prints_the_counts_and_one_error_line(tmp_path):
    write_list(tmp_path / "train.txt")
    args = ["split", str(tmp_path / "train.txt"), "--train-out", str(tmp_path / "fit.txt"),
            "--val-out", str(tmp_path / "val.txt"), "--val-fraction", "0.25", "--group", GROUP]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    val = (tmp_path / "val.txt").read_text().splitlines()
    train = (tmp_path / "fit.txt").read_text().splitlines()
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"│\s+(\d|all)\s+│\s+(\d+)\s+│\s+(\d+)\s+│", result.output)}
    assert rows["all"] == (str(len(train)), str(len(val)))
    for label in COUNTS:
        assert rows[str(label)] == (str(labels(train)[label]), str(labels(val)[label]))
    assert_in_output("val groups", result.output)
    again = run_cli(args)
    assert again.exit_code == 2
    assert again.output.count("\n") == 1
    assert_in_output("already exists: pass --overwrite", again.output)


def test_each_option_is_one_flag_and_num_classes_is_extracts_declaration():
    import typer

    from caer.cli import app
    from caer.config import ExtractConfig, options

    params = {p.name: p for p in typer.main.get_command(app).commands["split"].params if p.name != "help"}
    assert sorted(params) == sorted([f.name for f, _ in options(SplitConfig)] + ["num_classes"])
    declared = {f.name: f for f, _ in options(ExtractConfig)}["num_classes"]
    assert params["num_classes"].help == declared.metadata["help"]
