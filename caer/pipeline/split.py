"""``caer split``: hold out a validation list from a training list, stratified by label, optionally by group.

The rule. Clips are taken in *units*: one clip each, or with ``--group`` every clip whose path gives the same
value for the regex's first capture group. A unit's class is its clips' most common label (ties: the lowest).
In each class, whose units hold ``n`` clips, the target is ``round(fraction x n)`` validation clips (half rounds
up), at least 1 and at most ``n - 1``; a class of one clip has none. The class's units are shuffled by a numpy
Generator seeded with ``--seed`` (classes in label order) and taken into validation one by one while the class
has fewer validation clips than its target and more than one unit left in training. Without ``--group`` this
holds out exactly the target; with it, a group may overshoot the target, and the summary gives the shares reached.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from ..config import SplitConfig
from ..data.raer import Clip, DataError, read_annotations, read_lines
from ..files import check_outputs, missing, write_atomically


@dataclass
class ClassSplit:
    """One class's outcome: clips by their label, units (groups) by their class."""

    label: int  # 1-based, as in the lists
    train_clips: int = 0
    val_clips: int = 0
    train_units: int = 0
    val_units: int = 0

    @property
    def clips(self) -> int:
        return self.train_clips + self.val_clips

    @property
    def val_share(self) -> float:
        return self.val_clips / self.clips if self.clips else 0.0

    def note(self, grouped: bool) -> str:
        if self.clips == 0:
            return "no clips"
        if self.val_units == 0 and self.train_units == 1:
            return "1 group: kept in training" if grouped else "1 clip: kept in training"
        return ""


@dataclass
class SplitSummary:
    source: str
    fraction: float
    seed: int
    group: str | None
    classes: list[ClassSplit]
    written: list[str] = field(default_factory=list)

    @property
    def val_clips(self) -> int:
        return sum(c.val_clips for c in self.classes)

    @property
    def train_clips(self) -> int:
        return sum(c.train_clips for c in self.classes)

    def table(self) -> Table:
        """Per class: clips in training and validation, the share held out, and the groups with --group."""
        grouped = self.group is not None
        title = f"caer split of {self.source}: --val-fraction {self.fraction}, --seed {self.seed}"
        t = Table(title=title + (f", --group {self.group}" if grouped else ""), title_justify="left")
        for name in ("label", "train", "val", "val share") + (("train groups", "val groups") if grouped else ()):
            t.add_column(name, justify="right")
        t.add_column("note")
        for c in self.classes:
            groups = (str(c.train_units), str(c.val_units)) if grouped else ()
            t.add_row(str(c.label), str(c.train_clips), str(c.val_clips), f"{100 * c.val_share:.1f}%", *groups,
                      c.note(grouped))
        total = self.train_clips + self.val_clips
        groups = tuple(str(sum(getattr(c, k) for c in self.classes)) for k in ("train_units", "val_units"))
        t.add_row("all", str(self.train_clips), str(self.val_clips), f"{100 * self.val_clips / total:.1f}%",
                  *(groups if grouped else ()), "", end_section=True)
        for path in self.written:
            t.add_row("written", path, *[""] * (len(t.columns) - 2))
        return t


def val_target(clips: int, fraction: float) -> int:
    """Validation clips a class of ``clips`` clips aims at: round(fraction x clips), half up, in 1..clips-1."""
    if clips < 2:
        return 0
    return min(clips - 1, max(1, math.floor(fraction * clips + 0.5)))


def split_list(cfg: SplitConfig, num_classes: int) -> SplitSummary:
    """Split ``cfg.train_list`` into ``cfg.train_out`` and ``cfg.val_out`` (original lines, input order)."""
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction {cfg.val_fraction} must lie strictly between 0 and 1")
    source = Path(cfg.train_list)
    outputs = _check_outputs(source, [Path(cfg.train_out), Path(cfg.val_out)], cfg.overwrite)
    pattern = _compile_group(cfg.group)
    clips, _ = read_annotations(source, root=None, num_classes=num_classes, need_frames=False)
    units = _units(clips, pattern)
    held_out, classes = _choose(clips, units, num_classes, cfg.val_fraction, np.random.default_rng(cfg.seed))
    summary = SplitSummary(str(source), cfg.val_fraction, cfg.seed, cfg.group, classes)
    if not held_out:
        kind = "groups" if pattern else "clips"
        raise ValueError(f"{source}: no clip went to validation: every class has fewer than 2 {kind}")
    lines = read_lines(source)
    texts = {side: [lines[_line_number(c) - 1] for i, c in enumerate(clips) if (i in held_out) == side]
             for side in (False, True)}
    write_atomically({path: "".join(f"{line}\n" for line in lines)
                      for path, lines in zip(outputs, (texts[False], texts[True]))})
    summary.written = [str(p) for p in outputs]
    return summary


def _check_outputs(source: Path, outputs: list[Path], overwrite: bool) -> list[Path]:
    """The two lists to write; one that is the input, the other output, a folder, or (without --overwrite) an
    existing file is refused."""
    if not source.is_file():
        raise DataError(missing(source, "annotation file"))
    check_outputs(list(zip(("--train-out", "--val-out"), outputs)), [("the input list", source)], overwrite)
    return outputs


def _compile_group(regex: str | None) -> re.Pattern | None:
    if regex is None:
        return None
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise ValueError(f"--group {regex!r} is not a valid regular expression ({err})") from None
    if pattern.groups < 1:
        raise ValueError(f"--group {regex!r} has no capture group: put the part that names a group in (...)")
    return pattern


def _units(clips: list[Clip], pattern: re.Pattern | None) -> list[list[int]]:
    """Clip indices by unit, in order of first appearance: one clip each, or the clips of one --group value."""
    if pattern is None:
        return [[i] for i in range(len(clips))]
    groups: dict[str, list[int]] = {}
    for i, clip in enumerate(clips):
        found = pattern.search(clip.video_id)
        if found is None or found.group(1) is None:
            raise DataError(f"{clip.source}: clip path {clip.video_id!r} does not match --group {pattern.pattern!r}")
        groups.setdefault(found.group(1), []).append(i)
    return list(groups.values())


def _choose(clips: list[Clip], units: list[list[int]], num_classes: int, fraction: float,
            rng: np.random.Generator) -> tuple[set[int], list[ClassSplit]]:
    """The clip indices held out, and each class's outcome (the rule in the module docstring)."""
    by_class: dict[int, list[list[int]]] = {c: [] for c in range(num_classes)}
    for unit in units:
        counts = Counter(clips[i].label for i in unit)
        by_class[min(counts, key=lambda label: (-counts[label], label))].append(unit)
    held_out: set[int] = set()
    classes = [ClassSplit(c + 1) for c in range(num_classes)]
    for c, members in by_class.items():
        target = val_target(sum(map(len, members)), fraction)
        taken, left = 0, len(members)
        for u in rng.permutation(len(members)):
            if taken >= target or left <= 1:
                break
            held_out.update(members[u])
            taken, left = taken + len(members[u]), left - 1
        classes[c].val_units, classes[c].train_units = len(members) - left, left
    for i, clip in enumerate(clips):
        if i in held_out:
            classes[clip.label].val_clips += 1
        else:
            classes[clip.label].train_clips += 1
    return held_out, classes


def _line_number(clip: Clip) -> int:
    return int(clip.source.rpartition(":")[2])  # read_annotations names each clip's line as "file:line"


