"""`caer train` stage 2 from the feature cache, end to end on a `caer synth` dataset (tiny random CLIP).

- it learns: valid UAR far above chance (20 % for 5 classes);
- both streams are needed: face-only misses the context classes (2, 4), context-only the face classes (1, 3);
- ``--resume`` after a SIGKILL, or after a crash at any point of an epoch's bookkeeping, ends with exactly the
  metrics of an uninterrupted run;
- the CLI: both spellings of ``--lambda-mi``, flags over config-file values, the resolved ``config.yaml``, and
  a cache of another image encoder refused with exit code 2.

One module-scoped dataset (250 clips of ~8 frames) is extracted once (2 views) and shared by every test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from caer.cache import FeatureCache
from caer.config import CONFIG_DIR, DEFAULT_DESCRIPTIONS, RunConfig, SynthConfig, load_config
from caer.data.loaders import make_loader, split_dataset
from caer.data.synth import synthesise
from caer.model.checkpoint import build_model
from caer.model.encoder import save_random_weights
from caer.model.metrics import confusion_matrix, uar
from caer.pipeline import train as train_module
from caer.pipeline.curves import read_metrics
from caer.pipeline.evaluate import loader_logits
from caer.pipeline.extract import extract
from caer.pipeline.train import train_stage
from conftest import NUM_CLASSES, Dataset, assert_in_output, quiet_console, run_cli, settings_for, tiny_run_config

pytestmark = pytest.mark.slow

CHANCE_UAR = 100.0 / NUM_CLASSES
FACE_CLASSES = (1, 3)  # odd classes: a texture visible only in the face crop
CONTEXT_CLASSES = (2, 4)  # even classes: a desk-object colour visible only in the context view

# configs/tiny.yaml with lr 1e-3 instead of its 3e-3, and 15 epochs whatever the file says: with 3e-3 (AdamW)
# an occasional seed stalls (seed 3 of 0-5: best valid UAR 66, train UAR 70); with 1e-3 seeds 0-5 all reached
# a best valid UAR of 80-90 in 15 epochs (about 6 s each here).
LR = 1e-3
EPOCHS = 15


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Dataset:
    """250 clips (150 train, 50 val, 50 test) of 4..12 frames, 128x96."""
    root = tmp_path_factory.mktemp("train-synth") / "ds"
    synthesise(SynthConfig(str(root), clips=250, frames=8, classes=NUM_CLASSES, seed=0))
    return Dataset(root)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synth, clip_model) -> Path:
    out = tmp_path_factory.mktemp("train-cache") / "features.zarr"
    extract(settings_for(synth, out, views=2, batch_size=64), clip_model, quiet_console(width=120))
    return out


def run_config(synth: Dataset, cache: Path, weights: Path, run_dir: Path, **kw) -> RunConfig:
    """Stage 2 of configs/tiny.yaml on ``synth`` at LR for EPOCHS epochs; ``kw`` win. face_boxes=None: not given,
    as these runs never named a box file."""
    settings = dict(stage=2, lr=LR, seed=0, epochs=EPOCHS, face_boxes=None) | kw
    return tiny_run_config(synth, cache, weights, run_dir, **settings)


def comparable(records: list[dict]) -> list[dict]:
    """Metric records without the wall-clock time."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth, cache, weights):
    """Stage 2 runs by ``streams`` (both, face, context), trained on demand and kept for the module.

    Each entry: config, StageResult, metrics records, and the best checkpoint's confusion matrix over
    val + test pooled (about 20 clips per class).
    """
    runs: dict[str, dict] = {}

    def get(streams: str) -> dict:
        if streams not in runs:
            run_dir = tmp_path_factory.mktemp(f"run-{streams}")
            cfg = run_config(synth, cache, weights, run_dir, streams=streams)
            started = time.perf_counter()
            result = train_stage(cfg, 2, quiet_console(width=120))
            seconds = time.perf_counter() - started
            model, clip = build_model(cfg, torch.device("cpu"), torch.load(result.best_path, weights_only=False))
            feature_cache = FeatureCache.open(cache)
            cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
            for split in ("val", "test"):
                data = split_dataset(cfg, split, False, clip.preprocess, feature_cache, "cache")
                labels, logits = loader_logits(model, make_loader(data, cfg, False), torch.device("cpu"))
                cm += confusion_matrix(labels, logits.argmax(1), NUM_CLASSES)
            metrics = read_metrics(run_dir / "metrics.jsonl")
            runs[streams] = {"cfg": cfg, "result": result, "metrics": metrics, "cm": cm, "seconds": seconds}
        return runs[streams]

    return get


