"""``caer train``: the three stages (SPEC section 7) and their run directory.

| stage | trains (``STAGE_GROUPS``)                | input                 |
|-------|------------------------------------------|-----------------------|
| 1     | prompt context vectors                   | cache (or raw frames) |
| 2     | adapter, temporal encoders, fusion       | cache (or raw frames) |
| 3     | all of the above + the image encoder     | raw frames            |

The run directory holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch) and
``stage{N}-last.pt`` / ``stage{N}-best.pt`` (best by valid UAR). A stage is a recipe over named
steps: ``setup_stage`` -> per epoch ``train_one_epoch``, ``validate``, ``record_epoch`` -> result.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import runtime
from ..cache import CacheError, FeatureCache, stored_fingerprint
from ..cache.schema import differences, with_added_keys
from ..config import IECBase, Optimizer, PrintConfusion, RunConfig, Scheduler, Source, save_config
from ..data.loaders import (
    Loader,
    check_box_files_match,
    check_splits_disjoint,
    class_counts,
    make_loader,
    open_cache,
    split_clips,
    split_dataset,
    with_cache_geometry,
)
from ..data.tensor_views import auto_decode_device
from ..files import FileLock, nearest_existing, write_atomically
from ..model.caer_model import STAGE_GROUPS, CAERModel
from ..model.checkpoint import (
    build_model,
    carries_clip,
    checkpoint_config,
    finetuned_identity,
    is_finetuned,
    load_checkpoint,
    model_state,
    save_checkpoint,
)
from ..model.encoder import check_weights
from ..model.losses import CAERLoss
from ..model.metrics import confusion_matrix, uar, uar_all_classes, war
from .curves import TensorBoardLog, check_tensorboard, read_metrics, write_curves
from .display import confusion_table, progress_bar
from .evaluate import evaluate, loader_logits, note_left_out
from .run_dir import RunDir

LOSS_TERMS = ("loss", "cls", "mi", "dc")
SHOWN_EVERY = 20  # training steps between two reads of the running loss (each makes the host wait for the GPU)
RANK_SEED_STRIDE = 1000  # rank r of a stage seeds seed + stage + r * this
# settings a resumed stage may change: where files are, how the run reports, what it runs on; the epoch counts are
# compared as the stage's own (``_check_resumed_as_set``), and the CLIP weights by their identity (``build_model``)
RESUME_FREE = ("run_dir", "resume", "overwrite", "print_confusion", "tensorboard", "workers", "device", "init_from", "stage",
               "staged_training", "cache_in_memory", "train_list", "val_list", "test_list", "cache", "root",
               "face_boxes", "body_boxes", "pretrained", "epochs", "epochs_stage1", "epochs_stage2", "epochs_stage3",
               "grad_checkpointing")  # (memory for time: the same numbers)


@dataclass
class StageResult:
    """A trained stage: its best and last checkpoints, and the best epoch's valid scores."""

    stage: int
    best_path: Path
    last_path: Path
    best: dict = field(default_factory=dict)


class TrainStep(nn.Module):
    """One training forward as a module, so that DDP sees every trainable parameter used inside it."""

    def __init__(self, model: CAERModel):
        super().__init__()
        self.model = model

    def forward(self, batch, fixed_text=None):
        """(logits, t_desc, t_soft); text features are recomputed unless fixed (stage 2)."""
        text = fixed_text if fixed_text is not None else self.model.text_features()
        return self.model(batch.face, batch.context, text, batch.flip).float(), *text


@dataclass
class Stage:
    """Everything the epochs of one stage need, built once by ``setup_stage``."""

    cfg: RunConfig
    number: int
    console: Console
    device: torch.device
    rank: int
    world: int
    run_dir: RunDir
    source: Source
    model: CAERModel
    step: nn.Module
    loss: CAERLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: Loader
    val_loader: Loader
    encoder: dict  # identity of the image encoder the stage starts from
    cache: FeatureCache | None
    keeps_clip: bool = False  # the model's CLIP came whole from the start checkpoint: every checkpoint keeps it
    fixed_text: tuple | None = None  # text features, when the prompts do not train (stage 2)
    skipped: dict = field(default_factory=dict)  # {split: clips left out because caer extract skipped them}
    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"valid_uar": -1.0, "valid_war": -1.0, "epoch": -1})
    best_train: dict = field(default_factory=lambda: {"train_uar": -1.0, "train_war": -1.0, "epoch": -1})
    best_confusion: list | None = None  # the best epoch's valid confusion matrix

    @property
    def epochs(self) -> int:
        return self.cfg.stage_epochs(self.number)

    def nothing_trains(self, epoch: int) -> bool:
        """Stage 1 with --iec-base desc learns only from MI and DC: nothing trains while both are in warm-up."""
        prompts_only = STAGE_GROUPS[self.number] == ("prompt",)
        return prompts_only and not self.model.classifies_with_prompts() and self.loss.weights(epoch) == (0.0, 0.0)


