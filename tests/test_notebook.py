"""notebooks/caer_colab.ipynb cannot rot: its code cells run here, in order, in demo mode (CAER_NOTEBOOK_DEMO=1).

No Jupyter kernel: a small runner executes each code cell in one namespace, as a kernel would. IPython's
shell lines (``!cmd``, with ``{expr}`` filled in from that namespace) run through the shell with this
environment's ``bin`` first on PATH, so ``caer`` is this checkout's console script; unlike IPython, a failing
command fails the test. Cells tagged ``colab-only`` (install, Drive, the optional GPU check) are skipped, and
``IPython.display`` is a stand-in that records what the notebook shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "caer_colab.ipynb"
COLAB_ONLY = "colab-only"


def load() -> dict:
    return json.loads(NOTEBOOK.read_text())


def source(cell: dict) -> str:
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def to_python(code: str) -> str:
    """A cell's code with each ``!cmd`` line (at any indentation) turned into ``_shell_('cmd')``."""
    lines = []
    for line in code.splitlines():
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        if body.startswith("%"):
            raise AssertionError(f"IPython magic outside a {COLAB_ONLY} cell: {line!r}")
        lines.append(f"{indent}_shell_({body[1:]!r})" if body.startswith("!") else line)
    return "\n".join(lines)


class Notebook:
    """Runs code cells in one namespace, like a kernel; records shell output and what was displayed."""

    def __init__(self):
        self.ns: dict = {"__name__": "__main__"}
        self.ns["_shell_"] = self.shell
        self.shown: list[str] = []
        self.log: list[str] = []

    def expand(self, command: str) -> str:
        # IPython fills in {expression} from the user namespace
        return re.sub(r"\{([^{}]+)\}", lambda m: str(eval(m.group(1), self.ns)), command)

    def shell(self, command: str) -> None:
        command = self.expand(command)
        done = subprocess.run(command, shell=True, capture_output=True, text=True)
        self.log.append(f"$ {command}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, f"exit {done.returncode}: {command}\n{done.stdout}\n{done.stderr}"

    def run(self, cell: dict) -> None:
        exec(compile(to_python(source(cell)), f"<cell {cell.get('id')}>", "exec"), self.ns)

    def display_module(self) -> types.ModuleType:
        shown = self.shown

        class Image:
            def __init__(self, filename: str):
                assert Path(filename).is_file(), filename
                self.filename = filename

        def display(obj) -> None:
            shown.append(obj.filename)

        module = types.ModuleType("IPython.display")
        module.Image, module.display = Image, display
        return module


# ------------------------------------------------------------------------------------------ structure (fast)

def test_notebook_is_nbformat4_and_marks_its_colab_only_cells():
    nb = load()
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
    ids = [c["id"] for c in nb["cells"]]
    assert len(ids) == len(set(ids)), "cell ids must be unique"
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown") and isinstance(cell["metadata"], dict)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {cell['id']}: saved with output"
    for cell in code_cells(nb):
        code = source(cell)
        colab_only = COLAB_ONLY in tags(cell)
        for needs_colab in ("pip install", "git clone", "drive.mount", "%cd", "bench/gpu_check.py"):
            assert colab_only or needs_colab not in code, f"cell {cell['id']} runs {needs_colab!r}: tag it {COLAB_ONLY}"
        if colab_only:
            assert code.startswith("# colab-only"), f"cell {cell['id']}: say so in its first line"
        for line in code.splitlines():
            assert not (line.lstrip().startswith("!") and "$" in line), f"use {{var}}, not $var: {line!r}"
        if not colab_only:
            to_python(code)  # no magics where the demo runs
    first = source(code_cells(nb)[0])
    assert 'DEMO = os.environ.get("CAER_NOTEBOOK_DEMO") == "1"' in first and "REPO_URL" in first


# ------------------------------------------------------------------------------------------ the demo run (slow)

@pytest.mark.slow
def test_notebook_runs_end_to_end_in_demo_mode(tmp_path, monkeypatch):
    # `caer` must be this environment's console script: the one beside this Python (a venv's bin), else on PATH
    script = Path(sys.executable).parent / "caer"
    script = script if script.exists() else Path(shutil.which("caer") or "caer")
    assert script.exists(), f"no caer console script beside {sys.executable} or on PATH: pip install -e ."
    bin_dir = script.parent
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("CAER_NOTEBOOK_DEMO", "1")
    monkeypatch.setenv("CAER_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    nb = Notebook()
    ipython = types.ModuleType("IPython")
    ipython.display = nb.display_module()
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", ipython.display)

    cells = [c for c in code_cells(load()) if COLAB_ONLY not in tags(c)]
    for cell in cells:
        nb.run(cell)

    ns = nb.ns
    assert ns["DEMO"] and not ns["ON_COLAB"] and ns["MODEL"] == "caer-tiny" and ns["DEVICE"] == "cpu"
    run_dir = Path(ns["RUN_DIR"])
    assert run_dir.is_relative_to(tmp_path) and Path(ns["CACHE"]).is_relative_to(tmp_path)
    # it ends with a report: the eval JSON with WAR and UAR, and its confusion matrix on screen
    report = json.loads(Path(ns["EVAL_JSON"]).read_text())
    assert 0 <= report["war"] <= 100 and 0 <= report["uar"] <= 100
    assert report["split"] == "test" and report["source"] == "raw"  # stage 3's own encoder reads raw frames
    assert Path(ns["CHECKPOINT"]).name == "stage3-best.pt"
    assert str(ns["EVAL_PNG"]) in nb.shown
    assert {r["stage"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())} == {1, 2, 3}

    # a reconnected runtime re-runs the cells: extraction and training find their work done and redo none of it
    metrics = (run_dir / "metrics.jsonl").read_text()
    checkpoints = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("stage*.pt")}
    nb.log.clear()
    for step in ("step-extract", "step-train"):
        nb.run(next(c for c in cells if step in tags(c)))
    again = "\n".join(nb.log)
    assert re.search(r"clips extracted\s*│\s*0\s", again), again
    for stage in (1, 2, 3):
        assert f"resuming stage {stage}" in again, again
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("stage*.pt")} == checkpoints
