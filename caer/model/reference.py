"""The authors' released CLIP-CAER checkpoint, as a caer checkpoint (``caer import-reference``).

The official training script saves ``{"epoch", "state_dict", "best_acc", "optimizer", "recorder"}``. Its model
registers these modules, so ``state_dict`` holds:
- ``image_encoder.*``: CLIP's image tower, fine-tuned;
- ``text_encoder.{transformer.*, positional_embedding, ln_final.*, text_projection}``: CLIP's frozen text tower;
- ``clip_model_.*``: the whole CLIP model once more. Its towers are the very modules above, so those tensors repeat
  them (checked, then left out); only ``token_embedding`` and ``logit_scale`` appear nowhere else;
- ``prompt_learner.{ctx, token_prefix, token_suffix}``: the context vectors and, as buffers, the embedded tokens of
  each class's prompt around them (start-of-text before; the class's sentence, end-of-text and padding after);
- ``temporal_net.*`` and ``temporal_net_body.*``: the face and body temporal transformers;
- ``project_fc.*``: Linear(2D -> D) over the two streams' outputs.

caer's reference mode (``configs/clip-caer-reference.yaml``) has one tensor for each of these.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch

from ..config import IMPORT_OVERRIDES, RunConfig, load_config
from .caer_model import CAERModel
from .checkpoint import finetuned_identity, safe_load
from .encoder import RANDOM_WEIGHTS, CLIPBackbone, file_sha256, load_backbone

REFERENCE_CONFIG = "clip-caer-reference"  # the shipped config of the reference mode
LAYER = "temporal_transformer.layers.{i}"  # one layer of the official temporal transformer


def _temporal(official: str, ours: str) -> list[tuple[str, str]]:
    return [
        (f"{official}.cls_token", f"{ours}.cls"),
        (f"{official}.pos_embedding", f"{ours}.pos"),
        (f"{official}.{LAYER}.0.fn.norm.{{p}}", f"{ours}.blocks.{{i}}.attn_norm.{{p}}"),
        (f"{official}.{LAYER}.0.fn.fn.to_qkv.weight", f"{ours}.blocks.{{i}}.qkv.weight"),
        (f"{official}.{LAYER}.0.fn.fn.to_out.0.{{p}}", f"{ours}.blocks.{{i}}.out.{{p}}"),
        (f"{official}.{LAYER}.1.fn.norm.{{p}}", f"{ours}.blocks.{{i}}.mlp_norm.{{p}}"),
        (f"{official}.{LAYER}.1.fn.fn.net.0.{{p}}", f"{ours}.blocks.{{i}}.fc1.{{p}}"),
        (f"{official}.{LAYER}.1.fn.fn.net.3.{{p}}", f"{ours}.blocks.{{i}}.fc2.{{p}}"),
    ]


# (official name, caer name): {rest} is any suffix, {i} a layer number, {p} weight or bias
MAPPED = [
    ("image_encoder.{rest}", "clip.visual.{rest}"),
    ("text_encoder.transformer.{rest}", "clip.transformer.{rest}"),
    ("text_encoder.positional_embedding", "clip.positional_embedding"),
    ("text_encoder.ln_final.{p}", "clip.ln_final.{p}"),
    ("text_encoder.text_projection", "clip.text_projection"),
    ("clip_model_.token_embedding.weight", "clip.token_embedding.weight"),
    ("clip_model_.logit_scale", "clip.logit_scale"),  # unused by either model's logits (they divide by 0.01)
    ("prompt_learner.ctx", "prompt_learner.ctx"),
    ("prompt_learner.token_prefix", "prompt_learner.prefix"),
    ("prompt_learner.token_suffix", "prompt_learner.suffix"),
    ("project_fc.{p}", "fusion.{p}"),
    *_temporal("temporal_net", "temporal_face"),
    *_temporal("temporal_net_body", "temporal_context"),
]

# (official name, the mapped official name it repeats): deliberately unused, once checked equal
REPEATS = [
    ("clip_model_.visual.{rest}", "image_encoder.{rest}"),
    ("clip_model_.transformer.{rest}", "text_encoder.transformer.{rest}"),
    ("clip_model_.positional_embedding", "text_encoder.positional_embedding"),
    ("clip_model_.ln_final.{p}", "text_encoder.ln_final.{p}"),
    ("clip_model_.text_projection", "text_encoder.text_projection"),
]

# caer tensors with no official counterpart, computed by the import
COMPUTED = {
    "prompt_learner.tokens": "end-of-text position of each class's prompt, found in its embeddings",
    "t_desc": "text features of the config's descriptive sentences (unused by the reference's logits)",
}

_SLOTS = {"rest": r".+", "i": r"\d+", "p": r"weight|bias"}


@functools.cache
def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # text, slot, text, slot, ..., text
    return re.compile("".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_SLOTS[p]})" for k, p in enumerate(parts)))


def translate(name: str, rules: list[tuple[str, str]], backwards: bool = False) -> str | None:
    """``name`` renamed by the first rule whose pattern it matches (caer -> official with ``backwards``), or None."""
    for official, ours in rules:
        source, target = (ours, official) if backwards else (official, ours)
        found = _regex(source).fullmatch(name)
        if found:
            return target.format(**found.groupdict())
    return None


# ------------------------------------------------------------------------------------------ reading the file

class _TrainingRecord:
    """Stands in for the training-curve recorder the official script pickles beside the weights (a class of its
    main script): unpickling fills in its attributes, plain numbers and arrays, and runs none of the file's code."""


