"""The stages on the synthetic dataset (SPEC section 7): frozen means frozen, and the cache path gives the raw path's
logits to float16 precision."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from torch.utils.data import default_collate

from caer.cache import CacheError, FeatureCache
from caer.config import load_config
from caer.data.loaders import make_loader, split_dataset
from caer.model.checkpoint import build_model
from caer.pipeline import train as train_module
from caer.pipeline.evaluate import evaluate, loader_logits
from caer.pipeline.extract import extract
from caer.pipeline.run_dir import RunDir
from caer.pipeline.train import make_optimizer, train_stage
from conftest import assert_fp16_equal, one_epoch_config, quiet_console, settings_for

# ------------------------------------------------------------------------------------------ frozen means frozen

def snapshot(model: torch.nn.Module) -> dict[str, bytes]:
    """Bytes of every parameter and every buffer (non-persistent ones included), by name."""
    out = {f"param {n}": p.detach().cpu().numpy().tobytes() for n, p in model.named_parameters()}
    out |= {f"buffer {n}": b.detach().cpu().numpy().tobytes() for n, b in model.named_buffers()}
    return out


@pytest.fixture
def held_models(monkeypatch):
    """Hold on to the model train_stage builds, with a snapshot of its bytes taken before any training."""
    held = []
    real = train_module.build_model

    def spy(*args, **kwargs):
        model, clip = real(*args, **kwargs)
        held.append((model, snapshot(model)))
        return model, clip

    monkeypatch.setattr(train_module, "build_model", spy)
    return held


TEMPORAL = ("adapter.", "temporal_face.", "temporal_context.", "fusion.", "norm_face.", "norm_context.")


def trainable(stage: int, name: str) -> bool:
    """What SPEC section 7's table says a stage trains (``name`` without the param/buffer prefix)."""
    if stage == 1:
        return name == "prompt_learner.ctx"
    if stage == 2:
        return name.startswith(TEMPORAL)
    return name == "prompt_learner.ctx" or name.startswith(TEMPORAL) or name.startswith("clip.visual.")


def may_change(stage: int, key: str) -> bool:
    kind, name = key.split(" ", 1)
    if kind == "param":
        return trainable(stage, name)
    # BatchNorm running statistics follow their module: updated only while it trains
    return trainable(stage, name) and name.startswith(("norm_face.", "norm_context.", "clip.visual."))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_frozen_means_frozen(stage, dataset, zarr_cache, weights, tmp_path, held_models):
    cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", stage=stage)
    result = train_stage(cfg, stage, quiet_console(width=200))
    (model, before), = held_models
    after = snapshot(model)
    assert before.keys() == after.keys()

    frozen = [k for k in before if not may_change(stage, k)]
    assert any(k.startswith("param clip.transformer.") for k in frozen)  # the text tower is among them
    assert "buffer t_desc" in frozen and "buffer prompt_learner.suffix" in frozen
    if stage != 3:
        assert any(k.startswith("param clip.visual.") for k in frozen)
    if stage == 1:  # BatchNorm of the frozen temporal side: its running statistics must not move
        assert "buffer norm_face.running_mean" in frozen and "buffer norm_context.running_var" in frozen
    changed_frozen = [k for k in frozen if before[k] != after[k]]
    assert not changed_frozen, f"stage {stage} changed frozen tensors: {changed_frozen[:10]}"

    params = [k for k in before if k.startswith("param ") and may_change(stage, k)]
    unchanged = [k for k in params if before[k] == after[k]]
    assert params and not unchanged, f"stage {stage} left trainable parameters untouched: {unchanged[:10]}"
    if stage == 3:
        assert any(k.startswith("param clip.visual.") for k in params)  # the image encoder did change

    # the saved checkpoint holds exactly the trained weights (and CLIP's image tower only once it has changed)
    ckpt = torch.load(result.last_path, map_location="cpu", weights_only=False)
    live = model.state_dict()
    assert ckpt["model"] and all(torch.equal(v, live[k]) for k, v in ckpt["model"].items())
    assert any(k.startswith("clip.visual.") for k in ckpt["model"]) == (stage == 3)
    assert not any(k.startswith("clip.") and not k.startswith("clip.visual.") for k in ckpt["model"])


# ------------------------------------------------------------------------------------------ cache == raw

