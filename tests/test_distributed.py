"""Sharded extraction under torchrun: two processes write disjoint clips into one store (CPU, gloo)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caer.cache import FeatureCache
from conftest import assert_fp16_equal, extract_args, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _torchrun(args: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    """``caer args`` (or the Python file ``script`` with ``args``) on two processes."""
    program = [str(script)] if script else ["-m", "caer.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_two_processes_write_one_store_equal_to_a_single_process(tmp_path, dataset, weights, zarr_cache, suffix):
    out = tmp_path / f"shared.{suffix}"
    done = _torchrun(extract_args(dataset, out, weights, "--views", "2", "--workers", "0", "--batch-size", "16"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clips per torchrun process" in done.stdout
    shared, single = FeatureCache.open(out), FeatureCache.open(zarr_cache[0])
    assert sorted(shared.video_ids) == sorted(single.video_ids)
    per_rank = shared.attrs["summary"]["clips_per_rank"]
    assert len(per_rank) == 2 and min(per_rank) > 0 and sum(per_rank) == len(single.video_ids)
    assert shared.attrs["splits"] == single.attrs["splits"]
    for v in single.video_ids:
        assert shared.frame_names(v) == single.frame_names(v)
        assert_fp16_equal(shared.clip(v), single.clip(v).astype(np.float32), v)

    again = _torchrun(extract_args(dataset, out, weights, "--views", "2", "--workers", "0"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"clips extracted\W+0\W", again.stdout), again.stdout  # (a finished .h5 is left as it was)


# caer's CLI with the metrics line of the second epoch failing on rank 0: a run stopped part-way, under torchrun
STOPS_AFTER_ONE_EPOCH = """
import sys
import caer.pipeline.train as train
real = train._append_metrics
def stop(path, record):
    if record["epoch"] == 1:
        raise SystemExit("stopped on purpose")
    real(path, record)
train._append_metrics = stop
from caer.cli import main
sys.argv[0] = "caer"
main()
"""


COUNTS_VALIDATION_BATCHES = """
import os, sys
import caer.pipeline.train as train
real = train.loader_logits
def counted(model, loader, *args, **kwargs):
    stats = repr(float(sum(b.double().sum() for name, b in model.named_buffers() if "running_" in name)))
    with open(os.environ["VALIDATIONS_LOG"], "a") as log:  # one write a line: two processes printing can interleave
        log.write(f"rank {os.environ['RANK']} validates {len(loader)} batches with BatchNorm statistics {stats}\\n")
    return real(model, loader, *args, **kwargs)
train.loader_logits = counted
from caer.cli import main
sys.argv[0] = "caer"
main()
"""


def _train_stage_2(weights, zarr_cache, dataset, run_dir) -> list[str]:
    return ["train", "-c", "tiny", "--pretrained", str(weights), "--cache", str(zarr_cache[0]),
            "--train-list", str(dataset.root / "train.txt"), "--val-list", str(dataset.root / "val.txt"),
            "--stage", "2", "--epochs", "3", "--batch-size", "2", "--workers", "0", "--device", "cpu",
            "--run-dir", str(run_dir)]


def test_ddp_training_on_two_processes(tmp_path, dataset, weights, zarr_cache, monkeypatch):
    """`caer train` under torchrun: each rank trains on its share, rank 0 alone records the epochs; each rank draws
    its own dropout masks, and a run stopped part-way resumes to the same epochs as one that was not stopped."""
    run_dir = tmp_path / "run"
    counting = tmp_path / "counts.py"
    counting.write_text(COUNTS_VALIDATION_BATCHES)
    monkeypatch.setenv("VALIDATIONS_LOG", str(tmp_path / "validations.log"))
    done = _torchrun(_train_stage_2(weights, zarr_cache, dataset, run_dir), script=counting)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "validations.log").read_text()
    # each rank validates its share (3 of the 5 val clips, one padded: 2 batches of 2), and the recorded numbers are
    # those of the whole split: one process evaluating the last checkpoint on it gets them too
    n_val = sum(1 for line in (dataset.root / "val.txt").read_text().splitlines() if line.strip())
    share = math.ceil(math.ceil(n_val / 2) / 2)  # clips per rank, then batches of 2
    validations = re.findall(r"rank (\d) validates (\d+) batches with BatchNorm statistics (\S+)\n", log)
    assert sorted(v[:2] for v in validations) == sorted([("0", str(share)), ("1", str(share))] * 3), log
    for rank_1 in (v for v in validations if v[0] == "1"):  # each epoch: rank 0's statistics, not rank 1's own
        assert rank_1[2] in {v[2] for v in validations if v[0] == "0"}, log
    assert len({v[2] for v in validations}) == 3, log  # the statistics change from epoch to epoch
    assert "on 2 processes" in done.stdout and done.stdout.count("best valid UAR") == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    n_train = sum(1 for line in (dataset.root / "train.txt").read_text().splitlines() if line.strip())
    # both ranks' predictions are counted: every training clip once (not half of them, nor a rank's padding twice)
    assert all(r["train_clips"] == n_train for r in records)
    assert records[0]["losses"]["loss"] != records[-1]["losses"]["loss"]
    assert (run_dir / "stage2-best.pt").is_file() and (run_dir / "stage2-last.pt").is_file()
    states = torch.load(run_dir / "stage2-last.pt", weights_only=True)["rng_ranks"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    single = run_cli(["eval", str(run_dir / "stage2-last.pt"), "--split", "val", "--json", str(tmp_path / "val.json")])
    assert single.exit_code == 0, single.output
    report = json.loads((tmp_path / "val.json").read_text())
    assert (report["war"], report["uar"]) == (records[-1]["valid_war"], records[-1]["valid_uar"])
    assert report["confusion_matrix"] == records[-1]["valid_confusion"]

    script = tmp_path / "stops.py"
    script.write_text(STOPS_AFTER_ONE_EPOCH)
    cut = _train_stage_2(weights, zarr_cache, dataset, tmp_path / "cut")
    stopped = _torchrun(cut, script=script)
    assert stopped.returncode != 0 and "stopped on purpose" in stopped.stderr, stopped.stdout + stopped.stderr
    resumed = _torchrun([*cut, "--resume"])
    assert resumed.returncode == 0 and "resuming stage 2 at epoch 2/3" in resumed.stdout, resumed.stdout + resumed.stderr
    again = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r | {"seconds": 0} for r in again] == [r | {"seconds": 0} for r in records]


COUNTS_GRADIENT_EXCHANGES = """
import os, sys
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
import caer.pipeline.train as train
exchanges = []
def counted(process_group, bucket):
    exchanges.append(bucket.index())
    return allreduce_hook(process_group, bucket)