# ------------------------------------------------------------------------------------ set-up

def check_lr_groups(cfg: RunConfig, stages: list[int]) -> None:
    """Refuse an ``--lr-group`` entry of one of ``stages`` that names a group the stage does not train."""
    for (where, name) in cfg.stage_group_rates():
        if where in stages and name not in STAGE_GROUPS[where]:
            raise ValueError(f"--lr-group {where}.{name}: stage {where} trains {', '.join(STAGE_GROUPS[where])}")


def make_optimizer(model: CAERModel, cfg: RunConfig, stage: int):
    """One parameter group per trainable group of the model, each with its learning rate; and the schedule."""
    o = cfg.optim
    check_lr_groups(cfg, [stage])
    groups = []
    for name, params in model.parameter_groups().items():
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": cfg.group_lr(stage, name), "name": name})
    if o.optimizer == Optimizer.sgd:
        opt = torch.optim.SGD(groups, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, weight_decay=o.weight_decay)
    if o.scheduler == Scheduler.cosine:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.stage_epochs(stage)))
    elif o.milestones:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=sorted(o.milestones), gamma=o.gamma)
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_size, gamma=o.gamma)
    return opt, sched


def _check_stage_can_learn(cfg: RunConfig, stage: int) -> None:
    """Refuse a stage 1 whose prompts could learn in none of its epochs (its checkpoints would be untrained)."""
    desc_only = cfg.model.slerp_weight > 0 and cfg.model.iec_base == IECBase.desc
    if stage != 1 or not desc_only:
        return
    why = ("stage 1 trains only the prompts, and with IEC on --iec-base desc they learn only from the MI and DC "
           "losses, which are")
    c, epochs = cfg.loss, cfg.stage_epochs(1)
    if c.lambda_mi == 0 and c.lambda_dc == 0:
        raise ValueError(f"{why} both off (--lambda-mi 0, --lambda-dc 0): set one of them, or use --iec-base soft")
    if all(weight == 0 or warmup >= epochs for weight, warmup in ((c.lambda_mi, c.mi_warmup), (c.lambda_dc, c.dc_warmup))):
        raise ValueError(f"{why} still in warm-up at the end of its {epochs} epoch(s) (--mi-warmup {c.mi_warmup}, "
                         f"--dc-warmup {c.dc_warmup}): shorten a warm-up, train more epochs, or use --iec-base soft")


def check_epochs(cfg: RunConfig, stage: int) -> None:
    """A stage run on its own must train at least one epoch (0 skips a stage only with --staged-training)."""
    if cfg.stage_epochs(stage) == 0:
        flag = f"--epochs-stage{stage}" if getattr(cfg.stages, f"epochs_stage{stage}") is not None else "--epochs"
        raise ValueError(f"{flag} 0: stage {stage} would train no epochs; give at least 1 (0 skips a stage only with "
                         "--staged-training)")


def stages_to_run(cfg: RunConfig) -> list[int]:
    """The stages this run trains: the one of --stage, or those of 1, 2, 3 with epochs (--staged-training)."""
    if not cfg.stages.staged_training:
        check_epochs(cfg, cfg.stages.stage)
        return [cfg.stages.stage]
    stages = [n for n in (1, 2, 3) if cfg.stage_epochs(n) > 0]
    if not stages:
        raise ValueError("--staged-training with 0 epochs for every stage (--epochs, --epochs-stage1/2/3): "
                         "nothing to train; give at least one stage an epoch or more")
    return stages


def check_test_in_cache(cfg: RunConfig, stages: list[int]) -> None:
    """A run ends with a test report, read from the cache after stages 1 and 2: check before training that the
    cache holds the test clips (train and val are checked when each stage sets up)."""
    if cfg.data.test_list and cfg.data.cache and cfg.data.source == Source.cache and stages[-1] != 3:
        split_clips(cfg, "test", FeatureCache.open(cfg.data.cache), Source.cache)