FP16_UNIT_ROUNDOFF = 2.0**-11


def gather(dataset, keys):
    return default_collate([dataset[k] for k in keys])


def test_raw_frames_without_a_cache_are_found_under_the_training_list_s_folder(dataset, zarr_cache, weights,
                                                                               tmp_path):
    """One dataset root for every split when --root is not given (as caer extract has), even when the val list
    lives in another folder."""
    (tmp_path / "splits").mkdir()
    val_list = tmp_path / "splits" / "val.txt"
    val_list.write_text((dataset.root / "val.txt").read_text())
    cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", val_list=str(val_list))
    _, clip = build_model(cfg, torch.device("cpu"))
    val = split_dataset(cfg, "val", False, clip.preprocess, None, "raw")  # no cache (so no root of its own)
    assert len(val) == len((dataset.root / "val.txt").read_text().split())  // 3
    assert val[(0, 0)].face.shape[0] == cfg.model.num_frames  # (clip, epoch): its frames are read


@pytest.mark.parametrize("split, train", [("val", False), ("train", True), ("test", True)])
def test_cache_and_raw_give_the_same_logits(split, train, dataset, zarr_cache, weights, tmp_path):
    # T = 4 < every clip's length but one, so training-time sampling really draws frames
    cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", num_frames=4)
    cache = FeatureCache.open(zarr_cache[0])
    assert cache.views == 2  # the conftest cache holds the flipped view
    device = torch.device("cpu")
    model, clip = build_model(cfg, device)
    model.eval()  # no dropout; BatchNorm uses its running statistics
    with torch.no_grad():
        model.adapter.up.weight.normal_(0, 0.05)  # a non-identity adapter, so the whole face path is exercised
        text = model.text_features()
    cached = split_dataset(cfg, split, train, clip.preprocess, cache, "cache")
    raw = split_dataset(cfg, split, train, clip.preprocess, cache, "raw")
    assert len(cached) == len(raw) and cached.labels == raw.labels

    epochs = range(3) if train else range(1)
    flips, frames_by_epoch = [], []
    for epoch in epochs:
        keys = [(i, epoch) for i in range(len(cached))]
        bc, br = gather(cached, keys), gather(raw, keys)
        assert bc.face.dtype == torch.float16 and br.face.dtype == torch.uint8  # one record type, two sources
        assert torch.equal(bc.label, br.label) and torch.equal(bc.index, br.index)
        flips += br.flip.tolist()
        with torch.no_grad():
            logits_cache = model(bc.face, bc.context, text, bc.flip)
            logits_raw = model(br.face, br.context, text, br.flip)
            face, context = model.frame_features(br.face, br.context, br.flip)  # the raw path's features [B, T, D]
            logits_rounded = model(face.half().float(), context.half().float(), text)
        # the same frames and the same view: the cached features are the raw ones stored in float16
        assert_fp16_equal(bc.face.numpy(), face.numpy(), f"{split} epoch {epoch} face")
        assert_fp16_equal(bc.context.numpy(), context.numpy(), f"{split} epoch {epoch} context")
        frames_by_epoch.append(bc.face)

        # Tolerance: float16 storage perturbs each feature by at most a relative 2^-11 (~4.9e-4). Logits are
        # cos(z, t) / tau with |cos| <= 1, so they live on a scale of 1 / tau; allowing the model a gain of 2 on
        # that relative perturbation gives atol = 2 * 2^-11 / tau (~9.8e-3 at tau = 0.1). We see ~2e-4.
        atol = 2 * FP16_UNIT_ROUNDOFF / cfg.model.temperature
        diff = (logits_cache - logits_raw).abs().max().item()
        assert diff <= atol, f"{split} epoch {epoch}: cache and raw logits differ by {diff:.3g} > {atol:.3g}"
        # the raw path rounds a frozen encoder's features to float16 as the cache stores them: what is left is the
        # encoder's float32 noise between batch compositions, which moves a rare feature by one float16 step
        assert torch.equal(logits_raw, logits_rounded)
        assert torch.allclose(logits_cache, logits_raw, atol=atol / 10, rtol=0)
        margin = logits_raw.topk(2, dim=1).values
        clear = (margin[:, 0] - margin[:, 1]) > 2 * atol
        assert torch.equal(logits_cache.argmax(1)[clear], logits_raw.argmax(1)[clear])

    if train:  # both views were drawn, and the frames changed with the epoch
        assert any(flips) and not all(flips), flips
        assert any(not torch.equal(frames_by_epoch[0], f) for f in frames_by_epoch[1:])
    else:
        assert not any(flips)