def recalls(cm: np.ndarray) -> np.ndarray:
    return np.diag(cm) / np.maximum(cm.sum(1), 1)


# ------------------------------------------------------------------------------------ learning

def test_stage2_from_cache_reaches_valid_uar_far_above_chance(trained):
    run = trained("both")
    records = run["metrics"]
    cfg = run["cfg"]
    assert [r["epoch"] for r in records] == list(range(cfg.stage_epochs(2)))
    assert all(r["stage"] == 2 for r in records)
    best, last = records[-1]["best_uar"], records[-1]["valid_uar"]
    print(f"\nstage 2 from the cache, {len(records)} epochs in {run['seconds']:.1f} s: valid UAR "
          f"{records[0]['valid_uar']:.2f} (epoch 1) -> {last:.2f} (last), best {best:.2f} (chance {CHANCE_UAR:.0f})")
    assert best == max(r["valid_uar"] for r in records) == run["result"].best["valid_uar"]
    # measured: 84.00 best, 82.00 last (seed 0); seeds 0-5 gave 80-90 best
    assert best >= 60.0, f"best valid UAR {best:.2f} is not far above chance ({CHANCE_UAR:.0f})"
    assert last >= 60.0, f"last valid UAR {last:.2f} is not far above chance ({CHANCE_UAR:.0f})"
    assert records[-1]["train_uar"] >= 60.0
    # the loss went down
    assert records[-1]["losses"]["cls"] < records[0]["losses"]["cls"]


def test_both_streams_beat_single_streams_on_the_classes_that_need_the_other_stream(trained):
    both, face, context = (recalls(trained(s)["cm"]) for s in ("both", "face", "context"))
    ctx_cls, face_cls = list(CONTEXT_CLASSES), list(FACE_CLASSES)
    print("\nper-class recall (val + test pooled, best checkpoint):")
    for name, r in (("both", both), ("face", face), ("context", context)):
        print(f"  {name:8s} {np.round(100 * r, 1)}  UAR {100 * r.mean():.2f}")
    print(f"  classes {CONTEXT_CLASSES} (context only): both {100 * both[ctx_cls].mean():.1f} vs face-only "
          f"{100 * face[ctx_cls].mean():.1f}")
    print(f"  classes {FACE_CLASSES} (face only): both {100 * both[face_cls].mean():.1f} vs context-only "
          f"{100 * context[face_cls].mean():.1f}")
    # The classes a single stream cannot see are where it loses. Measured (seed 0): 97.5 vs 27.5 on the context
    # classes, 87.5 vs 40.0 on the face classes; over seeds 0-5 the margins were 62-70 and 27-48 points.
    assert both[ctx_cls].mean() >= face[ctx_cls].mean() + 0.25
    assert both[face_cls].mean() >= context[face_cls].mean() + 0.2
    # ... while each single stream does see its own classes, and both streams see all of them
    assert face[face_cls].mean() >= 0.7 and context[ctx_cls].mean() >= 0.7
    assert both[face_cls + ctx_cls].min() >= 0.6
    assert both.mean() > max(face.mean(), context.mean())


# ------------------------------------------------------------------------------------ resume

def cli_train_args(synth: Dataset, cache: Path, weights: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train", "-c", "tiny", "--stage", "2", "--pretrained", str(weights), "--cache", str(cache),
        "--train-list", str(synth.root / "train.txt"), "--val-list", str(synth.root / "val.txt"),
        "--run-dir", str(run_dir), "--lr", str(LR), "--seed", "0", *extra,
    ]