def check_run_dir_free(cfg: RunConfig, stages: list[int], console: Console) -> None:
    """Refuse to train a stage whose checkpoints or metrics the run dir already holds, unless --resume (go on with
    them) or --overwrite (replace them): a second run would silently replace the first one's best checkpoint. With
    --overwrite, note the later stages' files that stay: they no longer follow from the stages trained now."""
    if cfg.run.resume and cfg.run.overwrite:
        raise ValueError("--resume goes on with the run in --run-dir, --overwrite replaces it: give one of them")
    run_dir = RunDir(cfg.run.run_dir)
    recorded = {int(r["stage"]) for r in read_metrics(run_dir.metrics)} if run_dir.metrics.is_file() else set()

    def held(n: int) -> bool:
        return n in recorded or run_dir.last(n).exists() or run_dir.best(n).exists()

    taken = [n for n in stages if held(n)]
    if taken and not (cfg.run.resume or cfg.run.overwrite):
        raise ValueError(f"--run-dir {run_dir.path} already holds stage {', '.join(map(str, taken))} of an earlier run: "
                         "--resume to go on with it, --overwrite to replace it, or choose another --run-dir")
    later = [n for n in range(max(stages) + 1, 4) if held(n)]
    if cfg.run.overwrite and taken and later:
        console.print(f"[yellow]note:[/] {run_dir.path} keeps the earlier run's stage {', '.join(map(str, later))} "
                      "(checkpoints, metrics): it does not follow from the stages trained now", highlight=False,
                      soft_wrap=True)


def check_cache_encoder(cfg: RunConfig, stages: list[int]) -> None:
    """Refuse a cache made by another encoder than the one ``--model`` and a ``--pretrained`` tag name before any
    weights are loaded: a tag may be a download, which would be the first thing to fail. (A ``--pretrained`` file
    is compared by its digest once loaded; a checkpoint to start from brings its own encoder.)"""
    if not cfg.data.cache or cfg.data.source != Source.cache or stages[0] == 3 or cfg.run.init_from:
        return
    stored = stored_fingerprint(cfg.data.cache)
    if stored is None:  # not a cache: opening it says so
        return
    check_weights(cfg.encoder.model, cfg.encoder.pretrained)  # a mistyped file is that, not another encoder
    made_by = stored["encoder"]
    model, pretrained = cfg.encoder.model, cfg.encoder.pretrained
    if made_by.get("model") != model or (made_by.get("weights") != pretrained and not Path(pretrained).is_file()):
        weights = made_by.get("weights", "?")
        hint = "the weights file it was extracted from" if str(weights).startswith("sha256:") else weights
        raise CacheError(f"{cfg.data.cache} was extracted with --model {made_by.get('model')} and weights {weights}; "
                         f"this run has --model {model} --pretrained {pretrained}. Train with the cache's encoder "
                         f"(--model {made_by.get('model')} --pretrained {hint}), or extract a cache for this one")


def setup_stage(cfg: RunConfig, stage: int, console: Console, init_from: Path | None = None) -> Stage:
    """Model, data, loss and optimiser of one stage, resumed from its last checkpoint when asked to."""
    check_epochs(cfg, stage)
    _check_stage_can_learn(cfg, stage)
    check_splits_disjoint(cfg)
    device = runtime.local_device(runtime.resolve_device(cfg.runtime.device))
    rank, world = runtime.init(device)
    console = console if rank == 0 else Console(quiet=True)
    run_dir = RunDir(cfg.run.run_dir)
    resume = cfg.run.resume and run_dir.last(stage).exists()
    if cfg.run.resume and not resume:
        console.print(f"[yellow]note:[/] nothing to resume in {run_dir.path}: starting stage {stage} afresh",
                      highlight=False, soft_wrap=True)
    init = load_checkpoint(run_dir.last(stage) if resume else init_from) if (resume or init_from) else None
    source = Source.raw if stage == 3 else cfg.data.source
    if stage == 3 and cfg.data.source == Source.cache:
        console.print("[dim]stage 3 fine-tunes the image encoder, so it reads raw frames[/]")

    model, backbone = build_model(cfg, device, init)
    encoder = init["encoder"] if init is not None else backbone.identity()
    cache = open_cache(cfg, source, encoder)
    cfg = with_cache_geometry(cfg, cache, auto_decode_device(backbone)).with_absolute_paths()
    model.prepare_stage(stage, cfg.stages.unfreeze_last)
    if stage == 3 and cfg.stages.grad_checkpointing:
        model.clip.visual.set_grad_checkpointing(True)
    train_set = split_dataset(cfg, "train", True, backbone.preprocess, cache, source, augment=stage == 3, device=device)
    val_set = split_dataset(cfg, "val", False, backbone.preprocess, cache, source, device=device)
    for split, data in (("train", train_set), ("val", val_set)):
        note_left_out(console, cfg.list_for(split), data.left_out)
    loss = CAERLoss(cfg.loss, class_counts(train_set, len(cfg.model.classes)), "prompt" in STAGE_GROUPS[stage], device)
    optimizer, scheduler = make_optimizer(model, cfg, stage)
    # fp16 needs loss scaling; bf16 does not
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.runtime.use_amp and runtime.amp_dtype(device) == torch.float16)
    step = TrainStep(model)
    if world > 1:
        # prompts that classify nothing (--iec-base desc) learn from MI and DC alone: none of their gradients exist
        # while both are off (their warm-up), which DDP must be told to expect
        unused = "prompt" in STAGE_GROUPS[stage] and not model.classifies_with_prompts()
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=unused)
    s = Stage(cfg, stage, console, device, rank, world, run_dir, source, model, step, loss, optimizer, scheduler, scaler,
              make_loader(train_set, cfg, True, cfg.loss.use_weighted_sampler, rank, world),
              make_loader(val_set, cfg, False, rank=rank, world=world), encoder, cache, init is not None and carries_clip(init),
              skipped={"train": len(train_set.left_out), "val": len(val_set.left_out)})
    if "prompt" not in STAGE_GROUPS[stage]:  # frozen prompts: text features once per stage, not once per step
        with torch.no_grad():
            s.fixed_text = tuple(t.detach() for t in model.text_features())
    run_dir.path.mkdir(parents=True, exist_ok=True)  # only now: a stage refused at set-up leaves no empty folder
    _resume_or_start(s, init if resume else None)
    if rank == 0:  # only now: a stage refused at set-up leaves the run's config.yaml as it was
        save_config(cfg, run_dir.config)
    return s