# ------------------------------------------------------------------------------------------ chaining single stages

def test_a_single_stage_starts_from_the_previous_stage_of_its_run_dir(dataset, zarr_cache, weights, tmp_path):
    quiet = quiet_console()
    run_dir = tmp_path / "run"
    train_module.run(one_epoch_config(dataset, zarr_cache[0], weights, run_dir, stage=1, test_list=None), quiet)
    out = io.StringIO()
    train_module.run(one_epoch_config(dataset, zarr_cache[0], weights, run_dir, stage=2, test_list=None), Console(file=out))
    assert "stage 2 starts from" in out.getvalue()
    stage1 = torch.load(run_dir / "stage1-best.pt", weights_only=False)["model"]
    stage2 = torch.load(run_dir / "stage2-best.pt", weights_only=False)["model"]
    key = "prompt_learner.ctx"
    assert torch.equal(stage1[key], stage2[key])  # stage 2 keeps (frozen) the prompts stage 1 learned

    fresh = tmp_path / "fresh"  # no stage-1 checkpoint there: stage 2 starts from scratch, and says so
    out = io.StringIO()
    train_module.run(one_epoch_config(dataset, zarr_cache[0], weights, fresh, stage=2, test_list=None), Console(file=out))
    assert "starts from scratch" in out.getvalue()
    assert not torch.equal(stage1[key], torch.load(fresh / "stage2-best.pt", weights_only=False)["model"][key])


# ------------------------------------------------------------------------------------------ learning rates

def stage_rates(cfg, stage: int) -> dict[str, float]:
    model, _ = build_model(cfg, torch.device("cpu"))
    model.prepare_stage(stage)
    optimizer, _ = make_optimizer(model, cfg, stage)
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def test_the_reference_trains_its_fusion_at_the_image_encoders_rate():
    """The fusion is a group of its own: the reference's optimiser gives project_fc 1e-5 beside 1e-2 for the
    temporal encoders; caer's own configs keep it at the temporal rate."""
    reference = load_config("clip-caer-reference", {"model": "caer-tiny", "pretrained": "random"})
    assert stage_rates(reference, 3) == {"prompt": 1e-3, "temporal": 1e-2, "fusion": 1e-5, "image_encoder": 1e-5}
    enhanced = load_config("raer", {"model": "caer-tiny", "pretrained": "random"})
    assert stage_rates(enhanced, 2)["fusion"] == stage_rates(enhanced, 2)["temporal"]


def test_resuming_a_checkpoint_with_another_group_layout_is_refused_naming_both(tmp_path):
    from types import SimpleNamespace

    from caer.pipeline.train import _resume_or_start

    cfg = load_config("raer", {"model": "caer-tiny", "pretrained": "random"})
    model, _ = build_model(cfg, torch.device("cpu"))
    model.prepare_stage(2)
    optimizer, _ = make_optimizer(model, cfg, 2)
    older = optimizer.state_dict()
    older["param_groups"] = [g for g in older["param_groups"] if g["name"] != "fusion"]  # before fusion had its own
    stage = SimpleNamespace(optimizer=optimizer, run_dir=RunDir(tmp_path), number=2)
    with pytest.raises(ValueError, match="holds the groups adapter, temporal, this caer trains adapter, temporal, fusion"):
        _resume_or_start(stage, {"optimizer": older})


def test_the_step_schedule_steps_at_the_milestones_when_given_else_every_step_size():
    """The reference lowers its rates after epochs 10 and 15 (configs/clip-caer-reference.yaml: --milestones)."""
    def rates(**values) -> list[float]:
        cfg = load_config("raer", {"model": "caer-tiny", "pretrained": "random", "scheduler": "step", "lr": 1.0,
                                   "gamma": 0.1, **values})
        model, _ = build_model(cfg, torch.device("cpu"))
        model.prepare_stage(2)
        optimizer, schedule = make_optimizer(model, cfg, 2)
        seen = []
        for _ in range(17):
            seen.append(round(optimizer.param_groups[-1]["lr"], 6))
            optimizer.step()
            schedule.step()
        return seen

    assert rates(step_size=10) == [1.0] * 10 + [0.1] * 7
    assert rates(milestones=[15, 10]) == [1.0] * 10 + [0.1] * 5 + [0.01] * 2
    assert load_config("clip-caer-reference", {}).optim.milestones == [10, 15]