def _allowed_globals() -> list:
    """What ``weights_only`` loading must accept in an official checkpoint besides tensors: numpy scalars and arrays
    (``best_acc``, the recorder's curves; under numpy 1's and numpy 2's module names) and the recorder itself."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    numpy_helpers = [(multiarray._reconstruct, f"{m}.multiarray._reconstruct") for m in ("numpy.core", "numpy._core")]
    numpy_helpers += [(multiarray.scalar, f"{m}.multiarray.scalar") for m in ("numpy.core", "numpy._core")]
    kinds = (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_)
    return [*numpy_helpers, np.ndarray, np.dtype, *{type(np.dtype(k)) for k in kinds},
            (_TrainingRecord, "__main__.RecorderMeter")]


@dataclass
class Official:
    """An official checkpoint: its model tensors and what its training recorded."""

    path: Path
    state: dict[str, torch.Tensor]
    epoch: int | None = None  # epochs trained when it was saved
    best_acc: float | None = None  # the script's best "validation" UAR (its validation list is its test list)


def read_official(path: str | Path) -> Official:
    """The official checkpoint at ``path``, read with ``weights_only=True``: the only globals it may name are numpy's
    scalar and array helpers and the training recorder (a stand-in object receives its attributes)."""
    path = Path(path)
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        raise ValueError(f"caer import-reference needs torch 2.6 or newer to read {path} safely (this is "
                         f"{torch.__version__}): pip install -U torch")
    blob = safe_load(path, _allowed_globals(), remedy="It holds more than the official training script saves")
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state_dict of tensors in it (expected the official training script's "
                         "model.pth or model_best.pth)")
    epoch, best = (blob.get("epoch"), blob.get("best_acc")) if "state_dict" in blob else (None, None)
    return Official(path, dict(state), int(epoch) if isinstance(epoch, int) else None,
                    float(best) if isinstance(best, (int, float, np.number, torch.Tensor)) else None)


# ------------------------------------------------------------------------------------------ mapping

def _need(official: Official, name: str) -> torch.Tensor:
    if name not in official.state:
        raise ValueError(f"{official.path}: missing key {name!r} in its state_dict")
    return official.state[name]


def reference_config(official: Official, overrides: dict | None = None) -> RunConfig:
    """``configs/clip-caer-reference.yaml`` with ``overrides`` (``IMPORT_OVERRIDES``), the sizes the official tensors
    fix (context vectors, frames, temporal layers and MLP width) and the prompts' embeddings taken from the file."""
    unknown = sorted(set(overrides or {}) - set(IMPORT_OVERRIDES))
    if unknown:
        raise ValueError(f"caer import-reference does not take {unknown[0]!r}")
    ctx = _need(official, "prompt_learner.ctx")
    layers = {int(m.group(1)) for k in official.state
              if (m := re.fullmatch(r"temporal_net\.temporal_transformer\.layers\.(\d+)\..+", k))}
    first_mlp = f"temporal_net.{LAYER.format(i=0)}.1.fn.fn.net.0.weight"
    sizes = {"contexts_number": ctx.shape[-2], "class_specific_contexts": ctx.dim() == 3,
             "num_frames": _need(official, "temporal_net.pos_embedding").shape[1] - 1,
             "temporal_layers": max(layers, default=0) + 1, "temporal_mlp": _need(official, first_mlp).shape[0],
             "class_prompts": "embedded"}
    cfg = load_config(REFERENCE_CONFIG, {**(overrides or {}), **sizes})
    if f"{cfg.encoder.model}-quickgelu" in open_clip.list_models():  # e.g. plain ViT-B-32: exact GELU
        raise ValueError(f"--model {cfg.encoder.model}: the authors' CLIP is OpenAI's, trained with QuickGELU; use "
                         f"--model {cfg.encoder.model}-quickgelu")
    classes = _need(official, "prompt_learner.token_prefix").shape[0]
    if classes != len(cfg.model.classes):
        raise ValueError(f"{official.path}: its prompts are for {classes} classes, but the config lists "
                         f"{len(cfg.model.classes)} ({', '.join(cfg.model.classes)})")
    return cfg


