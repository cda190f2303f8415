"""Checkpoints of ``caer train``, and building a model from a run config (and a checkpoint).

A checkpoint is a dict: ``model`` (weights; CLIP's frozen towers are left out, a fine-tuned image
encoder is kept), ``config`` (the flat run config), ``encoder`` (the identity of the image encoder
whose features the model expects), ``stage``, ``epoch``, ``best``, ``metrics``, the optimiser,
scheduler, scaler and RNG states, and ``cache_fingerprint``: tensors and plain Python values only, so that
``load_checkpoint`` reads it with ``torch.load(weights_only=True)``, which cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .. import runtime
from ..config import ClassPrompts, RunConfig, check_config, from_saved, replace_options
from ..files import missing, replaced_atomically
from .caer_model import CAERModel
from .encoder import RANDOM_WEIGHTS, CLIPBackbone, WeightsNotFound, load_backbone, weights_digest


def build_model(cfg: RunConfig, device: torch.device, checkpoint: dict | None = None) -> tuple[CAERModel, CLIPBackbone]:
    """The CLIP backbone named by the config, the CAER model on top, and a checkpoint's weights if given.

    A checkpoint that carries all of CLIP (``carries_clip``) needs no ``--pretrained`` weights: they would be
    overwritten, so the backbone starts from a random init and nothing is downloaded."""
    if cfg.model.class_prompts == ClassPrompts.embedded and checkpoint is None:
        raise ValueError("--class-prompts embedded takes the prompts' token embeddings from a checkpoint (e.g. one "
                         "written by caer import-reference): give one (--init-from), or use --class-prompts text")
    if checkpoint is not None:
        check_same_text(cfg, checkpoint)
    whole = checkpoint is not None and carries_clip(checkpoint)
    backbone = load_backbone(cfg.encoder.model, RANDOM_WEIGHTS if whole else cfg.encoder.pretrained, device,
                             cfg.encoder.preprocess)
    if checkpoint is not None and not whole:
        check_base_weights(checkpoint, backbone, cfg.encoder.pretrained)
    torch.manual_seed(cfg.run.seed)
    model = CAERModel(backbone, cfg.model).to(device)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model, backbone


# what the prompts and the fixed class sentences (t_desc, kept in checkpoints) are made of
TEXT_KEYS = ("classes", "descriptions", "soft_prompt_text", "class_token_position")


def check_same_text(cfg: RunConfig, checkpoint: dict) -> None:
    """Refuse a config whose class texts differ from the checkpoint's: its learned prompts sit before those texts,
    and its sentence embeddings (t_desc) would silently replace the config's."""
    saved = checkpoint_config(checkpoint).model
    for key in TEXT_KEYS:
        theirs, ours = getattr(saved, key), getattr(cfg.model, key)
        if theirs != ours:
            raise ValueError(f"it was trained with {key} {_shown(theirs)}, this run sets {_shown(ours)}: keep the "
                             "checkpoint's (or start without it)")


def _shown(value) -> str:
    return repr([str(v) for v in value]) if isinstance(value, list) else str(value)


def check_base_weights(checkpoint: dict, backbone: CLIPBackbone, pretrained: str) -> None:
    """Refuse CLIP weights other than those the checkpoint was trained from (for a stage-3 checkpoint, those its
    image encoder was fine-tuned from): its prompts, adapter and classifier only make sense on their features and
    text embeddings. A relative --pretrained path saved in the config may name another file where it is used."""
    encoder = checkpoint["encoder"]
    expected = encoder.get("finetuned_from", encoder.get("weights"))
    if expected is not None and backbone.weights != expected:
        raise ValueError(f"it was trained from the CLIP weights {expected}, but --pretrained {pretrained} gives "
                         f"{backbone.weights}: pass the weights it was trained from with --pretrained")