def _resume_or_start(s: Stage, last: dict | None) -> None:
    """Continue from the stage's last checkpoint, or start afresh (forgetting the stage's earlier records)."""
    if last is None:
        # each rank draws its own dropout masks (rank 0 alone: as a single process would)
        torch.manual_seed(s.cfg.run.seed + s.number + RANK_SEED_STRIDE * s.rank)
        if s.rank == 0:
            _drop_metrics_after(s.run_dir.metrics, s.number, -1)
        return
    saved = [g.get("name") for g in last["optimizer"]["param_groups"]]
    if saved != [g["name"] for g in s.optimizer.param_groups]:
        raise ValueError(f"{s.run_dir.last(s.number)}: its optimiser holds the groups {', '.join(map(str, saved))}, this caer "
                         f"trains {', '.join(g['name'] for g in s.optimizer.param_groups)} (the fusion has its own "
                         "group since this version); start the stage again without --resume, or finish it with the "
                         "caer that wrote the checkpoint")
    _check_resumed_as_set(s, last["config"])
    _check_resumed_cache(s, last.get("cache_fingerprint"))
    s.optimizer.load_state_dict(last["optimizer"])
    s.scheduler.load_state_dict(last["scheduler"])
    if last["scaler"]:  # a disabled scaler (CPU, bf16) saves nothing; resumed on an fp16 GPU, it starts afresh
        s.scaler.load_state_dict(last["scaler"])
    s.start_epoch, s.best = last["epoch"] + 1, last["best"]
    s.best_train, s.best_confusion = last.get("best_train", s.best_train), last.get("best_confusion")
    if s.rank == 0:
        _drop_metrics_after(s.run_dir.metrics, s.number, last["epoch"])
    _restore_random_state(s, last.get("rng_ranks") or [last["rng"]])
    s.console.print(f"resuming stage {s.number} at epoch {s.start_epoch + 1}/{s.epochs} from {s.run_dir.last(s.number)}")


def _check_resumed_as_set(s: Stage, saved: dict) -> None:
    """``--resume`` continues a stage as it was set: its optimiser, schedule and random state say so. Refuse
    settings that would change what it computes (and would otherwise be recorded without taking effect); where
    files are, how a run reports, and on what it runs may change."""
    now = s.cfg.to_dict()
    others = {f"lr_stage{n}" for n in (1, 2, 3) if n != s.number}  # another stage's rate does not reach this one
    changed = [k for k in now if k in saved and k not in RESUME_FREE and k not in others and now[k] != saved[k]]
    before = checkpoint_config({"config": saved}).stage_epochs(s.number)
    changed += [f"epochs of stage {s.number}"] * (before != s.epochs)
    if changed:
        shown = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" if k in now else f"{k} {before} -> {s.epochs}"
                          for k in changed[:4])
        raise ValueError(f"{s.run_dir.last(s.number)}: --resume continues stage {s.number} as it was started, but {shown}: "
                         "give the values it was started with, or start the stage again without --resume")