def popen_caer(args: list[str], log: Path) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "120"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "caer.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def test_resume_after_sigkill_gives_the_metrics_of_an_uninterrupted_run(tmp_path, synth, cache, weights):
    epochs = 12
    # --lambda_mi (underscore) and an --epochs flag over the config file's 15: both must reach config.yaml
    extra = ("--epochs", str(epochs), "--lambda_mi", "0.3")
    full_dir, cut_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
    full = popen_caer(cli_train_args(synth, cache, weights, full_dir, *extra), tmp_path / "full.log")
    cut = popen_caer(cli_train_args(synth, cache, weights, cut_dir, *extra), tmp_path / "cut.log")
    try:
        metrics = cut_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while cut.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                cut.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        assert cut.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed:\n" + (tmp_path / "cut.log").read_text()
        done_before = len(read_metrics(cut_dir / "metrics.jsonl"))
        assert 2 <= done_before < epochs
        assert full.wait(timeout=180) == 0, (tmp_path / "full.log").read_text()
    finally:
        for p in (full, cut):
            if p.poll() is None:
                p.kill()
                p.wait()

    resumed = popen_caer(cli_train_args(synth, cache, weights, cut_dir, *extra, "--resume"), tmp_path / "resume.log")
    assert resumed.wait(timeout=180) == 0, (tmp_path / "resume.log").read_text()
    log = (tmp_path / "resume.log").read_text()
    assert "resuming stage 2" in log

    expected, got = read_metrics(full_dir / "metrics.jsonl"), read_metrics(cut_dir / "metrics.jsonl")
    print(f"\nkilled after {done_before} of {epochs} epochs; resumed run's last record: loss "
          f"{got[-1]['losses']['loss']:.6f}, valid WAR {got[-1]['valid_war']:.2f} UAR {got[-1]['valid_uar']:.2f}")
    assert [r["epoch"] for r in expected] == list(range(epochs))
    assert comparable(got) == comparable(expected)  # every epoch: losses, WAR/UAR, bests, confusion, lr

    # the checkpoints agree too
    ck_full = torch.load(full_dir / "stage2-last.pt", weights_only=False)
    ck_cut = torch.load(cut_dir / "stage2-last.pt", weights_only=False)
    assert ck_full["epoch"] == ck_cut["epoch"] == epochs - 1 and ck_full["best"] == ck_cut["best"]
    for key, value in ck_full["model"].items():
        assert torch.equal(value, ck_cut["model"][key]), key

    # the resolved config is saved in the run directory: config-file values, with the flags on top
    saved = yaml.safe_load((full_dir / "config.yaml").read_text())
    tiny = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    assert saved["epochs"] == epochs != tiny["epochs"]
    assert saved["lambda_mi"] == 0.3 != tiny["lambda_mi"]
    assert saved["lr"] == LR != tiny["lr"]
    assert saved["num_frames"] == tiny["num_frames"] and saved["descriptions"] == DEFAULT_DESCRIPTIONS
    assert saved["run_dir"] == str(full_dir) and saved["cache"] == str(cache)
    assert load_config(full_dir / "config.yaml").to_dict() == saved  # and it loads back as a config


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, synth, cache, weights):
    """An uninterrupted 5-epoch stage-2 run (the reference for the in-process crash tests)."""
    run_dir = tmp_path_factory.mktemp("short")
    cfg = run_config(synth, cache, weights, run_dir, epochs=5)
    train_stage(cfg, 2, quiet_console(width=120))
    return run_dir


