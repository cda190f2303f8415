"""Checkpoints of ``caer train``, and building a model from a run config (and a checkpoint).

A checkpoint is a dict: ``model`` (weights; CLIP's frozen towers are left out, a fine-tuned image
encoder is kept), ``config`` (the flat run config), ``encoder`` (the identity of the image encoder
whose features the model expects), ``stage``, ``epoch``, ``best``, ``metrics``, the optimiser,
scheduler, scaler and RNG states, and ``cache_fingerprint``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import RunConfig, check_config, from_flat, options, replace_options
from .caer_model import CAERModel
from .encoder import CLIPBackbone, load_backbone, weights_digest


def build_model(cfg: RunConfig, device: torch.device, checkpoint: dict | None = None) -> tuple[CAERModel, CLIPBackbone]:
    """The CLIP backbone named by the config, the CAER model on top, and a checkpoint's weights if given."""
    backbone = load_backbone(cfg.encoder.model, cfg.encoder.pretrained, device)
    torch.manual_seed(cfg.run.seed)
    model = CAERModel(backbone, cfg.model).to(device)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model, backbone


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
    """The run config saved in a checkpoint, with ``overrides`` (None values ignored).

    Keys that this version no longer declares are dropped, so older checkpoints still load.
    """
    known = {f.name for f, _ in options(RunConfig)}
    cfg = from_flat(RunConfig, {k: v for k, v in ckpt["config"].items() if k in known}, "checkpoint config")
    if overrides:
        cfg = replace_options(cfg, overrides)
    check_config(cfg)
    return cfg


def backbone_from_checkpoint(path: str | Path, device: torch.device) -> CLIPBackbone:
    """The image encoder of a checkpoint (fine-tuned by stage 3, or the base one), with its identity."""
    ckpt = load_checkpoint(path)
    model, backbone = build_model(checkpoint_config(ckpt), device, ckpt)
    backbone.weights, backbone.finetuned_from = ckpt["encoder"]["weights"], ckpt["encoder"].get("finetuned_from")
    return backbone


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


def is_finetuned(encoder: dict) -> bool:
    return "finetuned_from" in encoder


def finetuned_identity(model: CAERModel, encoder: dict) -> dict:
    """Stage 3 changes the image encoder: its identity becomes a digest of its weights."""
    base = encoder.get("finetuned_from", encoder["weights"])
    return {**encoder, "weights": "finetuned:" + weights_digest(model.clip.visual), "finetuned_from": base}


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write to a temporary file and rename it, so a stop mid-write never leaves a truncated checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