def _check_resumed_cache(s: Stage, saved: dict | None) -> None:
    """A stage resumed from the cache reads features made as those it started from: a cache of other views or crops
    (its path is free to change) would quietly train the rest of the stage on other numbers."""
    if saved is None or s.cache is None or s.source != Source.cache:
        return
    diff = differences(with_added_keys(saved), s.cache.fingerprint)
    if diff:
        raise ValueError(f"{s.run_dir.last(s.number)}: --resume continues stage {s.number} on features like those it "
                         f"started from, but {s.cache.path} was extracted otherwise ({'; '.join(diff[:3])}): give the "
                         "cache it started with, or start the stage again without --resume")


def _restore_random_state(s: Stage, saved: list[dict]) -> None:
    """Each rank takes up its own random state where the checkpoint was written; on another number of processes
    (whose shares of the data differ anyway), fresh per-rank seeds instead, with a note."""
    if len(saved) == s.world:
        runtime.set_rng_state(saved[s.rank], s.device)
        return
    torch.manual_seed(s.cfg.run.seed + s.number + RANK_SEED_STRIDE * s.rank + s.start_epoch)
    s.console.print(f"[yellow]note:[/] {s.run_dir.last(s.number)} was written by {len(saved)} process(es) and this run has "
                    f"{s.world}: its random draws (dropout) start from fresh seeds, not where the interrupted run "
                    "stopped", highlight=False, soft_wrap=True)


def _drop_metrics_after(path: Path, stage: int, epoch: int) -> None:
    """Forget the records of ``stage`` logged after ``epoch`` (on resume, those after the checkpoint); the file is
    replaced whole, so a failed write leaves the other stages' records as they were."""
    if path.exists():
        records = read_metrics(path)
        keep = [r for r in records if not (r["stage"] == stage and r["epoch"] > epoch)]
        write_atomically({path: "".join(json.dumps(r) + "\n" for r in keep)})


# ------------------------------------------------------------------------------------ one epoch

def window_size(step: int, accum: int, steps: int) -> int:
    """Steps in the accumulation window of ``step`` (0-based) of an epoch of ``steps``: ``accum``, or fewer in a last
    window that the epoch cuts short."""
    return min(accum, steps - step // accum * accum)


def ends_window(step: int, accum: int, steps: int) -> bool:
    """Whether ``step`` (0-based) is the last of its accumulation window: the one that updates the weights."""
    return (step + 1) % accum == 0 or step + 1 == steps


def _optimizer_step(s: Stage, loss: torch.Tensor, step: int, last_of_window: bool) -> None:
    """Backward, and an optimiser step at the end of each accumulation window (with clipping); each step's loss
    counts 1 / the window's size, so a short last window makes an update of the same scale."""
    s.scaler.scale(loss / window_size(step, s.cfg.optim.grad_accum, len(s.train_loader))).backward()
    if last_of_window:
        if s.cfg.optim.grad_clip:
            s.scaler.unscale_(s.optimizer)
            params = [p for g in s.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, s.cfg.optim.grad_clip)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)


def train_one_epoch(s: Stage, epoch: int, progress: Progress) -> tuple[np.ndarray, dict]:
    """One pass over this rank's share of the training split; of all ranks: the confusion matrix (each clip of the
    epoch's order once) and the mean of each loss term over the items trained."""
    s.train_loader.sampler.set_epoch(epoch)
    s.model.train_for_stage(s.number)
    idle = s.nothing_trains(epoch)
    if idle:
        s.console.print(f"[yellow]note:[/] stage 1 epoch {epoch + 1}: the MI and DC losses are still in warm-up and "
                        "--iec-base desc keeps the classification loss away from the prompts: nothing trains")
    # an idle step skips DDP, which expects a backward after each forward
    forward = s.step.module if idle and s.world > 1 else s.step
    # the loss sums, labels and predictions stay on the device, read every SHOWN_EVERY steps: reading them at each
    # step would make the host wait for the GPU there, and a small cached-feature step is mostly that wait
    totals = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=s.device)
    labels, preds, seen = [], [], 0
    task = progress.add_task(f"stage {s.number} epoch {epoch + 1}/{s.epochs}", total=len(s.train_loader), info="")
    s.optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(s.train_loader):
        batch = batch.to(s.device)
        # DDP averages the gradients over processes at each backward; inside an accumulation window only the last
        # backward needs that (the sums are the same)
        last_of_window = ends_window(step, s.cfg.optim.grad_accum, len(s.train_loader))
        local = s.world > 1 and not idle and not last_of_window
        with s.step.no_sync() if local else contextlib.nullcontext():
            with runtime.autocast(s.device, s.cfg.runtime.use_amp):
                logits, t_desc, t_soft = forward(batch, s.fixed_text)
                terms = s.loss(logits, batch.label, t_desc, t_soft, epoch)
            if not idle:
                _optimizer_step(s, terms.total, step, last_of_window)
        totals += torch.stack([t.detach().double() for t in terms]) * len(batch.label)
        labels.append(batch.label)
        preds.append(logits.detach().argmax(1))
        seen += len(batch.label)
        if (step + 1) % SHOWN_EVERY == 0 or step + 1 == len(s.train_loader):
            loss_sum = totals[0].item()  # the one wait for the GPU in these steps
            _check_finite(s, epoch, loss_sum)
            progress.update(task, completed=step + 1, info=f"loss {loss_sum / seen:.4f}")
    with warnings.catch_warnings():  # an idle epoch made no optimiser step; the schedule still counts the epoch
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        s.scheduler.step()
    sums = dict(zip(LOSS_TERMS, totals.tolist()))
    shares = runtime.gather((torch.cat(labels).cpu().numpy(), torch.cat(preds).cpu().numpy(), sums))
    # each rank's items come in order: those after its own_items repeat clips of another rank (padding under DDP),
    # and count once in the training WAR/UAR (the loss terms keep them: they were trained on)
    own = [s.train_loader.sampler.own_items(rank) for rank in range(len(shares))]
    cm = confusion_matrix(np.concatenate([x[0][:n] for x, n in zip(shares, own)]),
                          np.concatenate([x[1][:n] for x, n in zip(shares, own)]), len(s.cfg.model.classes))
    trained = sum(len(x[0]) for x in shares)
    return cm, {k: sum(x[2][k] for x in shares) / trained for k in LOSS_TERMS}