@pytest.mark.parametrize("where, epoch", [
    ("metrics line", None), ("best checkpoint", None), ("last checkpoint", None), ("last checkpoint", 0),
])
def test_resume_after_a_crash_while_an_epoch_is_being_recorded(where, epoch, tmp_path, monkeypatch, synth, cache,
                                                               weights, short_run):
    """A stop between (or inside) the writes that end an epoch must not lose or duplicate an epoch on resume.

    ``metrics line``: the process dies before the epoch's line is appended; ``last checkpoint`` / ``best
    checkpoint``: it dies half-way through writing that file (a truncated file is left behind). The epoch is
    one (after the first) that improves the best valid UAR, so that it writes a best checkpoint; or epoch 0,
    before any last checkpoint exists (the resumed run starts afresh).
    """
    reference = read_metrics(short_run / "metrics.jsonl")
    improving = [e for e in range(1, len(reference))
                 if reference[e]["valid_uar"] > max(r["valid_uar"] for r in reference[:e])]
    assert improving, "the reference run never improved after its first epoch"
    crash_epoch = improving[0] if epoch is None else epoch
    run_dir = tmp_path / "run"
    cfg = run_config(synth, cache, weights, run_dir, epochs=5)
    real_save, real_append = torch.save, train_module._append_metrics

    def save(obj, f, *a, **kw):
        name = Path(f).name
        target = "stage2-last.pt" if where == "last checkpoint" else "stage2-best.pt"
        if isinstance(obj, dict) and obj.get("epoch") == crash_epoch and target in name:  # (its temporary file)
            Path(f).write_bytes(b"PK\x03\x04 truncated")
            raise Crash(where)
        return real_save(obj, f, *a, **kw)

    def append(path, record):
        if where == "metrics line" and record["epoch"] == crash_epoch:
            raise Crash(where)
        return real_append(path, record)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(train_module, "_append_metrics", append)
    with pytest.raises(Crash):
        train_stage(cfg, 2, quiet_console(width=120))
    monkeypatch.undo()

    resumed = run_config(synth, cache, weights, run_dir, epochs=5, resume=True)
    result = train_stage(resumed, 2, quiet_console(width=120))
    assert comparable(read_metrics(run_dir / "metrics.jsonl")) == comparable(reference)
    best = torch.load(result.best_path, weights_only=False)
    expected = torch.load(short_run / "stage2-best.pt", weights_only=False)
    assert best["epoch"] == expected["epoch"] == result.best["epoch"]
    for key, value in expected["model"].items():
        assert torch.equal(value, best["model"][key]), key


def test_a_fresh_run_replaces_the_stage_records_of_an_earlier_run_in_the_same_directory(tmp_path, synth, cache, weights):
    run_dir = tmp_path / "run"
    for _ in range(2):
        train_stage(run_config(synth, cache, weights, run_dir, epochs=2), 2, quiet_console(width=120))
    assert [(r["stage"], r["epoch"]) for r in read_metrics(run_dir / "metrics.jsonl")] == [(2, 0), (2, 1)]


def test_a_run_dir_that_holds_a_stage_is_not_trained_over_without_resume_or_overwrite(tmp_path, synth, cache, weights):
    """The second `caer train` of a stage into the same run dir would replace the first one's best checkpoint without
    a word: refused, naming --resume and --overwrite. The next stage into it (stage N starts from stage N-1's best)
    is not refused."""
    run_dir = tmp_path / "run"
    first = run_cli(cli_train_args(synth, cache, weights, run_dir, "--epochs", "1"))
    assert first.exit_code == 0, first.output
    best = (run_dir / "stage2-best.pt").read_bytes()
    again = run_cli(cli_train_args(synth, cache, weights, run_dir, "--epochs", "1"))
    assert again.exit_code == 2 and "Traceback" not in again.output, again.output
    assert_in_output(f"--run-dir {run_dir} already holds stage 2 of an earlier run: --resume to go on with it, "
                     "--overwrite to replace it", again.output)
    assert (run_dir / "stage2-best.pt").read_bytes() == best
    replaced = run_cli(cli_train_args(synth, cache, weights, run_dir, "--epochs", "2", "--overwrite"))
    assert replaced.exit_code == 0, replaced.output
    assert [(r["stage"], r["epoch"]) for r in read_metrics(run_dir / "metrics.jsonl")] == [(2, 0), (2, 1)]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["overwrite"] is False  # -c config.yaml refuses too
    args = cli_train_args(synth, cache, weights, run_dir, "--epochs", "1")
    args[args.index("--stage") + 1] = "3"
    next_stage = run_cli(args)
    assert next_stage.exit_code == 0, next_stage.output
    assert_in_output(f"stage 3 starts from {run_dir / 'stage2-best.pt'}", next_stage.output)


# ------------------------------------------------------------------------------------ the CLI

@pytest.fixture
def captured(monkeypatch):
    """Run `caer train` in-process with the training itself replaced: returns the resolved configs."""
    configs = []

    def fake_run(cfg, console=None):
        configs.append(cfg)
        return []

    monkeypatch.setattr(train_module, "run", fake_run)
    return configs