def test_each_stage_rate_reaches_every_group_it_trains():
    """The most specific rate wins: --lr-group, the image encoder's own, --lr-stageN, --lr-prompt/--lr-adapter, --lr."""
    cfg = load_config("raer", {"model": "caer-tiny", "pretrained": "random", "lr_stage1": 0.05})
    assert (cfg.optim.lr_prompt, cfg.optim.lr_adapter, cfg.optim.lr_stage3) == (0.002, 0.01, 1e-4)  # the shipped file
    assert stage_rates(cfg, 1) == {"prompt": 0.05}  # --lr-stage1 reaches the prompts (it did not: lr_prompt won)
    assert stage_rates(cfg, 2) == {"adapter": 0.01, "temporal": 0.01, "fusion": 0.01}
    # stage 3 trains every group at its small rate (the adapter trained at 0.01, 100x lr_stage3)
    assert stage_rates(cfg, 3) == {"prompt": 1e-4, "adapter": 1e-4, "temporal": 1e-4, "fusion": 1e-4, "image_encoder": 1e-6}
    own = load_config("raer", {"model": "caer-tiny", "pretrained": "random", "lr_group": ["3.adapter=1e-5", "2.temporal=0.02"]})
    assert stage_rates(own, 3)["adapter"] == 1e-5 and stage_rates(own, 2) == {"adapter": 0.01, "temporal": 0.02, "fusion": 0.01}
    assert stage_rates(load_config("raer", {"model": "caer-tiny", "pretrained": "random"}), 1) == {"prompt": 0.002}


@pytest.mark.parametrize("entry, fragment", [
    ("2.prompt=0.1", "--lr-group 2.prompt: stage 2 trains adapter, temporal"),
    ("adapter=0.1", "expected STAGE.GROUP=RATE"),
    ("4.adapter=0.1", "expected STAGE.GROUP=RATE"),
])
def test_a_bad_group_rate_is_refused_naming_it(entry, fragment):
    cfg = load_config("tiny", {"pretrained": "random", "lr_group": [entry]})
    with pytest.raises(ValueError, match=fragment):
        stage_rates(cfg, 2)


# ------------------------------------------------------------------------------------------ stage 1 and the best epoch

def valid_logits(cfg, checkpoint=None) -> torch.Tensor:
    ckpt = torch.load(checkpoint, weights_only=False) if checkpoint else None
    model, backbone = build_model(cfg, torch.device("cpu"), ckpt)
    data = split_dataset(cfg, "val", False, backbone.preprocess, FeatureCache.open(cfg.data.cache), "cache")
    return torch.from_numpy(loader_logits(model, make_loader(data, cfg, False), torch.device("cpu"))[1])


def test_stage1_with_the_raer_classifier_changes_the_valid_logits(dataset, zarr_cache, weights, tmp_path):
    """With the shipped RAER config's classifier (IEC on the learnable prompts), what stage 1 trains reaches the
    predictions; the effective rates are recorded per epoch."""
    raer = load_config("raer", {"model": "caer-tiny"})
    keys = ("iec_base", "slerp_weight", "lambda_mi", "mi_warmup", "mi_ramp", "lambda_dc", "dc_warmup", "dc_ramp")
    shipped = {k: v for k, v in raer.to_dict().items() if k in keys}
    cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", stage=1, epochs_stage1=3, lr_stage1=0.05,
                           **shipped)
    result = train_stage(cfg, 1, quiet_console(width=200))
    before, after = valid_logits(cfg), valid_logits(cfg, result.best_path)
    assert (after - before).abs().max() > 1e-3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records][0] == {"prompt": 0.05}  # the rate of the epoch itself, by group