def _check_finite(s: Stage, epoch: int, total: float) -> None:
    if not np.isfinite(total):
        raise FloatingPointError(f"stage {s.number} epoch {epoch + 1}: the loss became {total}; train the stage again "
                                 "with --overwrite and a lower learning rate (--lr), or clipped gradients (--grad-clip 1.0)")


def validate(s: Stage, progress: Progress) -> np.ndarray:
    """The confusion matrix of the validation split; under DDP each rank predicts its share, with rank 0's
    BatchNorm statistics (each rank's last training step updated its own)."""
    runtime.broadcast_buffers(s.model)
    labels, logits = loader_logits(s.model, s.val_loader, s.device, s.cfg.runtime.use_amp, progress, s.fixed_text)
    return confusion_matrix(labels, logits.argmax(1), len(s.cfg.model.classes))


def epoch_record(s: Stage, epoch: int, train_cm: np.ndarray, losses: dict, val_cm: np.ndarray, seconds: float,
                 rates: dict) -> dict:
    """The ``metrics.jsonl`` line of an epoch; ``rates``: each trainable group's learning rate in it."""
    n_train = int(train_cm.sum())
    w_mi, w_dc = s.loss.weights(epoch)
    return {
        "stage": s.number, "epoch": epoch, "lr": rates,
        "losses": losses, "w_mi": w_mi, "w_dc": w_dc, "train_clips": n_train,
        "train_war": round(war(train_cm), 2), "train_uar": round(uar(train_cm), 2),
        "valid_war": round(war(val_cm), 2), "valid_uar": round(uar(val_cm), 2),
        "valid_uar_all_classes": round(uar_all_classes(val_cm), 2),  # a class absent from val scores 0 (the seed code's)
        "valid_confusion": val_cm.tolist(), "skipped_clips": dict(s.skipped), "seconds": round(seconds, 3),
    }


def beats_best(record: dict, best: dict) -> bool:
    """Whether an epoch's valid UAR is at least the best's, unrounded (the record's is rounded to 2 decimals, where
    a lower UAR can tie with a higher one); a tie goes to the later epoch."""
    exact = uar(np.asarray(record["valid_confusion"]))
    return exact >= best.get("exact_uar", best["valid_uar"])  # (older checkpoints hold the rounded UAR only)