def test_cli_lambda_mi_spellings_and_flags_over_config_values(tmp_path, captured):
    for flag in ("--lambda_mi", "--lambda-mi"):
        result = run_cli(["train", "-c", "tiny", flag, "0.42", "--lambda_dc", "0.05"])
        assert result.exit_code == 0, result.output
        assert captured[-1].loss.lambda_mi == 0.42 and captured[-1].loss.lambda_dc == 0.05
    result = run_cli(["train", "-c", "tiny", "--lambda-dc", "0.07"])
    assert result.exit_code == 0, result.output
    assert captured[-1].loss.lambda_dc == 0.07
    assert captured[-1].loss.lambda_mi == 0.1  # configs/tiny.yaml's value stands when no flag is given

    own = tmp_path / "mine.yaml"
    tiny = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    tiny.pop("lambda_mi")
    own.write_text(yaml.safe_dump(tiny | {"lr": 0.005, "lambda-mi": 0.3, "batch_size": 4, "streams": "face"}))
    result = run_cli(["train", "--config", str(own), "--lr", "0.002", "--streams", "context"])
    assert result.exit_code == 0, result.output
    cfg = captured[-1]
    assert (cfg.optim.lr, cfg.model.streams) == (0.002, "context")  # flags win
    assert (cfg.loss.lambda_mi, cfg.optim.batch_size) == (0.3, 4)  # the file's values (a dashed key too) win over defaults
    result = run_cli(["train", "--config", str(own), "--no-resume", "--resume"])
    assert result.exit_code == 0 and captured[-1].run.resume is True