def map_state(official: Official, expected: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(caer's state from the official tensors, the official names deliberately left out). Every official tensor is
    mapped or repeats a mapped one (checked equal); anything else, a missing tensor or a wrong shape is an error
    naming the official key. ``expected``: the state dict of caer's model, which fixes names and shapes."""
    where, state = official.path, official.state
    unexpected, mapped, repeats = [], {}, []
    for name, tensor in state.items():
        ours, twin = translate(name, MAPPED), translate(name, REPEATS)
        if ours is not None and ours in expected:
            mapped[ours] = name
        elif twin is not None:
            if twin in state and not torch.equal(state[twin], tensor):
                raise ValueError(f"{where}: {name} differs from {twin}, which it should repeat (the official model "
                                 "registers the same CLIP modules twice)")
            repeats.append(name)
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"{where}: unexpected key {unexpected[0]!r} in its state_dict ({len(unexpected)} in all); "
                         "caer maps the official CLIP-CAER model only")
    missing = [translate(k, MAPPED, backwards=True) or k for k in expected if k not in COMPUTED and k not in mapped]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r} in its state_dict ({len(missing)} in all)")
    for ours, name in mapped.items():
        if state[name].shape != expected[ours].shape:
            raise ValueError(f"{where}: {name} has shape {list(state[name].shape)}, but caer's reference model "
                             f"({ours}) has {list(expected[ours].shape)}: is it a ViT-B/32 CLIP-CAER checkpoint?")
    return {ours: state[name] for ours, name in mapped.items()}, repeats


def prompt_tokens(official: Official, start: int, end: int) -> torch.Tensor:
    """Token ids [C, L] for the text encoder's pooling: ``start`` first, ``end`` where each class's prompt holds the
    end-of-text embedding (found by comparing its rows with the file's own token-embedding table), 0 elsewhere."""
    table = _need(official, "clip_model_.token_embedding.weight")
    prefix, suffix = _need(official, "prompt_learner.token_prefix"), _need(official, "prompt_learner.token_suffix")
    ctx = _need(official, "prompt_learner.ctx")
    if not torch.equal(prefix, table[start].expand_as(prefix)):
        raise ValueError(f"{official.path}: prompt_learner.token_prefix is not the start-of-text embedding of its "
                         "clip_model_.token_embedding: the prompts and the text encoder do not belong together")
    offset = 1 + ctx.shape[-2]
    tokens = torch.zeros(len(prefix), offset + suffix.shape[1], dtype=torch.long)
    tokens[:, 0] = start
    for k, rows in enumerate(suffix):
        found = (rows == table[end]).all(-1).nonzero()
        if not len(found):
            raise ValueError(f"{official.path}: class {k + 1}'s prompt (prompt_learner.token_suffix[{k}]) holds no "
                             "end-of-text embedding")
        tokens[k, offset + int(found[0])] = end
    return tokens


# ------------------------------------------------------------------------------------------ converting

@dataclass
class Imported:
    """A converted checkpoint and what the conversion did."""

    checkpoint: dict
    mapped: int  # official tensors mapped onto caer's
    repeats: list[str] = field(default_factory=list)  # official tensors left out as repeats of mapped ones
    sha256: str = ""


def convert(official: Official, cfg: RunConfig) -> Imported:
    """The caer checkpoint of an official one: stage 3 (its own fine-tuned image encoder), holding all of CLIP, so
    ``caer eval`` and ``caer extract --from-checkpoint`` need no other weights."""
    backbone = load_backbone(cfg.encoder.model, RANDOM_WEIGHTS, "cpu", cfg.encoder.preprocess)
    model = CAERModel(backbone, cfg.model)
    expected = model.state_dict()
    state, repeats = map_state(official, expected)
    start, end = backbone.tokenizer([""])[0, :2].tolist()  # "" tokenises to start-of-text, end-of-text
    state["prompt_learner.tokens"] = prompt_tokens(official, start, end)
    state["t_desc"] = expected["t_desc"]
    model.load_state_dict(state)
    model.t_desc.copy_(model.encode_descriptions())  # with the file's text tower, now loaded
    sha = file_sha256(official.path)
    checkpoint = {
        "stage": 3, "epoch": max((official.epoch or 1) - 1, 0), "config": cfg.to_dict(),
        "model": {k: v.detach() for k, v in model.state_dict().items()},
        "encoder": imported_identity(model, backbone, cfg), "classes": list(cfg.model.classes),
        "imported": {"source": str(official.path), "sha256": sha, "epoch": official.epoch,
                     "best_acc": official.best_acc},
    }
    return Imported(checkpoint, len(state) - len(COMPUTED), repeats, sha)


def imported_identity(model: CAERModel, backbone: CLIPBackbone, cfg: RunConfig) -> dict:
    """The encoder identity of a converted checkpoint: fine-tuned (a digest of its image tower) from the weights the
    reference started from (the config's ``pretrained``, OpenAI's), with the reference's preprocessing."""
    return finetuned_identity(model, {**backbone.identity(), "weights": cfg.encoder.pretrained})