def test_the_best_checkpoint_is_never_an_epoch_in_which_nothing_trained(dataset, zarr_cache, weights, tmp_path):
    # IEC around the fixed sentences: stage 1's prompts learn only from MI, which is off in epoch 1 (warm-up);
    # the valid predictions cannot change, so every epoch ties on valid UAR
    cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", stage=1, epochs_stage1=3, iec_base="desc",
                           slerp_weight=0.2, lambda_mi=0.1, mi_warmup=1, lambda_dc=0.0)
    result = train_stage(cfg, 1, quiet_console(width=200))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained"] for r in records] == [False, True, True]
    assert len({r["valid_uar"] for r in records}) == 1
    assert result.best["epoch"] == records[-1]["best_epoch"] == 2  # a tie goes to the later epoch, never the idle one
    assert records[-1]["best_uar"] == records[2]["valid_uar"] and records[-1]["best_war"] == records[2]["valid_war"]
    ctx = torch.load(result.best_path, weights_only=False)["model"]["prompt_learner.ctx"]
    assert not torch.equal(ctx, build_model(cfg, torch.device("cpu"))[0].prompt_learner.ctx.detach())


def test_a_stage_1_whose_prompts_could_learn_in_no_epoch_is_refused_before_training(dataset, zarr_cache, weights,
                                                                                      tmp_path):
    """MI and DC in warm-up for all of stage 1 under --iec-base desc: nothing would train, so nothing starts (and a
    best checkpoint of an earlier run in the same directory is not handed on as this run's)."""
    run_dir = tmp_path / "run"
    first = one_epoch_config(dataset, zarr_cache[0], weights, run_dir, stage=1, epochs_stage1=1)
    train_stage(first, 1, quiet_console(width=200))
    before = (run_dir / "stage1-best.pt").read_bytes()
    idle = one_epoch_config(dataset, zarr_cache[0], weights, run_dir, stage=1, epochs_stage1=2, iec_base="desc",
                            slerp_weight=0.2, lambda_mi=0.1, mi_warmup=2, lambda_dc=0.1, dc_warmup=5)
    with pytest.raises(ValueError, match=r"still in warm-up at the end of its 2 epoch\(s\) \(--mi-warmup 2, "
                                         r"--dc-warmup 5\)"):
        train_stage(idle, 1, quiet_console(width=200))
    assert (run_dir / "stage1-best.pt").read_bytes() == before
    one = one_epoch_config(dataset, zarr_cache[0], weights, run_dir, stage=1, epochs_stage1=2, iec_base="desc",
                           slerp_weight=0.2, lambda_mi=0.1, mi_warmup=1, lambda_dc=0.1, dc_warmup=5)
    assert train_stage(one, 1, quiet_console(width=200)).best["epoch"] == 1  # MI in its last epoch


# ------------------------------------------------------------------------------------------ one geometry per run

@pytest.fixture(scope="module")
def body_cache(tmp_path_factory, dataset, clip_model):
    """The dataset extracted with a non-default geometry: context = body crop, face margin 5."""
    out = tmp_path_factory.mktemp("body") / "body.zarr"
    extract(settings_for(dataset, out, crop_body=True, body_boxes=dataset.body_boxes, margin=5), clip_model)
    return out


def test_raw_frames_are_cut_with_the_caches_geometry(dataset, body_cache, weights, tmp_path):
    """Stage 2, then eval from the cache and from raw frames: the raw path takes margin, crop-body and box files
    from the cache (no geometry flag given), so features and predictions agree."""
    cfg = one_epoch_config(dataset, body_cache, weights, tmp_path / "run", epochs_stage2=4, face_boxes=None)
    result = train_stage(cfg, 2, quiet_console(width=200))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["margin"], saved["crop_body"], saved["body_boxes"]) == (5.0, True, str(dataset.body_boxes.resolve()))

    cache = FeatureCache.open(body_cache)
    model, backbone = build_model(cfg, torch.device("cpu"))
    model.eval()
    cached = split_dataset(cfg, "val", False, backbone.preprocess, cache, "cache")
    raw = split_dataset(cfg, "val", False, backbone.preprocess, cache, "raw")
    keys = [(i, 0) for i in range(len(cached))]
    bc, br = gather(cached, keys), gather(raw, keys)
    with torch.no_grad():
        face, context = model.frame_features(br.face, br.context, br.flip)
    assert_fp16_equal(bc.face.numpy(), face.numpy(), "face crops with the cache's margin")
    assert_fp16_equal(bc.context.numpy(), context.numpy(), "context = the cache's body crop")

    quiet = quiet_console()
    by_cache = evaluate(result.best_path, "val", "cache", console=quiet)
    by_raw = evaluate(result.best_path, "val", "raw", console=quiet)
    assert by_raw.video_ids == by_cache.video_ids and list(by_raw.preds) == list(by_cache.preds)