def test_cli_refuses_a_cache_of_another_image_encoder(tmp_path, synth, cache, weights):
    other = save_random_weights("caer-tiny", tmp_path / "other.pt", seed=1)
    args = cli_train_args(synth, cache, other, tmp_path / "run", "--epochs", "1")
    args[args.index("--pretrained") + 1] = str(other)
    result = run_cli(args)
    assert result.exit_code == 2, result.output
    assert_in_output("was extracted with another image encoder than this model's", result.output)
    assert_in_output("Re-extract the cache for this model", result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "stage2-last.pt").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()

    # another model, or a --pretrained tag (perhaps a download), is refused before any weights are loaded
    for changed in ({"--model": "ViT-B-32-quickgelu", "--pretrained": "openai"}, {"--model": "ViT-B-32-quickgelu"}):
        args = cli_train_args(synth, cache, weights, tmp_path / "tag", "--epochs", "1")
        for flag, value in changed.items():
            args = args[:args.index(flag)] + args[args.index(flag) + 2:] if flag in args else args
            args += [flag, value]
        result = run_cli(args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert_in_output(f"{cache} was extracted with --model caer-tiny and weights sha256:", result.output)
        assert_in_output("Train with the cache's encoder (--model caer-tiny --pretrained the weights file it was "
                         "extracted from)", result.output)

    # the same flags with the cache's own weights are accepted
    ok = run_cli(cli_train_args(synth, cache, weights, tmp_path / "ok", "--epochs", "1"))
    assert ok.exit_code == 0, ok.output
    assert len(read_metrics(tmp_path / "ok" / "metrics.jsonl")) == 1


def test_input_norm_is_what_lets_stage2_learn_quickly(trained, synth, cache, weights, tmp_path):
    """The README's reason for the BatchNorm before the temporal encoders: without it, the same 15 epochs learn far less."""
    with_norm = trained("both")["metrics"][-1]["best_uar"]
    cfg = run_config(synth, cache, weights, tmp_path / "no-norm", input_norm=False)
    train_stage(cfg, 2, quiet_console(width=120))
    without = read_metrics(tmp_path / "no-norm" / "metrics.jsonl")[-1]["best_uar"]
    print(f"\nbest valid UAR after {EPOCHS} epochs: with input norm {with_norm:.2f}, without {without:.2f}")
    assert with_norm >= without + 15, (with_norm, without)


def _valid_record(correct: list[int], support=(83, 51, 37, 29, 64)) -> dict:
    """An epoch record whose valid confusion has ``correct`` right per class (the rest one class over)."""
    cm = np.zeros((5, 5), dtype=int)
    for k, (n, right) in enumerate(zip(support, correct)):
        cm[k, k], cm[k, (k + 1) % 5] = right, n - right
    return {"valid_uar": round(uar(cm), 2), "valid_confusion": cm.tolist()}


def test_the_best_epoch_is_chosen_on_the_unrounded_uar():
    """UARs of 70.0091 and 70.0051 are both recorded as 70.01: the later, lower one must not take the best."""
    higher, lower = _valid_record([75, 26, 28, 20, 41]), _valid_record([50, 37, 24, 17, 60])
    assert higher["valid_uar"] == lower["valid_uar"] == 70.01
    best = {"valid_uar": higher["valid_uar"], "exact_uar": uar(np.asarray(higher["valid_confusion"]))}
    assert not train_module.beats_best(lower, best)
    assert train_module.beats_best(higher, best)  # a tie goes to the later epoch
    assert train_module.beats_best(lower, {"valid_uar": 70.0, "epoch": 0})  # a best from an older checkpoint


@pytest.mark.parametrize("size, world", [(10, 4), (3, 8), (1, 4), (5, 1), (0, 2)])
def test_every_rank_gets_the_same_number_of_items_even_with_fewer_clips_than_processes(size, world):
    """DDP steps all ranks together: a rank with fewer batches would leave the others waiting in a collective."""
    from caer.data.datasets import EpochSampler

    shares = [list(EpochSampler(size, seed=0, rank=r, world=world)) for r in range(world)]
    assert {len(share) for share in shares} == {-(-size // world)}
    assert {i for share in shares for i, _ in share} == set(range(size))  # every clip is in the epoch
    # each rank's own items (what the training WAR/UAR count) cover the epoch's order once: no padding twice
    sampler = EpochSampler(size, seed=0, world=world)
    own = [i for r, share in enumerate(shares) for i, _ in share[: sampler.own_items(r)]]
    assert sorted(own) == list(range(size))


def test_a_short_last_accumulation_window_is_averaged_over_its_own_steps():
    # 7 steps with --grad-accum 3: windows of 3, 3 and 1 step
    assert [train_module.window_size(step, 3, 7) for step in range(7)] == [3, 3, 3, 3, 3, 3, 1]
    assert [train_module.window_size(step, 1, 4) for step in range(4)] == [1, 1, 1, 1]
    assert [train_module.window_size(step, 4, 6) for step in range(6)] == [4, 4, 4, 4, 2, 2]


def test_overwrite_notes_the_later_stages_it_leaves_and_refuses_resume_beside_it(tmp_path, synth, cache, weights):
    run_dir = tmp_path / "run"
    for stage in ("2", "3"):
        args = cli_train_args(synth, cache, weights, run_dir, "--epochs", "1")
        args[args.index("--stage") + 1] = stage
        assert run_cli(args).exit_code == 0
    again = run_cli(cli_train_args(synth, cache, weights, run_dir, "--epochs", "1", "--overwrite"))
    assert again.exit_code == 0, again.output
    assert_in_output(f"note: {run_dir} keeps the earlier run's stage 3 (checkpoints, metrics): it does not follow "
                     "from the stages trained now", again.output)
    both = run_cli(cli_train_args(synth, cache, weights, run_dir, "--epochs", "1", "--overwrite", "--resume"))
    assert both.exit_code == 2 and "give one of them" in both.output, both.output


def test_metrics_record_the_uar_over_every_class_beside_the_uar_over_the_classes_present(tmp_path, synth, cache,
                                                                                          weights):
    """With a class absent from the val list the two definitions differ: the seed code's scores it 0."""
    val = tmp_path / "val.txt"
    lines = (synth.root / "val.txt").read_text().splitlines()
    val.write_text("\n".join(line for line in lines if line.split()[2] != lines[0].split()[2]) + "\n")
    args = cli_train_args(synth, cache, weights, tmp_path / "run", "--epochs", "1")
    args[args.index("--val-list") + 1] = str(val)
    assert run_cli(args).exit_code == 0
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    cm = np.asarray(record["valid_confusion"], dtype=float)
    recall = np.divide(np.diag(cm), cm.sum(1), out=np.zeros(len(cm)), where=cm.sum(1) > 0)
    assert record["valid_uar_all_classes"] == round(100 * recall.mean(), 2)
    present = cm.sum(1) > 0
    assert not present.all() and record["valid_uar"] == round(100 * recall[present].mean(), 2)
