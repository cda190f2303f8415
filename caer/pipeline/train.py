"""``caer train``: the three stages (SPEC section 7) and their run directory.

| stage | trains                                   | input                 |
|-------|------------------------------------------|-----------------------|
| 1     | prompt context vectors                   | cache (or raw frames) |
| 2     | adapter, temporal encoders, fusion       | cache (or raw frames) |
| 3     | all of the above + the image encoder     | raw frames            |

The run directory holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch) and
``stage{N}-last.pt`` / ``stage{N}-best.pt`` (best by valid UAR).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..cache import CacheError, FeatureCache
from ..cache.schema import differences
from .config import FIELDS, RunConfig, save_config
from .data import ViewMaker, load_body_boxes, load_face_boxes, read_annotations
from . import distributed
from .datasets import CachedClips, EpochSampler, RawClips
from .encoder import ClipModel, amp_dtype, autocast, load_clip, resolve_device
from .losses import class_balanced_weights, decorrelation_loss, log_prior, mutual_information_loss, ramp_weight
from .metrics import confusion_matrix, uar, war
from .model import CAERModel

TRAINABLE = {1: {"prompt"}, 2: {"adapter", "temporal"}, 3: {"prompt", "adapter", "temporal", "image_encoder"}}


# ------------------------------------------------------------------------------------ building blocks

def build_model(cfg: RunConfig, device: torch.device, checkpoint: dict | None = None) -> tuple[CAERModel, ClipModel]:
    """The CLIP backbone named by the config, the CAER model on top, and a checkpoint's weights if given."""
    clip = load_clip(cfg.model, cfg.pretrained, device)
    torch.manual_seed(cfg.seed)
    model = CAERModel(clip, cfg.model_config()).to(device)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model, clip


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``caer train`` (clear errors for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # not a torch file at all, or a truncated one
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "encoder" not in ckpt:
        raise ValueError(f"{path}: not a caer checkpoint (made by caer train)")
    return ckpt


def checkpoint_config(ckpt: dict, overrides: dict | None = None) -> RunConfig:
    """The run config saved in a checkpoint, with ``overrides`` (None values ignored)."""
    values = {k: v for k, v in ckpt["config"].items() if k in FIELDS}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return RunConfig(**values)


def clip_from_checkpoint(path: str | Path, device: torch.device) -> ClipModel:
    """The image encoder of a checkpoint (fine-tuned by stage 3, or the base one), with its identity."""
    ckpt = load_checkpoint(path)
    model, clip = build_model(checkpoint_config(ckpt), device, ckpt)
    clip.weights, clip.finetuned_from = ckpt["encoder"]["weights"], ckpt["encoder"].get("finetuned_from")
    return clip


def model_state(model: CAERModel, with_image_encoder: bool) -> dict:
    """Weights worth saving: everything but CLIP's towers, plus the image encoder once it has changed."""
    return {
        k: v.detach().cpu()
        for k, v in model.state_dict().items()
        if not k.startswith("clip.") or (with_image_encoder and k.startswith("clip.visual."))
    }


def load_weights(model: CAERModel, checkpoint: dict) -> None:
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    unexpected = [k for k in unexpected if not k.startswith("clip.visual.")]
    missing = [k for k in missing if not k.startswith("clip.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def check_cache(cache: FeatureCache, encoder: dict) -> None:
    """Refuse a cache whose features did not come from this encoder."""
    diff = differences(encoder, cache.fingerprint["encoder"])
    if diff:
        raise CacheError(
            f"{cache.path} was extracted with another image encoder than this model's:\n  " + "\n  ".join(diff)
            + "\nRe-extract the cache for this model (caer extract --from-checkpoint CKPT for a stage-3 checkpoint),"
            " or use --source raw."
        )


def open_cache(cfg: RunConfig, source: str, encoder: dict) -> FeatureCache | None:
    """The cache to read features from (checked against ``encoder``), or, for raw frames, the one whose
    frame stride they are sampled with (if there is one)."""
    if source == "cache":
        if not cfg.cache:
            raise ValueError("--source cache needs --cache (or use --source raw)")
        cache = FeatureCache.open(cfg.cache)
        check_cache(cache, encoder)
        if cfg.cache_in_memory:
            cache.load_into_memory()
        return cache
    return FeatureCache.open(cfg.cache) if cfg.cache and Path(cfg.cache).exists() else None


def split_dataset(cfg: RunConfig, split: str, train: bool, clip: ClipModel, cache: FeatureCache | None, source: str,
                  augment: bool = False):
    """The dataset of one split ("train", "val" or "test") from the cache or from raw frames."""
    list_path = getattr(cfg, f"{split}_list")
    if not list_path:
        raise ValueError(f"--{split}-list is not set (give it as a flag or in the config)")
    num_classes = len(cfg.classes)
    if source == "cache":
        clips, _ = read_annotations(list_path, cfg.root, num_classes, need_frames=False)
        missing = [c.video_id for c in clips if c.video_id not in cache]
        if missing:
            raise CacheError(
                f"{cache.path}: {len(missing)} clip(s) of {list_path} are not in the cache (first: {missing[0]!r}); "
                f"run caer extract on {list_path}"
            )
        return CachedClips(cache, [c.video_id for c in clips], [c.label for c in clips], cfg.num_frames, train, cfg.seed)
    if not cfg.face_boxes:
        raise ValueError("--source raw needs --face-boxes")
    root = cfg.root or str(Path(list_path).parent)
    clips, _ = read_annotations(list_path, root, num_classes)
    view_maker = ViewMaker(
        load_face_boxes(cfg.face_boxes, root), load_body_boxes(cfg.body_boxes, root) if cfg.body_boxes else {},
        cfg.margin, cfg.crop_body,
    )
    stride = cache.fingerprint["frame_stride"] if cache is not None else cfg.frame_stride
    # training on raw frames picks a random view per clip: the cache's views, or (stage 3) always a random flip
    views = 2 if augment else (cache.views if cache is not None else 1)
    return RawClips(clips, view_maker, clip.preprocess, cfg.num_frames, train, views=views, frame_stride=stride,
                    seed=cfg.seed, rotate=cfg.rotate_degrees if augment else 0.0)


def make_loader(dataset, cfg: RunConfig, train: bool, weights: torch.Tensor | None = None,
                rank: int = 0, world: int = 1) -> DataLoader:
    sampler = EpochSampler(len(dataset), cfg.seed, shuffle=train, weights=weights if train else None, rank=rank, world=world)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                      persistent_workers=cfg.workers > 0, pin_memory=torch.cuda.is_available())


def batch_logits(model: CAERModel, batch, source: str, text, device, encoder_grad: bool = False) -> torch.Tensor:
    """Logits of one batch from either input kind."""
    if source == "cache":
        face, context = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        return model(face, context, text)
    pixels, flip = batch[0].to(device, non_blocking=True), batch[1].to(device)
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        feats = model.encode_frames(pixels, flip)
    return model(feats[:, :, 0], feats[:, :, 1], text)


class TrainStep(nn.Module):
    """One training forward as a module, so that DDP sees every trainable parameter used inside it."""

    def __init__(self, model: CAERModel, source: str, encoder_grad: bool):
        super().__init__()
        self.model, self.source, self.encoder_grad = model, source, encoder_grad

    def forward(self, batch, fixed_text=None):
        """(logits, t_desc, t_soft); text features are recomputed unless fixed (stage 2)."""
        text = fixed_text if fixed_text is not None else self.model.text_features()
        device = next(self.model.parameters()).device
        return batch_logits(self.model, batch, self.source, text, device, self.encoder_grad).float(), *text


@torch.no_grad()
def predict(model: CAERModel, loader: DataLoader, source: str, device, use_amp: bool = False,
            progress: Progress | None = None, text=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, logits [N, C], dataset indices) over a loader, in dataset order; ``text``: precomputed text features."""
    model.eval()
    text = text if text is not None else model.text_features()
    labels, logits, indices = [], [], []
    task = progress.add_task("eval", total=len(loader), info="") if progress else None
    for batch in loader:
        with autocast(device, use_amp):
            out = batch_logits(model, batch, source, text, device).float()
        labels.append(batch[2].numpy())
        logits.append(out.cpu().numpy())
        indices.append(batch[3].numpy())
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    order = np.argsort(np.concatenate(indices))
    return np.concatenate(labels)[order], np.concatenate(logits)[order], np.concatenate(indices)[order]


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )


def confusion_table(cm: np.ndarray, classes: list[str], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("true \\ pred")
    for name in classes:
        t.add_column(name[:10], justify="right")
    for i, (name, row) in enumerate(zip(classes, cm)):
        t.add_row(name, *(f"[bold]{v}[/]" if j == i else str(v) for j, v in enumerate(row)))
    return t


# ------------------------------------------------------------------------------------ one stage

@dataclass
class StageResult:
    stage: int
    best_path: Path
    last_path: Path
    best: dict = field(default_factory=dict)


def set_trainable(model: CAERModel, stage: int, unfreeze_last: int | None) -> None:
    """Freeze everything but the groups a stage trains (the text tower and unused streams are never trained)."""
    model.requires_grad_(False)
    for name, params in model.parameter_groups().items():
        for p in params:
            p.requires_grad_(name in TRAINABLE[stage])
    if stage == 3 and unfreeze_last is not None:
        visual = model.clip.visual
        blocks = visual.transformer.resblocks
        if not 1 <= unfreeze_last <= len(blocks):
            raise ValueError(f"--unfreeze-last must be in 1..{len(blocks)}")
        for p in visual.parameters():
            p.requires_grad_(False)
        for module in [*blocks[-unfreeze_last:], visual.ln_post]:
            for p in module.parameters():
                p.requires_grad_(True)
        if visual.proj is not None:
            visual.proj.requires_grad_(True)


def train_mode(model: CAERModel, stage: int) -> None:
    model.train()
    frozen = {"prompt": [model.prompt_learner], "adapter": [model.adapter],
              "temporal": model.temporal_modules(), "image_encoder": [model.clip.visual]}
    for name, modules in frozen.items():
        if name not in TRAINABLE[stage]:
            for m in modules:
                m.eval()
    model.clip.transformer.eval()
    if stage == 3:  # input-norm statistics stay those of stage 2: augmented raw frames would shift them
        model.norm_face.eval()
        model.norm_context.eval()


def make_optimizer(model: CAERModel, cfg: RunConfig, stage: int):
    lr = cfg.stage_lr(stage)
    rates = {"prompt": cfg.lr_prompt or lr, "adapter": cfg.lr_adapter or lr, "temporal": lr, "image_encoder": cfg.lr_image_encoder}
    groups = []
    for name, params in model.parameter_groups().items():
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": rates[name], "name": name})
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"--optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    epochs = max(1, cfg.stage_epochs(stage))
    if cfg.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    elif cfg.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    else:
        raise ValueError(f"--scheduler must be cosine or step, got {cfg.scheduler!r}")
    return opt, sched


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write to a temporary file and rename it, so a stop mid-write never leaves a truncated checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def _drop_metrics_after(path: Path, stage: int, epoch: int) -> None:
    """On resume, forget epochs logged after the checkpoint we resume from."""
    if path.exists():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        keep = [r for r in records if not (r["stage"] == stage and r["epoch"] > epoch)]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def train_stage(cfg: RunConfig, stage: int, console: Console, init_from: Path | None = None) -> StageResult:
    """Train one stage; returns where its checkpoints are. ``init_from``: the previous stage's best checkpoint.

    Under ``torchrun`` it trains with DDP: every rank takes its share of each epoch's batches, and rank 0
    alone validates, writes checkpoints and metrics, and prints.
    """
    device = distributed.local_device(resolve_device(cfg.device))
    rank, world = distributed.init(device)
    if rank != 0:
        console = Console(quiet=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    last_path, best_path = run_dir / f"stage{stage}-last.pt", run_dir / f"stage{stage}-best.pt"
    resume = cfg.resume and last_path.exists()
    init = load_checkpoint(last_path if resume else init_from) if (resume or init_from) else None

    source = "raw" if stage == 3 else cfg.source
    if stage == 3 and cfg.source == "cache":
        console.print("[dim]stage 3 fine-tunes the image encoder, so it reads raw frames[/]")
    if cfg.use_amp and device.type != "cuda":
        console.print("[yellow]note:[/] --use-amp does nothing on the CPU; training in float32")
    model, clip = build_model(cfg, device, init)
    encoder = init["encoder"] if init is not None else clip.identity()
    cache = open_cache(cfg, source, encoder)
    set_trainable(model, stage, cfg.unfreeze_last)
    if stage == 3 and cfg.grad_checkpointing:
        model.clip.visual.set_grad_checkpointing(True)

    train_set = split_dataset(cfg, "train", True, clip, cache, source, augment=stage == 3)
    val_set = split_dataset(cfg, "val", False, clip, cache, source)
    num_classes = len(cfg.classes)
    counts = np.bincount(train_set.labels, minlength=num_classes)
    sampler_weights = torch.tensor(1.0 / np.maximum(counts, 1))[train_set.labels].double() if cfg.use_weighted_sampler else None
    train_loader = make_loader(train_set, cfg, True, sampler_weights, rank, world)
    val_loader = make_loader(val_set, cfg, False)
    ce_weight = class_balanced_weights(counts, cfg.cb_beta).to(device) if cfg.class_balanced_loss else None
    adjust = (cfg.logit_adj_tau * log_prior(counts)).to(device) if cfg.logit_adj else None

    opt, sched = make_optimizer(model, cfg, stage)
    # fp16 needs loss scaling; bf16 does not
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.use_amp and amp_dtype(device) == torch.float16)
    epochs = cfg.stage_epochs(stage)
    start_epoch, best = 0, {"valid_uar": -1.0, "valid_war": -1.0, "epoch": -1}
    if resume:
        opt.load_state_dict(init["optimizer"])
        sched.load_state_dict(init["scheduler"])
        scaler.load_state_dict(init["scaler"])
        start_epoch, best = init["epoch"] + 1, init["best"]
        if rank == 0:
            _drop_metrics_after(metrics_path, stage, init["epoch"])
        _set_rng_state(init["rng"])
        console.print(f"resuming stage {stage} at epoch {start_epoch + 1}/{epochs} from {last_path}")
    else:
        torch.manual_seed(cfg.seed + stage)
        if rank == 0:
            _drop_metrics_after(metrics_path, stage, -1)  # a fresh start replaces this stage's earlier records

    prompts_train = "prompt" in TRAINABLE[stage]
    ce_reaches_prompts = cfg.iec_base == "soft"  # with "desc" the classifier never sees the learnable prompts
    if stage == 1 and not ce_reaches_prompts and cfg.lambda_mi == 0 and cfg.lambda_dc == 0:
        raise ValueError(
            "stage 1 trains only the prompts, and with --iec-base desc they learn only from the MI and DC losses, "
            "which are both off (--lambda-mi 0, --lambda-dc 0): set one of them, or use --iec-base soft"
        )
    encoder_train = "image_encoder" in TRAINABLE[stage]
    fixed_text = None
    if not prompts_train:  # stage 2: prompts are frozen, so text features are computed once per stage
        with torch.no_grad():
            fixed_text = tuple(t.detach() for t in model.text_features())

    step_module = TrainStep(model, source, encoder_grad=encoder_train)
    if world > 1:
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    console.rule(f"stage {stage}: training {', '.join(sorted(TRAINABLE[stage]))} from the {source}"
                 + (f" on {world} processes" if world > 1 else ""))
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        w_mi = ramp_weight(epoch, cfg.lambda_mi, cfg.mi_warmup, cfg.mi_ramp) if prompts_train else 0.0
        w_dc = ramp_weight(epoch, cfg.lambda_dc, cfg.dc_warmup, cfg.dc_ramp) if prompts_train else 0.0
        train_loader.sampler.set_epoch(epoch)
        train_mode(model, stage)
        idle = stage == 1 and not ce_reaches_prompts and w_mi == 0 and w_dc == 0
        if idle:
            console.print(f"[yellow]note:[/] stage 1 epoch {epoch + 1}: the MI and DC losses are still in warm-up and "
                          "--iec-base desc keeps the classification loss away from the prompts: nothing trains")
        sums = {"loss": 0.0, "cls": 0.0, "mi": 0.0, "dc": 0.0}
        labels_seen, preds_seen = [], []
        with progress_bar(console) as progress:
            task = progress.add_task(f"stage {stage} epoch {epoch + 1}/{epochs}", total=len(train_loader), info="")
            opt.zero_grad(set_to_none=True)
            for step, batch in enumerate(train_loader):
                y = batch[2].to(device)
                with autocast(device, cfg.use_amp):
                    # an idle step (nothing can learn) skips DDP, which expects a backward after each forward
                    logits, *text = (step_module.module if idle and world > 1 else step_module)(batch, fixed_text)
                    train_logits = logits + adjust if adjust is not None else logits
                    loss_cls = F.cross_entropy(train_logits, y, weight=ce_weight, label_smoothing=cfg.label_smoothing)
                    loss_mi = mutual_information_loss(text[0], text[1]) if w_mi > 0 else logits.new_zeros(())
                    loss_dc = decorrelation_loss(text[1]) if w_dc > 0 else logits.new_zeros(())
                    loss = loss_cls + w_mi * loss_mi + w_dc * loss_dc
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"stage {stage} epoch {epoch + 1}: the loss became {loss.item()}; lower the learning rate")
                if not idle:
                    scaler.scale(loss / cfg.grad_accum).backward()
                if not idle and ((step + 1) % cfg.grad_accum == 0 or step + 1 == len(train_loader)):
                    if cfg.grad_clip:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                n = len(y)
                for k, v in (("loss", loss), ("cls", loss_cls), ("mi", loss_mi), ("dc", loss_dc)):
                    sums[k] += float(v.detach()) * n
                labels_seen.append(batch[2].numpy())
                preds_seen.append(logits.argmax(1).cpu().numpy())
                progress.update(task, advance=1, info=f"loss {sums['loss'] / sum(map(len, labels_seen)):.4f}")
            sched.step()
            shares = distributed.gather((np.concatenate(labels_seen), np.concatenate(preds_seen), sums))
            train_cm = confusion_matrix(np.concatenate([x[0] for x in shares]), np.concatenate([x[1] for x in shares]),
                                        num_classes)
            sums = {k: sum(x[2][k] for x in shares) for k in sums}
            if rank == 0:
                val_labels, val_logits, _ = predict(model, val_loader, source, device, cfg.use_amp, progress, fixed_text)
        if rank != 0:  # rank 0 validates and records the epoch
            distributed.barrier()
            continue
        val_cm = confusion_matrix(val_labels, val_logits.argmax(1), num_classes)
        n_train = int(train_cm.sum())
        record = {
            "stage": stage, "epoch": epoch, "lr": [g["lr"] for g in opt.param_groups],
            "losses": {k: v / n_train for k, v in sums.items()}, "w_mi": w_mi, "w_dc": w_dc, "train_clips": n_train,
            "train_war": round(war(train_cm), 2), "train_uar": round(uar(train_cm), 2),
            "valid_war": round(war(val_cm), 2), "valid_uar": round(uar(val_cm), 2),
            "valid_confusion": val_cm.tolist(), "seconds": round(time.perf_counter() - t0, 3),
        }
        improved = record["valid_uar"] > best["valid_uar"]
        best = {
            "valid_uar": max(best["valid_uar"], record["valid_uar"]),
            "valid_war": max(best["valid_war"], record["valid_war"]),
            "epoch": epoch if improved else best["epoch"],  # the epoch of the best UAR = best checkpoint
        }
        record |= {"best_valid_uar": best["valid_uar"], "best_valid_war": best["valid_war"]}
        own_encoder = stage == 3 or is_finetuned(encoder)
        checkpoint = {
            "stage": stage, "epoch": epoch, "model": model_state(model, with_image_encoder=own_encoder),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "rng": _rng_state(), "config": cfg.to_dict(), "best": best, "classes": cfg.classes,
            "encoder": finetuned_identity(model, encoder) if own_encoder else encoder,
            "cache_fingerprint": cache.fingerprint if cache else None, "metrics": record,
        }
        # metrics line first, then best, then last: a run stopped anywhere in between resumes from the
        # previous last checkpoint, drops the lines logged after it and redoes this epoch
        _append_metrics(metrics_path, record)
        if improved:
            _save_checkpoint(checkpoint, best_path)
        _save_checkpoint(checkpoint, last_path)
        console.print(
            f"stage {stage} epoch {epoch + 1:>3}/{epochs}  loss {record['losses']['loss']:.4f}  "
            f"train WAR {record['train_war']:6.2f} UAR {record['train_uar']:6.2f} | "
            f"valid WAR {record['valid_war']:6.2f} UAR {record['valid_uar']:6.2f} | "
            f"best WAR {best['valid_war']:6.2f} UAR {best['valid_uar']:6.2f}  ({record['seconds']:.1f}s)",
            highlight=False,
        )
        console.print(confusion_table(val_cm, cfg.classes, f"valid confusion matrix, epoch {epoch + 1}"))
        distributed.barrier()
    best = distributed.gather(best)[0]
    if not best_path.exists():
        raise RuntimeError(f"stage {stage} ran no epochs (--epochs-stage{stage} 0?)")
    return StageResult(stage, best_path, last_path, best)


def is_finetuned(encoder: dict) -> bool:
    return "finetuned_from" in encoder


def finetuned_identity(model: CAERModel, encoder: dict) -> dict:
    """Stage 3 changes the image encoder: its identity becomes a digest of its weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.clip.visual.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    base = encoder.get("finetuned_from", encoder["weights"])
    return {**encoder, "weights": "finetuned:" + digest.hexdigest(), "finetuned_from": base}


def run(cfg: RunConfig, console: Console | None = None) -> list[StageResult]:
    """``caer train``: one stage, or 1 -> 2 -> 3 with ``--staged-training``, each from the last one's best."""
    console = console or Console()
    stages = [1, 2, 3] if cfg.staged_training else [cfg.stage]
    if any(s not in (1, 2, 3) for s in stages):
        raise ValueError(f"--stage must be 1, 2 or 3, got {cfg.stage}")
    results: list[StageResult] = []
    init = Path(cfg.init_from) if cfg.init_from else None
    if init is None and not cfg.staged_training and cfg.stage > 1:
        previous = Path(cfg.run_dir) / f"stage{cfg.stage - 1}-best.pt"
        if previous.exists():
            init = previous
    if not cfg.staged_training:
        if init is not None:
            console.print(f"stage {cfg.stage} starts from {init}")
        elif cfg.stage > 1:
            console.print(f"[yellow]note:[/] stage {cfg.stage} starts from scratch: no --init-from and no "
                          f"stage{cfg.stage - 1}-best.pt in {cfg.run_dir}")
    for stage in stages:
        if cfg.staged_training and cfg.stage_epochs(stage) == 0:
            console.print(f"[dim]stage {stage}: 0 epochs, skipped[/]")
            continue
        result = train_stage(cfg, stage, console, init_from=init)
        results.append(result)
        init = result.best_path
    if results and cfg.test_list and distributed.init()[0] == 0:
        write_test_report(results[-1].best_path, cfg, console)
    return results


def write_test_report(checkpoint: Path, cfg: RunConfig, console: Console) -> None:
    """Evaluate the run's final best checkpoint on the test split; write test_report.json (and .png) beside it."""
    from .evaluate import evaluate

    report = evaluate(checkpoint, "test", "raw" if cfg.source == "raw" else "auto", console=console)
    run_dir = Path(cfg.run_dir)
    report.write_json(run_dir / "test_report.json")
    report.plot(run_dir / "test_confusion.png")
    console.print(report.tables())
    console.print(f"test report: {run_dir / 'test_report.json'}")