@pytest.mark.parametrize("flag, value, fragment", [
    ("margin", 7.0, "--margin 7.0 contradicts"),
    ("crop_body", False, "--crop-body False contradicts"),
    ("frame_stride", 2, "--frame-stride 2 contradicts"),
])
def test_a_flag_that_contradicts_the_caches_geometry_is_refused(flag, value, fragment, dataset, body_cache, weights,
                                                                tmp_path):
    cfg = one_epoch_config(dataset, body_cache, weights, tmp_path / "run", **{flag: value})
    with pytest.raises(ValueError) as err:
        train_stage(cfg, 2, quiet_console())
    stored = FeatureCache.open(body_cache).fingerprint[flag]
    assert fragment in str(err.value) and f"{flag} {stored}" in str(err.value) and str(body_cache) in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def moved_box(dataset, tmp_path) -> tuple[str, Path]:
    """(a clip, a copy of the dataset's face boxes with one box of that clip moved by 3 px)."""
    boxes = json.loads(dataset.face_boxes.read_text())
    video_id = next(v for v, frames in boxes.items() if frames)
    name = sorted(boxes[video_id])[0]
    boxes[video_id][name] = [v + 3 for v in boxes[video_id][name]]
    moved = tmp_path / "moved_boxes.json"
    moved.write_text(json.dumps(boxes))
    return video_id, moved


def test_raw_frames_with_other_boxes_than_the_caches_are_refused(dataset, body_cache, weights, tmp_path):
    video_id, moved = moved_box(dataset, tmp_path)
    cfg = one_epoch_config(dataset, body_cache, weights, tmp_path / "run", face_boxes=str(moved))
    cache = FeatureCache.open(body_cache)
    split = next(s for s in ("train", "val", "test") if video_id in (dataset.root / f"{s}.txt").read_text())
    with pytest.raises(CacheError, match=f"the face/body boxes of clip '{video_id}' differ"):
        split_dataset(cfg, split, False, build_model(cfg, torch.device("cpu"))[1].preprocess, cache, "raw")


def test_box_files_that_contradict_the_cache_are_refused_before_the_first_stage(dataset, body_cache, weights, tmp_path):
    """Stages 1 and 2 read only the cache, but a staged run would find out at stage 3: refused up front."""
    video_id, moved = moved_box(dataset, tmp_path)
    cfg = one_epoch_config(dataset, body_cache, weights, tmp_path / "run", face_boxes=str(moved), stage=2)
    with pytest.raises(CacheError, match=f"the face/body boxes of clip '{video_id}' differ"):
        train_module.run(cfg, quiet_console())
    assert not (tmp_path / "run").exists()
    train_module.run(dataclasses.replace(cfg, crop=dataclasses.replace(cfg.crop, face_boxes=str(dataset.face_boxes))),
                     quiet_console())  # the cache's own box file is accepted
    assert (tmp_path / "run" / "stage2-best.pt").is_file()


# ------------------------------------------------------------------------------------------ the per-epoch log

@pytest.mark.parametrize("when, tables", [("every", 3), ("end", 1)])
def test_the_epoch_log_has_best_train_and_valid_pairs_and_prints_confusion_as_asked(when, tables, dataset, zarr_cache,
                                                                                   weights, tmp_path):
    cfg = one_epoch_config(dataset, zarr_cache[0], weights, tmp_path / "run", epochs_stage2=3, print_confusion=when)
    out = io.StringIO()
    train_stage(cfg, 2, Console(file=out, width=250))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:  # the best train pair is one epoch's pair, like the valid one
        best = records[r["best_train_epoch"]]
        assert (r["best_train_war"], r["best_train_uar"]) == (best["train_war"], best["train_uar"])
        assert best["train_uar"] == max(x["train_uar"] for x in records[: r["epoch"] + 1])
        assert "valid_confusion" in r  # always recorded
    lines = [line for line in out.getvalue().splitlines() if line.startswith("stage 2 epoch")]
    assert len(lines) == 3 and all("best train (ep" in line and "best valid (ep" in line for line in lines)
    assert out.getvalue().count("valid confusion matrix") == tables