def record_epoch(s: Stage, epoch: int, record: dict, random_states: list[dict]) -> bool:
    """Update the bests, then write the metrics line, the best checkpoint (if improved) and the last one;
    whether this epoch became the best. ``random_states``: every rank's, at the end of the epoch.

    In this order, a run stopped anywhere in between resumes from the previous last checkpoint,
    drops the lines logged after it and redoes this epoch.
    """
    trained = not s.nothing_trains(epoch)
    # the best epoch: highest valid UAR among epochs that trained something
    improved = trained and beats_best(record, s.best)
    if improved:
        s.best = {"valid_uar": record["valid_uar"], "valid_war": record["valid_war"], "epoch": epoch,
                  "exact_uar": uar(np.asarray(record["valid_confusion"]))}
        s.best_confusion = record["valid_confusion"]
    if trained and record["train_uar"] >= s.best_train["train_uar"]:  # the same rule on the training split (rounded)
        s.best_train = {"train_uar": record["train_uar"], "train_war": record["train_war"], "epoch": epoch}
    record |= {"trained": trained, "best_epoch": s.best["epoch"], "best_war": s.best["valid_war"],
               "best_uar": s.best["valid_uar"], "best_train_epoch": s.best_train["epoch"],
               "best_train_war": s.best_train["train_war"], "best_train_uar": s.best_train["train_uar"]}
    own_encoder = s.number == 3 or is_finetuned(s.encoder)
    checkpoint = {
        "stage": s.number, "epoch": epoch, "model": model_state(s.model, own_encoder, s.keeps_clip),
        "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(),
        "rng": random_states[0], "rng_ranks": random_states if s.world > 1 else None,
        "config": s.cfg.to_dict(), "best": s.best, "best_train": s.best_train,
        "best_confusion": s.best_confusion, "classes": s.cfg.model.classes,
        "encoder": finetuned_identity(s.model, s.encoder) if own_encoder else s.encoder,
        "cache_fingerprint": s.cache.fingerprint if s.cache else None, "metrics": record,
    }
    _append_metrics(s.run_dir.metrics, record)
    if improved:
        save_checkpoint(checkpoint, s.run_dir.best(s.number))
    save_checkpoint(checkpoint, s.run_dir.last(s.number))
    return improved


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def show_epoch(s: Stage, epoch: int, record: dict, improved: bool) -> None:
    """One line per epoch (the method's log: train, valid, best train and best valid pairs), and the valid
    confusion matrix as ``--print-confusion`` says."""
    bt, bv = s.best_train, s.best
    s.console.print(
        f"stage {s.number} epoch {epoch + 1:>3}/{s.epochs}  loss {record['losses']['loss']:.4f} | "
        f"train WAR {record['train_war']:6.2f} UAR {record['train_uar']:6.2f} | "
        f"valid WAR {record['valid_war']:6.2f} UAR {record['valid_uar']:6.2f} | "
        f"best train (ep {bt['epoch'] + 1}) {bt['train_war']:6.2f} {bt['train_uar']:6.2f} | "
        f"best valid (ep {bv['epoch'] + 1}) {bv['valid_war']:6.2f} {bv['valid_uar']:6.2f} | {record['seconds']:.1f}s",
        highlight=False, soft_wrap=True,
    )
    when = s.cfg.run.print_confusion
    if when == PrintConfusion.every or (when == PrintConfusion.best and improved):
        s.console.print(confusion_table(np.array(record["valid_confusion"]), s.cfg.model.classes,
                                        f"valid confusion matrix, epoch {epoch + 1}"))


def show_stage_end(s: Stage) -> None:
    if s.cfg.run.print_confusion == PrintConfusion.end and s.best_confusion is not None:
        s.console.print(confusion_table(np.array(s.best_confusion), s.cfg.model.classes,
                                        f"valid confusion matrix of the best epoch ({s.best['epoch'] + 1})"))


# ------------------------------------------------------------------------------------ recipes

def train_stage(cfg: RunConfig, stage: int, console: Console, init_from: Path | None = None) -> StageResult:
    """Train one stage; returns where its checkpoints are. ``init_from``: the previous stage's best checkpoint.

    Under ``torchrun`` it trains with DDP: every rank takes its share of each epoch's batches and validation
    clips, and rank 0 alone writes checkpoints, metrics, curves (and TensorBoard events), and prints.
    """
    s = setup_stage(cfg, stage, console, init_from)
    board = (TensorBoardLog(s.run_dir, stage, s.start_epoch, s.cfg.model.classes)
             if s.cfg.run.tensorboard and s.rank == 0 else None)
    groups = ", ".join(g for g in STAGE_GROUPS[stage] if s.model.parameter_groups()[g])
    s.console.rule(f"stage {stage}: training {groups} from the {s.source}"
                   + (f" on {s.world} processes" if s.world > 1 else ""))
    rates = ", ".join(f"{g['name']} {g['lr']:g}" for g in s.optimizer.param_groups)
    s.console.print(f"learning rates at the start of stage {stage}: {rates}", highlight=False)
    try:
        for epoch in range(s.start_epoch, s.epochs):
            start = time.perf_counter()
            rates = {g["name"]: g["lr"] for g in s.optimizer.param_groups}  # before this epoch's scheduler step
            with progress_bar(s.console) as progress:
                train_cm, losses = train_one_epoch(s, epoch, progress)
                val_cm = validate(s, progress)
            random_states = runtime.gather(runtime.rng_state(s.device))
            if s.rank == 0:  # rank 0 records the epoch
                record = epoch_record(s, epoch, train_cm, losses, val_cm, time.perf_counter() - start, rates)
                show_epoch(s, epoch, record, record_epoch(s, epoch, record, random_states))
                if board is not None:
                    board.epoch(record)
            runtime.barrier()
    finally:
        if board is not None:
            board.close()
    if s.rank == 0:
        show_stage_end(s)
        s.console.print(f"training curves: {write_curves(s.run_dir.path)}", highlight=False, soft_wrap=True)
    best = runtime.gather(s.best)[0]
    if best["epoch"] < 0:  # (a best checkpoint on disk would be an earlier run's)
        raise RuntimeError(f"stage {stage} has no best checkpoint: nothing trained in any of its epochs (the MI and DC "
                           "warm-up outlasted the stage)")
    return StageResult(stage, s.run_dir.best(s.number), s.run_dir.last(s.number), best)