class Counting(train.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, counted)
train.DistributedDataParallel = Counting
from caer.cli import main
sys.argv[0] = "caer"
try:
    main()
finally:
    with open(os.environ["EXCHANGES_LOG"], "a") as log:
        log.write(f"rank {os.environ['RANK']} exchanged gradients {exchanges.count(0)} times\\n")
"""


def test_ddp_averages_gradients_once_per_accumulation_window(tmp_path, dataset, weights, zarr_cache, monkeypatch):
    """With --grad-accum 2, each rank's 3 steps an epoch (5 clips over 2 processes, batch 1) are 2 windows: the
    gradients cross processes twice an epoch, not at every backward."""
    script = tmp_path / "exchanges.py"
    script.write_text(COUNTS_GRADIENT_EXCHANGES)
    monkeypatch.setenv("EXCHANGES_LOG", str(tmp_path / "exchanges.log"))
    args = _train_stage_2(weights, zarr_cache, dataset, tmp_path / "run")
    args[args.index("--train-list") + 1] = str(dataset.root / "val.txt")  # 5 clips: 3 steps a rank
    args[args.index("--val-list") + 1] = str(dataset.root / "test.txt")
    args[args.index("--batch-size") + 1] = "1"
    done = _torchrun([*args, "--grad-accum", "2"], script=script)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "exchanges.log").read_text()
    windows = 2 * 3  # 2 an epoch, 3 epochs (9 backward passes)
    assert sorted(log.splitlines()) == [f"rank {r} exchanged gradients {windows} times" for r in (0, 1)], log
    # 6 items trained an epoch, one of them rank 1's padding: the training WAR/UAR count the 5 clips once each
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_clips"] for r in records] == [5, 5, 5]


def test_ddp_stage_3_with_prompts_that_learn_nothing_during_a_warm_up(tmp_path, dataset, weights, zarr_cache):
    """Under --iec-base desc the prompts get no gradient while MI and DC are in warm-up, though stage 3 trains them:
    DDP is told to expect that, instead of stopping at the next step with 'parameters that were not used'."""
    args = ["train", "-c", "tiny", "--pretrained", str(weights), "--cache", str(zarr_cache[0]), "--source", "raw",
            "--train-list", str(dataset.root / "train.txt"), "--val-list", str(dataset.root / "val.txt"),
            "--stage", "3", "--epochs", "2", "--batch-size", "1", "--workers", "0", "--device", "cpu",
            "--iec-base", "desc", "--slerp-weight", "0.2", "--lambda-mi", "0.1", "--mi-warmup", "1",
            "--lambda-dc", "0", "--run-dir", str(tmp_path / "run")]
    done = _torchrun(args)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["losses"]["mi"] > 0
