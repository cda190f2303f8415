"""`caer demo` end to end, and `caer eval` on the checkpoints it leaves (issues 4 and 5).

One module-scoped demo run (a smaller size setting) provides the dataset, the cache (views 2) and
the stage 1, 2 and 3 checkpoints that the slow eval tests use; the quick ones use a one-epoch run on the
session dataset, and the metrics alone.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from caer.config import DemoConfig, EvalConfig, load_config
from caer.data.video import index_video
from caer.model.checkpoint import load_checkpoint
from caer.model.metrics import confusion_matrix, uar, uar_all_classes, war
from caer.pipeline import train as train_module
from caer.pipeline.demo import demo
from caer.pipeline.evaluate import check_finite, evaluate
from caer.pipeline.report import check_eval_outputs
from conftest import assert_in_output, quiet_console, run_cli, tiny_run_config

slow = pytest.mark.slow

CHANCE_UAR = 20.0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run-here"
    report = demo(DemoConfig(out=str(out), clips=250, frames=8), console=quiet_console(width=120))
    return out, report


def _predictions(report: dict) -> dict[str, int]:
    return {p["video_id"]: p["pred"] for p in report["predictions"]}


@slow
def test_demo_runs_every_stage_and_beats_chance(demo_run):
    out, report = demo_run
    run = out / "run"
    for stage in (1, 2, 3):
        assert (run / f"stage{stage}-best.pt").is_file() and (run / f"stage{stage}-last.pt").is_file()
    saved = json.loads((run / "test_report.json").read_text())
    assert saved == report
    assert (run / "test_confusion.png").stat().st_size > 10_000
    print(f"demo test UAR {report['uar']:.2f} WAR {report['war']:.2f}")
    assert report["uar"] > CHANCE_UAR + 30, report["uar"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {1, 2, 3}


@slow
def test_demo_ends_with_caer_predict_on_an_mp4(demo_run):
    out, report = demo_run
    saved = json.loads((out / "video" / "predict.json").read_text())
    (entry,) = saved["inputs"]
    assert entry["kind"] == "video" and entry["input"].endswith(".mp4") and saved["stage"] == 3
    # the first test clip as a lossless mp4 gets the label that the test report (stage 3, its frames) gave it
    first = (out / "data" / "test.txt").read_text().split()[0]
    assert entry["persons"][0]["label_index"] == _predictions(report)[first]
    assert index_video(out / "video" / "labelled.mp4").count == entry["frame_count"]


@slow
def test_stage3_does_not_undo_stage2(demo_run):
    out, _ = demo_run
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    best = {s: max(r["valid_uar"] for r in records if r["stage"] == s) for s in (2, 3)}
    print(f"best valid UAR: stage 2 {best[2]:.2f}, stage 3 {best[3]:.2f}")
    assert best[3] >= best[2] - 10.0, best


@slow
def test_report_metrics_equal_sklearn_over_its_own_predictions(demo_run):
    _, report = demo_run
    y = [p["label"] for p in report["predictions"]]
    pred = [p["pred"] for p in report["predictions"]]
    assert report["war"] == pytest.approx(100 * accuracy_score(y, pred), abs=0.005)
    assert report["uar"] == pytest.approx(100 * balanced_accuracy_score(y, pred), abs=0.005)
    cm = np.array(report["confusion_matrix"])
    assert cm.sum() == len(y) and [row["support"] for row in report["per_class"]] == cm.sum(1).tolist()
    for key in ("war", "uar", "per_class", "confusion_matrix", "classes", "checkpoint", "split", "source", "predictions"):
        assert key in report


@slow
def test_eval_cache_and_raw_agree_for_a_stage2_checkpoint(demo_run, tmp_path):
    out, _ = demo_run
    ckpt = out / "run" / "stage2-best.pt"
    quiet = quiet_console()
    cached = evaluate(ckpt, "test", "cache", console=quiet).as_dict()
    raw = evaluate(ckpt, "test", "raw", console=quiet).as_dict()
    assert _predictions(cached) == _predictions(raw)
    assert cached["uar"] == raw["uar"]
    # --source auto: the run's cache for a stage-2 checkpoint, raw frames for stage 3's fine-tuned encoder
    assert evaluate(ckpt, "test", "auto", console=quiet).source == "cache"
    assert evaluate(out / "run" / "stage3-best.pt", "test", "auto", console=quiet).source == "raw"


@slow
def test_stage3_checkpoint_needs_its_own_cache(demo_run, tmp_path):
    out, _ = demo_run
    ckpt = out / "run" / "stage3-best.pt"
    data = out / "data"
    refused = run_cli(["eval", str(ckpt), "--split", "test", "--source", "cache", "--device", "cpu"])
    assert refused.exit_code == 2
    assert_in_output("was extracted with another image encoder than this model's", refused.output)
    assert_in_output("caer extract --from-checkpoint", refused.output)

    new_cache = tmp_path / "stage3.zarr"
    lists = [str(data / f"{s}.txt") for s in ("train", "val", "test")]
    ignored = run_cli(["extract", *lists, "--face-boxes", str(data / "face_boxes.json"), "-o", str(new_cache),
                       "--from-checkpoint", str(ckpt), "--model", "ViT-L-14", "--preprocess", "reference"])
    assert ignored.exit_code == 2 and not new_cache.exists(), ignored.output
    assert_in_output("--model ViT-L-14, --preprocess reference would be ignored", ignored.output)
    made = run_cli(["extract", *lists, "--face-boxes", str(data / "face_boxes.json"), "-o", str(new_cache),
                    "--from-checkpoint", str(ckpt), "--device", "cpu", "--workers", "0"])
    assert made.exit_code == 0, made.output
    report = tmp_path / "r.json"
    accepted = run_cli(["eval", str(ckpt), "--source", "cache", "--cache", str(new_cache), "--device", "cpu",
                        "--json", str(report)])
    assert accepted.exit_code == 0, accepted.output
    quiet = quiet_console()
    raw = evaluate(ckpt, "test", "raw", console=quiet).as_dict()
    assert _predictions(json.loads(report.read_text())) == _predictions(raw)


@slow
def test_eval_cli_writes_json_plot_and_tta(demo_run, tmp_path):
    out, _ = demo_run
    ckpt = out / "run" / "stage2-best.pt"
    result = run_cli(["eval", str(ckpt), "--split", str(out / "data" / "val.txt"), "--tta", "flip", "--device", "cpu",
                      "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "cm.png")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    val_ids = [line.split()[0] for line in (out / "data" / "val.txt").read_text().splitlines() if line.strip()]
    assert [p["video_id"] for p in report["predictions"]] == val_ids
    assert report["tta"] == "flip"  # the report says the flip made it
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_in_output("UAR", result.output)


# ------------------------------------------------------------------------------------------ quick: a one-epoch run

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, dataset, zarr_cache, weights):
    """The best checkpoint of a one-epoch stage-2 run on the session dataset and cache (no test report)."""
    cfg = tiny_run_config(dataset, zarr_cache[0], weights, tmp_path_factory.mktemp("eval") / "run", test_list=None,
                          batch_size=4, stage=2, epochs_stage2=1)
    return train_module.run(cfg, quiet_console())[-1].best_path


def test_eval_of_an_annotation_file_labels_the_report_with_its_path(tiny_ckpt, dataset, tmp_path):
    val_list = dataset.annotations[1]
    result = run_cli(["eval", str(tiny_ckpt), "--split", str(val_list), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["split"] == str(val_list)
    assert_in_output(f"{val_list} (cache, stage 2 epoch 1): WAR", result.output)
    assert "test (" not in result.output
    ckpt = load_checkpoint(tiny_ckpt)
    assert (report["checkpoint_stage"], report["checkpoint_epoch"]) == (ckpt["stage"], ckpt["epoch"]) == (2, 0)
    val_ids = [line.split()[0] for line in val_list.read_text().splitlines() if line.strip()]
    assert [p["video_id"] for p in report["predictions"]] == val_ids


def test_eval_refuses_non_finite_logits_naming_the_clips(tiny_ckpt, dataset, tmp_path):
    ckpt = load_checkpoint(tiny_ckpt)
    for name, value in ckpt["model"].items():
        if not name.startswith("clip.") and value.is_floating_point():
            value.fill_(float("nan"))
    broken = tmp_path / "nan.pt"
    torch.save(ckpt, broken)
    result = run_cli(["eval", str(broken), "--split", "val"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    val_ids = [line.split()[0] for line in dataset.annotations[1].read_text().splitlines() if line.strip()]
    assert_in_output(f"non-finite logits (NaN/inf) for {len(val_ids)} clip(s) (first: {val_ids[0]!r}", result.output)
    assert_in_output("the features or the checkpoint hold NaN/inf", result.output)

    logits = np.zeros((4, 5), np.float32)
    logits[0, 2], logits[3, 0] = np.nan, np.inf  # rows in batch order, of the dataset's clips 2, 0, 3, 1
    with pytest.raises(ValueError, match=r"for 2 clip\(s\) \(first: 'b', 'c'\)"):
        check_finite(logits, np.array([2, 0, 3, 1]), ["a", "b", "c", "d"], use_amp=False)
    check_finite(np.zeros((2, 5)), np.array([0, 1]), ["a", "b"], use_amp=False)


def test_eval_checks_json_and_plot_before_loading_anything(tiny_ckpt, dataset, tmp_path):
    ckpt, val_list = tmp_path / "ckpt.pt", tmp_path / "val.txt"
    shutil.copy(tiny_ckpt, ckpt)
    shutil.copy(dataset.annotations[1], val_list)
    kept = {p: p.read_bytes() for p in (ckpt, val_list)}
    earlier = tmp_path / "r.json"
    earlier.write_text("an earlier report")
    (tmp_path / "folder").mkdir()
    for flags, message in (
        (["--json", str(ckpt)], f"--json {ckpt} is the checkpoint {ckpt}: write the output elsewhere"),
        (["--split", str(val_list), "--plot", str(val_list)], f"--plot {val_list} is the split's list {val_list}"),
        (["--json", str(earlier)], f"--json {earlier} already exists: pass --overwrite to replace it"),
        (["--json", str(tmp_path / "folder")], f"--json {tmp_path / 'folder'} is a folder: give the file to write"),
        (["--json", str(tmp_path / "r2.json"), "--plot", str(tmp_path / "r2.json")], "--json and --plot name the same"),
        (["--plot", str(tmp_path / "cm.txt")], f"--plot {tmp_path / 'cm.txt'}: '.txt' is not a picture format"),
        (["--plot", str(tmp_path / "cm")], f"--plot {tmp_path / 'cm'}: no suffix to name its format"),
    ):
        result = run_cli(["eval", str(ckpt), "--split", "val", *flags])
        assert result.exit_code == 2 and "Traceback" not in result.output, (flags, result.output)
        assert_in_output(f"error: {message}", result.output)
        assert "WAR" not in result.output, flags  # refused before the evaluation, not after it
    assert {p: p.read_bytes() for p in kept} == kept and earlier.read_text() == "an earlier report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "folder", "r.json", "val.txt"]
    check_eval_outputs(EvalConfig(str(ckpt), json=str(earlier)), {}, overwrite=True)  # what --overwrite allows
    with pytest.raises(ValueError, match="is the checkpoint"):
        check_eval_outputs(EvalConfig(str(ckpt), plot=str(ckpt)), {}, overwrite=True)
    (tmp_path / "c.zarr").mkdir()
    with pytest.raises(ValueError, match="lies inside the cache"):
        check_eval_outputs(EvalConfig(str(ckpt), json=str(tmp_path / "c.zarr" / "r.json")),
                           {"cache": str(tmp_path / "c.zarr")}, overwrite=True)


def test_eval_overwrite_replaces_an_existing_report(tiny_ckpt, tmp_path):
    earlier = tmp_path / "r.json"
    earlier.write_text("an earlier report")
    result = run_cli(["eval", str(tiny_ckpt), "--split", "val", "--json", str(earlier), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads(earlier.read_text())["split"] == "val"


# ------------------------------------------------------------------------------------------ quick: demo's checks

def test_demo_checks_device_and_weights_before_writing_anything(tmp_path):
    out = tmp_path / "demo"
    for flags, message in (
        (["--device", "bogus"], "--device 'bogus': expected auto, cpu, cuda or cuda:N"),
        (["--model", "bogus"], "--model 'bogus': unknown open_clip model"),
        (["--model", "ViT-B-32"], "--pretrained is needed with --model"),
        (["--pretrained", "no-such-tag"], "--pretrained 'no-such-tag': not a file and not an open_clip tag of caer-tiny"),
    ):
        result = run_cli(["demo", "--out", str(out), "--clips", "11", "--frames", "2", *flags])
        assert result.exit_code == 2 and "Traceback" not in result.output, (flags, result.output)
        assert_in_output(f"error: {message}", result.output)
        assert not out.exists(), flags  # so that the corrected command is not refused as "not empty"


# ------------------------------------------------------------------------------------------ quick: the metrics

def test_metrics_refuse_class_indices_outside_the_label_set_and_empty_input():
    with pytest.raises(ValueError, match=r"label -1 is not a class index 0..4"):
        confusion_matrix([-1, 0, 1], [4, 0, 1], 5)
    with pytest.raises(ValueError, match=r"prediction 5 is not a class index 0..4 \(2 such"):
        confusion_matrix([0, 1, 2], [5, 1, 5], 5)
    with pytest.raises(ValueError, match="no clips to score"):
        confusion_matrix([], [], 5)
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        confusion_matrix([0, 1, 2], [0, 1], 5)
    empty = np.zeros((5, 5), np.int64)
    assert all(np.isnan(f(empty)) for f in (war, uar, uar_all_classes))  # not a score of 0
    labels, preds = [0, 1, 2, 3, 4, 0, 1, 4], [0, 1, 2, 3, 3, 1, 1, 0]
    cm = confusion_matrix(np.array(labels), np.array(preds), 5)
    assert war(cm) == pytest.approx(100 * accuracy_score(labels, preds))
    assert uar(cm) == pytest.approx(100 * balanced_accuracy_score(labels, preds))


def test_demo_epochs_are_stage_2s_only(tmp_path, monkeypatch):
    """--epochs of caer demo is the stage-2 count (its help); stages 1 and 3 keep configs/tiny.yaml's."""
    import caer.pipeline.demo as demo_module

    tiny = load_config("tiny")
    seen = []

    def stop_at_training(cfg, console=None):
        seen.append([cfg.stage_epochs(stage) for stage in (1, 2, 3)])
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "run", stop_at_training)
    with pytest.raises(KeyboardInterrupt):
        demo(DemoConfig(out=str(tmp_path / "demo"), epochs=7), quiet_console())
    assert seen == [[tiny.stage_epochs(1), 7, tiny.stage_epochs(3)]]
