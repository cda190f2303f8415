"""Seeing and comparing runs (issue 13): training curves, TensorBoard events, `caer compare`, stacked config files
and the ablation configs."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys

import pytest
import yaml
from rich.console import Console

from caer.config import CONFIG_DIR, load_config, to_flat
from caer.pipeline import train as train_module
from caer.pipeline.compare import check_csv, compare_runs, read_run
from caer.pipeline.curves import curve_data, epoch_scalars, read_metrics, write_curves
from caer.pipeline.demo import ABLATIONS, run_ablations
from conftest import assert_in_output, quiet_console, run_cli, tiny_run_config, tiny_run_values

PNG = b"\x89PNG\r\n\x1a\n"
RESULT_COLUMNS = ["last stage", "best epoch", "valid WAR", "valid UAR", "test WAR", "test UAR"]


def train(dataset, cache, weights, run_dir, **overrides):
    """A tiny run on the session dataset (2 training clips, batch 1: 2 steps per epoch)."""
    settings = dict(batch_size=1) | overrides
    return train_module.run(tiny_run_config(dataset, cache, weights, run_dir, **settings), quiet_console(width=200))


def metrics(run_dir) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


# ------------------------------------------------------------------------------------------ curves

def test_curve_data_has_one_point_per_epoch_per_series_and_each_stage_writes_the_png(dataset, zarr_cache, weights,
                                                                                   tmp_path, monkeypatch):
    drawn = []
    real = train_module.write_curves
    monkeypatch.setattr(train_module, "write_curves", lambda run_dir: drawn.append(real(run_dir)) or drawn[-1])
    run_dir = tmp_path / "run"
    train(dataset, zarr_cache[0], weights, run_dir, staged_training=True, epochs_stage1=2, epochs_stage2=3,
          epochs_stage3=0, test_list=None)
    assert drawn == [run_dir / "curves.png"] * 2  # at the end of each stage
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG

    records = metrics(run_dir)
    data = curve_data(records)
    assert sorted(data) == [1, 2]  # one column of panels per stage present
    common = {"accuracy/train_war", "accuracy/valid_war", "accuracy/train_uar", "accuracy/valid_uar", "loss/loss",
              "loss/cls", "loss/mi", "loss/dc", "weight/w_mi", "weight/w_dc"}
    groups = {1: {"lr/prompt"}, 2: {"lr/adapter", "lr/temporal", "lr/fusion"}}
    for stage, epochs in ((1, 2), (2, 3)):
        mine = [r for r in records if r["stage"] == stage]
        assert data[stage]["epochs"] == list(range(1, epochs + 1))  # 1-based, as the console prints them
        assert set(data[stage]["series"]) == common | groups[stage]
        for name, values in data[stage]["series"].items():
            assert len(values) == epochs, name  # one point per epoch per series
            assert values == [epoch_scalars(r)[name] for r in mine], name
        assert data[stage]["series"]["accuracy/valid_uar"] == [r["valid_uar"] for r in mine]
        assert data[stage]["series"]["loss/mi"] == [r["losses"]["mi"] for r in mine]
        assert data[stage]["series"]["weight/w_dc"] == [r["w_dc"] for r in mine]
        assert data[stage]["series"]["lr/prompt" if stage == 1 else "lr/temporal"] == [
            r["lr"]["prompt" if stage == 1 else "temporal"] for r in mine]
        assert data[stage]["best_epoch"] == mine[-1]["best_epoch"] + 1

    other = tmp_path / "elsewhere" / "c.png"
    result = run_cli(["plot", str(run_dir), "-o", str(other)])
    assert result.exit_code == 0, result.output
    assert other.read_bytes()[:8] == PNG


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path):
    result = run_cli(["plot", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(f"{tmp_path}: no metrics.jsonl", result.output)


# ------------------------------------------------------------------------------------------ compare

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, dataset, zarr_cache, weights):
    """Two stage-2 runs that differ in exactly one setting (label smoothing), each with a test report."""
    root = tmp_path_factory.mktemp("compare")
    for name, smoothing in (("plain", 0.0), ("smooth", 0.2)):
        train(dataset, zarr_cache[0], weights, root / name, stage=2, epochs_stage2=2, label_smoothing=smoothing)
    return root / "plain", root / "smooth"


def expected_cells(run_dir, report: bool = True) -> list[str]:
    """The result cells of a run, read here from its own files."""
    last = metrics(run_dir)[-1]
    cells = ["2", str(last["best_epoch"] + 1), f"{last['best_war']:.2f}", f"{last['best_uar']:.2f}"]
    if not report:
        return cells + ["", ""] + [""] * 5
    test = json.loads((run_dir / "test_report.json").read_text())
    return cells + [f"{test['war']:.2f}", f"{test['uar']:.2f}"] + [f"{row['recall']:.2f}" for row in test["per_class"]]


def test_compare_shows_the_one_differing_setting_and_each_runs_numbers(two_runs):
    plain, smooth = two_runs
    configs = [yaml.safe_load((d / "config.yaml").read_text()) for d in two_runs]
    assert {k for k in configs[0] if configs[0][k] != configs[1][k]} == {"run_dir", "label_smoothing"}
    columns, rows = compare_runs([plain, smooth])
    classes = json.loads((plain / "test_report.json").read_text())["classes"]
    assert columns == ["run", "label_smoothing", *RESULT_COLUMNS, *(f"{c} recall" for c in classes)]
    assert rows[0] == ["plain", "0", *expected_cells(plain)]
    assert rows[1] == ["smooth", "0.2", *expected_cells(smooth)]


def test_compare_names_the_stages_of_a_staged_run_not_its_unused_stage_setting(two_runs, tmp_path):
    import shutil

    runs = {"staged": {"staged_training": True}, "stage3": {"stage": 3},
            "no_stage_3": {"staged_training": True, "epochs_stage3": 0}}
    for name, changes in runs.items():
        shutil.copytree(two_runs[0], tmp_path / name)
        config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config | changes, sort_keys=False))
    columns, rows = compare_runs([tmp_path / name for name in runs])
    stage = columns.index("stage")
    assert [row[stage] for row in rows] == ["1, 2, 3", "3", "1, 2"]


def test_compare_leaves_the_test_columns_blank_without_a_test_report(two_runs, tmp_path):
    import shutil

    plain, smooth = two_runs
    untested = tmp_path / "untested"
    shutil.copytree(smooth, untested)
    (untested / "test_report.json").unlink()
    assert read_run(untested).test_uar is None
    columns, rows = compare_runs([plain, untested])
    assert rows[0][2:] == expected_cells(plain)
    assert rows[1][2:] == expected_cells(untested, report=False)


def test_compare_shows_no_test_numbers_of_another_stage_than_the_row_s(two_runs, dataset, zarr_cache, weights,
                                                                      tmp_path):
    plain, _ = two_runs
    test = json.loads((plain / "test_report.json").read_text())
    best = metrics(plain)[-1]["best_epoch"]
    assert (test["checkpoint_stage"], test["checkpoint_epoch"]) == (2, best)  # the report says what it tested
    rerun = tmp_path / "rerun"
    shutil.copytree(plain, rerun)
    train(dataset, zarr_cache[0], weights, rerun, stage=1, epochs_stage1=1)  # stage 1 again, after stage 2
    assert json.loads((rerun / "test_report.json").read_text())["checkpoint_stage"] == 1
    columns, rows = compare_runs([plain, rerun])
    assert len(set(columns)) == len(columns)  # the setting "stage" and the result "last stage"
    cells = dict(zip(columns, rows[1]))
    assert (cells["stage"], cells["last stage"]) == ("1", "2")
    assert cells["valid UAR"] == f"{best_uar(rerun, 2):.2f}"  # stage 2's, as before the re-run
    assert cells["test WAR"] == cells["test UAR"] == "" and all(cells[c] == "" for c in columns if "recall" in c)
    assert cells["test note"] == "test_report.json is of stage 1 epoch 1, not of stage 2"
    assert dict(zip(columns, rows[0]))["test note"] == "" and rows[0][columns.index("test WAR")] != ""

    old = json.loads((plain / "test_report.json").read_text())  # as an older caer wrote it: stage in the name only
    del old["checkpoint_stage"], old["checkpoint_epoch"]
    (rerun / "test_report.json").write_text(json.dumps(old))
    assert read_run(rerun).test_uar == old["uar"]
    old["checkpoint"] = str(rerun / "stage1-best.pt")
    (rerun / "test_report.json").write_text(json.dumps(old))
    assert read_run(rerun).test_uar is None and "of stage 1, not of stage 2" in read_run(rerun).test_note


def best_uar(run_dir, stage: int) -> float:
    return [r for r in metrics(run_dir) if r["stage"] == stage][-1]["best_uar"]


def test_compare_cli_prints_markdown_and_writes_csv(two_runs, tmp_path):
    plain, smooth = two_runs
    table = tmp_path / "runs.csv"
    result = run_cli(["compare", str(plain), str(smooth), "--markdown", "--csv", str(table)])
    assert result.exit_code == 0, result.output
    columns, rows = compare_runs([plain, smooth])
    lines = [line for line in result.output.splitlines() if line.startswith("|")]
    assert lines[0] == "| " + " | ".join(columns) + " |"
    assert lines[2:] == ["| " + " | ".join(row) + " |" for row in rows]
    with open(table, newline="") as f:
        assert list(csv.reader(f)) == [columns, *rows]
    console = run_cli(["compare", str(plain), str(smooth)])
    assert console.exit_code == 0 and "test recall per class" in console.output


def test_compare_on_a_narrow_console_or_in_a_log_folds_no_cell(two_runs, tmp_path, monkeypatch):
    """Printed to a log (80 columns) with long run names, every row still holds each name and number whole."""
    import caer.cli

    runs = []
    for run in two_runs:
        runs.append(tmp_path / f"{run.name}_with_a_long_descriptive_name_for_the_log")
        shutil.copytree(run, runs[-1])
    monkeypatch.setattr(caer.cli, "console", Console(file=io.StringIO(), width=80))
    assert run_cli(["compare", *map(str, runs)]).exit_code == 0
    printed = caer.cli.console.file.getvalue().splitlines()
    columns, rows = compare_runs(runs)
    main = [i for i, c in enumerate(columns) if not c.endswith(" recall")]  # the first table's columns
    for row in rows:
        line = next(line for line in printed if row[0] in line)  # the run's name whole, on its row's one line
        assert line.split() == [row[i] for i in main]


def test_compare_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    result = run_cli(["compare", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(f"{tmp_path}: no config.yaml", result.output)


def test_compare_checks_the_csv_before_reading_any_run(two_runs, tmp_path):
    plain, smooth = two_runs
    config = plain / "config.yaml"
    kept = config.read_text()
    earlier = tmp_path / "runs.csv"
    earlier.write_text("an earlier table")
    for path, message in (
        (config, f"--csv {config} lies inside the run directory {plain}: write the output elsewhere"),
        (smooth / "table.csv", f"--csv {smooth / 'table.csv'} lies inside the run directory {smooth}"),
        (earlier, f"--csv {earlier} already exists: pass --overwrite to replace it"),
        (tmp_path, f"--csv {tmp_path} is a folder"),
    ):
        result = run_cli(["compare", str(plain), str(smooth), "--csv", str(path)])
        assert result.exit_code == 2 and "Traceback" not in result.output, (path, result.output)
        assert_in_output(f"error: {message}", result.output)
        assert "smoothing" not in result.output  # refused before the table
    assert config.read_text() == kept and earlier.read_text() == "an earlier table"
    assert not (smooth / "table.csv").exists()
    check_csv(earlier, [plain, smooth], overwrite=True)  # what --overwrite allows


def test_plot_checks_its_out_before_drawing(two_runs, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics_file = run_dir / "metrics.jsonl"
    shutil.copy(two_runs[0] / "metrics.jsonl", metrics_file)
    kept = metrics_file.read_text()
    earlier = tmp_path / "curves.png"
    earlier.write_bytes(b"an earlier picture")
    for path, message in (
        (metrics_file, f"--out {metrics_file} is the run's metrics {metrics_file}: write the output elsewhere"),
        (earlier, f"--out {earlier} already exists: pass --overwrite to replace it"),
        (tmp_path / "c.txt", f"--out {tmp_path / 'c.txt'}: '.txt' is not a picture format"),
    ):
        result = run_cli(["plot", str(run_dir), "-o", str(path)])
        assert result.exit_code == 2 and "Traceback" not in result.output, (path, result.output)
        assert_in_output(f"error: {message}", result.output)
    assert metrics_file.read_text() == kept and earlier.read_bytes() == b"an earlier picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "run"]
    (run_dir / "curves.png").write_bytes(b"drawn before")
    result = run_cli(["plot", str(run_dir)])  # RUN_DIR/curves.png is redrawn, as caer train does
    assert result.exit_code == 0, result.output
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG
    assert write_curves(run_dir, earlier, overwrite=True).read_bytes()[:8] == PNG  # what --overwrite allows


def test_compare_and_plot_overwrite_replace_an_existing_file(two_runs, tmp_path):
    plain, smooth = two_runs
    table, picture = tmp_path / "runs.csv", tmp_path / "c.png"
    table.write_text("an earlier table")
    picture.write_bytes(b"an earlier picture")
    result = run_cli(["compare", str(plain), str(smooth), "--csv", str(table), "--overwrite"])
    assert result.exit_code == 0 and table.read_text().startswith("run,"), result.output
    result = run_cli(["plot", str(plain), "-o", str(picture), "--overwrite"])
    assert result.exit_code == 0 and picture.read_bytes()[:8] == PNG, result.output


# ------------------------------------------------------------------------------------------ TensorBoard

def test_tensorboard_events_hold_each_epochs_scalars_and_confusion_matrix(dataset, zarr_cache, weights, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the optional extra: pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(dataset, zarr_cache[0], weights, run_dir, stage=2, epochs_stage2=2, test_list=None, tensorboard=True)
    events = EventAccumulator(str(run_dir / "tensorboard" / "stage2"))
    events.Reload()
    records = metrics(run_dir)
    assert set(events.Tags()["scalars"]) == set(epoch_scalars(records[0]))
    for name in epoch_scalars(records[0]):
        logged = events.Scalars(name)
        assert [e.step for e in logged] == [1, 2]
        assert [e.value for e in logged] == pytest.approx([epoch_scalars(r)[name] for r in records], rel=1e-6), name
    assert [e.step for e in events.Images("valid/confusion_matrix")] == [1, 2]


def test_tensorboard_without_the_package_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    run_dir = tmp_path / "run"
    result = run_cli(["train", "-c", "tiny", "--tensorboard", "--run-dir", str(run_dir), "--pretrained", "random"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'", result.output)
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------ config files, ablations

@pytest.mark.parametrize("name", ABLATIONS)
def test_each_ablation_file_changes_only_its_own_few_keys(name):
    own = yaml.safe_load((CONFIG_DIR / "ablations" / f"{name}.yaml").read_text())
    assert 1 <= len(own) <= 3
    base, ablated = to_flat(load_config("tiny")), to_flat(load_config(["tiny", f"ablations/{name}"]))
    assert {k for k in base if base[k] != ablated[k]} == set(own)
    assert all(ablated[k] == v for k, v in own.items())


def test_config_files_apply_in_order_and_each_is_checked_naming_it(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("lr: 0.5\nbatch_size: 3\n")
    second.write_text("lr: 0.25\n")
    cfg = load_config(["tiny", first, second], {"batch_size": 4})
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.model.num_frames) == (0.25, 4, 8)  # later file, then flags win
    second.write_text("lr: fast\n")
    result = run_cli(["train", "-c", "tiny", "-c", str(first), "-c", str(second)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(f"{second}: lr: expected float, got 'fast'", result.output)
    missing = run_cli(["train", "-c", "tiny", "-c", "ablations/no_such"])
    assert missing.exit_code == 2
    assert_in_output("ablations/no_eaa", missing.output)  # the shipped configs are listed


@pytest.mark.slow
def test_demo_ablations_train_each_config_and_compare_them(dataset, zarr_cache, weights, tmp_path):
    base = tiny_run_values(dataset, zarr_cache[0], weights, batch_size=1, staged_training=True, epochs_stage1=1,
                           epochs_stage2=1)
    out = io.StringIO()
    columns, rows = run_ablations(tmp_path / "ablations", base, Console(file=out, width=250))
    assert [row[0] for row in rows] == ["full", *ABLATIONS]
    assert columns[:6] == ["run", "streams", "adapter", "slerp_weight", "lambda_mi", "lambda_dc"]
    settings = {row[0]: row[1:6] for row in rows}
    assert settings["full"] == ["both", "true", "0.2", "0.1", "0.1"]
    assert settings["no_eaa"][1] == "false" and settings["no_iec"][2] == "0" and settings["no_mi"][3] == "0"
    assert settings["no_dc"][4] == "0" and settings["face_only"][0] == "face" and settings["context_only"][0] == "context"
    assert all(row[6] == "2" and row[11] != "" for row in rows)  # stages 1 and 2; each with a test report
    assert "test recall per class" in out.getvalue()