TRUST_ENV = "CAER_TRUST_CHECKPOINTS"  # =1: load checkpoints that need full unpickling (files you trust only)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``caer train``, loaded with ``weights_only=True`` so that opening a shared file
    cannot run code (clear errors for anything else)."""
    path = Path(path)
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "encoder" not in ckpt:
        raise ValueError(f"{path}: not a caer checkpoint (made by caer train)")
    return ckpt


def safe_load(path: Path, allowed: list | tuple = (), remedy: str = "Re-create it with this version of caer"):
    """``torch.load`` on the CPU with ``weights_only=True`` (plus the ``allowed`` globals, as
    ``torch.serialization.safe_globals`` takes them); a file that needs full unpickling is refused, saying
    ``remedy``, unless ``CAER_TRUST_CHECKPOINTS=1``. Every failure is one ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(missing(path, "checkpoint") if path.is_dir() else f"{path}: no such checkpoint")
    if not _looks_like_torch_save(path):  # else torch's pickle reader would call it unsafe, and suggest trusting it
        raise ValueError(f"{path}: not a checkpoint (neither a torch.save zip file nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(allowed)) if allowed else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if os.environ.get(TRUST_ENV) != "1":
            raise ValueError(_unsafe_message(path, err, remedy)) from None
        return _load_trusted(path)
    except Exception as err:  # not a torch file at all, or a truncated one
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def _looks_like_torch_save(path: Path) -> bool:
    """A zip file (``torch.save`` since torch 1.6) or a pickle (protocol 2 and later start with byte 0x80)."""
    with open(path, "rb") as f:
        return zipfile.is_zipfile(f) or f.seek(0) == 0 and f.read(1) == b"\x80"


def _unsafe_message(path: Path, err: Exception, remedy: str) -> str:
    """One line: why the file was refused, and what to do."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f" (it refers to {found.group(1)})" if found else ""
    return (f"{path}: cannot be loaded safely: it needs full unpickling{what}, which can run arbitrary code. "
            f"{remedy}, or, only if you trust the file, set {TRUST_ENV}=1")


def _load_trusted(path: Path):
    """Full unpickling, asked for with ``CAER_TRUST_CHECKPOINTS=1`` (e.g. a checkpoint of an older caer)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def checkpoint_config(ckpt: dict, overrides: dict | None = None) -> RunConfig:
    """The run config saved in a checkpoint (``config.from_saved``), with ``overrides`` (None values ignored)."""
    cfg = from_saved(ckpt["config"], "checkpoint config")
    if overrides:
        cfg = replace_options(cfg, overrides)
    check_config(cfg)
    return cfg


def model_from_checkpoint(path: str | Path, overrides: dict | None = None,
                          device: torch.device | None = None) -> tuple[dict, RunConfig, CAERModel, CLIPBackbone]:
    """(the checkpoint, its run config with ``overrides``, its model, the CLIP backbone under it), on ``device`` (or
    the config's). Every failure is one line naming the checkpoint."""
    ckpt = load_checkpoint(path)
    try:
        cfg = checkpoint_config(ckpt, overrides)
        model, backbone = build_model(cfg, device or runtime.resolve_device(cfg.runtime.device), ckpt)
    except ValueError as err:
        hint = ("; pass --pretrained with the base weights it was trained from (a file on this machine or an "
                "open_clip tag)") if isinstance(err, WeightsNotFound) else ""
        raise ValueError(f"{path}: {err}{hint}") from None
    return ckpt, cfg, model, backbone


def backbone_from_checkpoint(path: str | Path, device: torch.device, pretrained: str | None = None) -> CLIPBackbone:
    """The image encoder of a checkpoint (fine-tuned by stage 3, or the base one), with its identity; ``pretrained``:
    where its base CLIP weights are, if not where its config says."""
    ckpt, _, model, backbone = model_from_checkpoint(path, {"pretrained": pretrained}, device)
    backbone.weights, backbone.finetuned_from = ckpt["encoder"]["weights"], ckpt["encoder"].get("finetuned_from")
    return backbone


def model_state(model: CAERModel, with_image_encoder: bool, with_clip: bool = False) -> dict:
    """Weights worth saving: everything but CLIP's towers, plus the image encoder once it has changed, and all of
    CLIP when ``with_clip`` (the model's text tower came from a checkpoint that carries it, not from --pretrained)."""
    return {
        k: v.detach().cpu()
        for k, v in model.state_dict().items()
        if with_clip or not k.startswith("clip.") or (with_image_encoder and k.startswith("clip.visual."))
    }


def carries_clip(checkpoint: dict) -> bool:
    """Whether a checkpoint holds CLIP's text tower as well as its image tower (``caer import-reference`` writes
    such checkpoints, whose text tower comes from the official file); then every CLIP weight must be there."""
    return any(k.startswith("clip.") and not k.startswith("clip.visual.") for k in checkpoint["model"])


def load_weights(model: CAERModel, checkpoint: dict) -> None:
    """The checkpoint's weights into ``model``; a key missing or left over (another model layout) is an error."""
    try:
        missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    except RuntimeError as err:  # a shape that differs: name the first one (the config's sizes differ from the file's)
        found = re.search(r"size mismatch for [^\n]+", str(err))
        raise ValueError(f"checkpoint does not fit this model: {found.group(0) if found else err}") from None
    unexpected = [k for k in unexpected if not k.startswith("clip.visual.")]
    whole = carries_clip(checkpoint)
    missing = [k for k in missing if whole or not k.startswith("clip.")]
    if missing or unexpected:
        hint = (" (its class prompts are stored in it: add --class-prompts embedded)"
                if "prompt_learner.prefix" in unexpected else "")
        raise ValueError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}{hint}")


def is_finetuned(encoder: dict) -> bool:
    return "finetuned_from" in encoder


def finetuned_identity(model: CAERModel, encoder: dict) -> dict:
    """Stage 3 changes the image encoder: its identity becomes a digest of its weights."""
    base = encoder.get("finetuned_from", encoder["weights"])
    return {**encoder, "weights": "finetuned:" + weights_digest(model.clip.visual), "finetuned_from": base}


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write to a temporary file and rename it, so a stop mid-write never leaves a truncated checkpoint.

    Numpy values become plain numbers and tensors, so that the file loads with ``weights_only=True``.
    """
    with replaced_atomically(path) as temp:
        try:
            torch.save(plain(checkpoint), temp)
        except RuntimeError as err:  # torch's C++ writer reports a failed write (a full disk) as a RuntimeError
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OSError(errno.EIO, f"cannot write the checkpoint ({cause}): is the disk full?", str(path)) from None


def plain(value):
    """``value`` with numpy scalars as Python numbers and numpy arrays as tensors, in dicts, lists and tuples."""
    if type(value) is dict:
        return {k: plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value