def _starting_checkpoint(cfg: RunConfig, console: Console) -> Path | None:
    """What a single stage N > 1 starts from: --init-from, else stage{N-1}-best.pt of the run dir, if there."""
    given = Path(cfg.run.init_from) if cfg.run.init_from else None
    if cfg.stages.staged_training:
        return given
    previous = RunDir(cfg.run.run_dir).best(cfg.stages.stage - 1)
    init = given or (previous if cfg.stages.stage > 1 and previous.exists() else None)
    if init is not None:
        console.print(f"stage {cfg.stages.stage} starts from {init}")
    elif cfg.stages.stage > 1 and not cfg.run.resume:
        console.print(f"[yellow]note:[/] stage {cfg.stages.stage} starts from scratch: no --init-from and no "
                      f"{previous.name} in {cfg.run.run_dir}")
    return init


def run(cfg: RunConfig, console: Console | None = None) -> list[StageResult]:
    """``caer train``: one stage, or 1 -> 2 -> 3 with ``--staged-training``, each from the last one's best."""
    console = console or Console()
    if runtime.rank() != 0:  # under torchrun, rank 0 prints
        console = Console(quiet=True)
    if cfg.run.tensorboard:
        check_tensorboard()
    stages = stages_to_run(cfg)
    check_lr_groups(cfg, stages)  # before any stage trains: a typo for stage 3 would otherwise stop the run there
    check_test_in_cache(cfg, stages)
    check_cache_encoder(cfg, stages)
    with holding_run_dir(cfg):
        check_run_dir_free(cfg, stages, console)
        check_box_files_match(cfg)
        return _run_stages(cfg, stages, console)


@contextlib.contextmanager
def holding_run_dir(cfg: RunConfig):
    """One ``caer train`` at a time writes a run directory (rank 0 holds the lock for its torchrun group): two runs
    into one folder would mix their metrics and checkpoints."""
    run_dir = RunDir(cfg.run.run_dir)
    blocker = nearest_existing(run_dir.path)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"--run-dir {run_dir.path}: {blocker} is a file, not a folder")
    lock = FileLock(run_dir.lock, "caer train")
    held_by = lock.acquire() if runtime.rank() == 0 else None
    if held_by:
        raise ValueError(f"--run-dir {cfg.run.run_dir} is being written by {held_by}; wait until it is done, or choose "
                         "another --run-dir")
    try:
        yield
    finally:
        lock.release()


def _run_stages(cfg: RunConfig, stages: list[int], console: Console) -> list[StageResult]:
    for note in cfg.optim.ignored_settings():
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if note := runtime.amp_note(runtime.resolve_device(cfg.runtime.device), cfg.runtime.use_amp):
        console.print(note, highlight=False)  # once a run, not once a stage
    init = _starting_checkpoint(cfg, console)
    results: list[StageResult] = []
    for stage in [1, 2, 3] if cfg.stages.staged_training else stages:
        if stage not in stages:
            console.print(f"[dim]stage {stage}: 0 epochs, skipped[/]")
            continue
        result = train_stage(cfg, stage, console, init_from=init)
        results.append(result)
        init = result.best_path
    if results and cfg.data.test_list and runtime.rank() == 0:
        write_test_report(results[-1].best_path, cfg, console)
    return results


def write_test_report(checkpoint: Path, cfg: RunConfig, console: Console) -> None:
    """Evaluate the run's final best checkpoint on the test split; write test_report.json (and .png) beside it."""
    report = evaluate(checkpoint, "test", "raw" if cfg.data.source == Source.raw else "auto", console=console)
    run_dir = RunDir(cfg.run.run_dir)
    report.write_json(run_dir.test_report)
    report.plot(run_dir.test_confusion)
    console.print(report.tables())
    console.print(f"test report: {run_dir.test_report}")
