"""The CLIP backbone (open_clip): by name, with weights from a tag, a local file, or random init.

Everything here that knows open_clip's internals (transform layout, block names) stays in this file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import text_global_pool
from PIL import Image
from torchvision import transforms as T

from ..config import Preprocessing
from ..files import replaced_atomically

CLIP_CONFIG_DIR = Path(str(importlib.resources.files("caer.configs") / "clip"))
open_clip.add_model_config(CLIP_CONFIG_DIR)  # makes the offline tiny model ("caer-tiny") known by name

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"  # --pretrained value: random init with a fixed seed (tests, timing)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex (weights files are identified by it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Preprocess:
    """open_clip's eval transform, split so that only uint8 pixels cross process boundaries.

    ``pil`` (resize, centre crop) runs in data-loader workers; ``normalize`` (to [0,1], then
    CLIP mean/std) runs on the device. Together they equal the encoder's own transform
    (``--preprocess reference``: the reference code's input instead, see ``Preprocess.reference``).
    """

    pil: T.Compose
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int

    @classmethod
    def from_transform(cls, transform: T.Compose, image_size: int) -> Preprocess:
        steps = list(transform.transforms)
        to_tensor = next(i for i, t in enumerate(steps) if isinstance(t, T.ToTensor))
        normalize = steps[-1]
        if not isinstance(normalize, T.Normalize) or to_tensor != len(steps) - 2:
            raise ValueError(f"unexpected open_clip transform layout: {transform}")
        return cls(T.Compose(steps[:to_tensor]), tuple(normalize.mean), tuple(normalize.std), image_size)

    @classmethod
    def reference(cls, image_size: int) -> Preprocess:
        """CLIP-CAER's input: each view squashed to ``image_size`` square with Pillow's bilinear filter (a
        letterboxed context view keeps its aspect), and pixels in [0, 1] with no mean/std."""
        squash = T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR)
        return cls(T.Compose([squash]), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), image_size)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """[3, S, S] uint8 tensor of the resized, centre-cropped image."""
        return T.functional.pil_to_tensor(self.pil(img))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] -> normalised float32 on the same device."""
        mean, std = _channel_constants(self.mean, self.std, pixels.device)
        return (pixels.float() / 255.0 - mean) / std

    def describe(self) -> dict:
        return {"transform": repr(self.pil), "mean": list(self.mean), "std": list(self.std)}


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std [3, 1, 1] on ``device``, made once: copying them there at each call would make the host wait
    for the GPU's queue each time (a copy from pageable memory)."""
    return (torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1))


@dataclass
class CLIPBackbone:
    """An open_clip model (image and text towers) with its tokenizer, preprocessing and identity."""

    model: open_clip.CLIP
    tokenizer: object
    preprocess: Preprocess
    name: str
    weights: str  # open_clip tag, "sha256:<hex>" of a local file, "random", or "finetuned:<digest>" (stage 3)
    finetuned_from: str | None = None  # the weights stage 3 started from

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict:
        """Everything about the encoder that determines its image features."""
        identity = {
            "model": self.name,
            "weights": self.weights,
            "image_size": self.preprocess.image_size,
            "embed_dim": self.embed_dim,
            "preprocess": self.preprocess.describe(),
        }
        if self.finetuned_from:
            identity["finetuned_from"] = self.finetuned_from
        return identity


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def load_backbone(name: str, pretrained: str, device: str | torch.device = "cpu",
                  preprocess: Preprocessing = Preprocessing.open_clip) -> CLIPBackbone:
    """Build an open_clip model by name; ``pretrained`` is a tag, a local checkpoint file, or ``random``;
    ``preprocess`` is open_clip's own eval transform or the reference's pixels (``Preprocess.reference``)."""
    check_weights(name, pretrained)
    if pretrained == RANDOM_WEIGHTS:
        torch.manual_seed(0)
        with _quiet_root_logger():  # open_clip warns that the weights are random: that is the point
            model, _, transform = open_clip.create_model_and_transforms(name, pretrained=None)
        weights = RANDOM_WEIGHTS
    elif os.path.isfile(pretrained):
        with _quiet_root_logger():
            model, _, transform = open_clip.create_model_and_transforms(name, pretrained=None)
        # OpenAI's own .pt files are TorchScript archives, which torch.load refuses with weights_only=True
        open_clip.load_checkpoint(model, pretrained, weights_only=not _is_torchscript(pretrained))
        weights = "sha256:" + file_sha256(pretrained)
    else:
        try:
            model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except RuntimeError as err:
            if "download" not in str(err).lower():
                raise
            raise ValueError(f"--pretrained {pretrained!r}: the weights could not be downloaded (no internet here?); "
                             "download them once where there is, or give a local file of them") from None
        weights = pretrained
    model = model.to(device).eval()
    log.info("image encoder: open_clip %s, weights %s, on %s", name, weights, device)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    pixels = (Preprocess.reference(image_size) if Preprocessing(preprocess) == Preprocessing.reference
              else Preprocess.from_transform(transform, image_size))
    return CLIPBackbone(model, open_clip.get_tokenizer(name), pixels, name, weights)


class WeightsNotFound(ValueError):
    """``--pretrained`` names neither a file nor a tag of the model (callers may say where the weights should be)."""


def check_weights(name: str, pretrained: str | None = None) -> None:
    """Refuse, before anything is built or written, an unknown open_clip model name, and ``pretrained`` (when given)
    that is neither ``random``, a file nor an open_clip tag of that model: the errors ``load_backbone`` gives."""
    if name not in open_clip.list_models():
        raise ValueError(f"--model {name!r}: unknown open_clip model (try ViT-B-32, or caer-tiny for tests)")
    if pretrained is None or pretrained == RANDOM_WEIGHTS or os.path.isfile(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise WeightsNotFound(
            f"--pretrained {pretrained!r}: not a file and not an open_clip tag of {name} (tags: {', '.join(tags) or 'none'})"
        )


def save_random_weights(name: str, path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised open_clip state dict (the offline stand-in for real weights), under a temporary
    name first: a failed or stopped write leaves no half-written file and an existing one as it was."""
    check_weights(name)
    torch.manual_seed(seed)
    with _quiet_root_logger():
        model = open_clip.create_model(name, pretrained=None)
    path = Path(path)
    # through a file object: the archive's inner name does not depend on the path's, so the same weights always make
    # the same file (and digest)
    with replaced_atomically(path) as temp, open(temp, "wb") as f:
        torch.save(model.state_dict(), f)
    return path


def unfreeze_last_blocks(visual: torch.nn.Module, count: int) -> None:
    """Let only the last ``count`` transformer blocks of an open_clip ViT (and its output norm and
    projection) train; the rest of the image tower stays frozen."""
    blocks = visual.transformer.resblocks
    if not 1 <= count <= len(blocks):
        raise ValueError(f"--unfreeze-last must be in 1..{len(blocks)}")
    visual.requires_grad_(False)
    for module in [*blocks[-count:], visual.ln_post]:
        module.requires_grad_(True)
    if visual.proj is not None:
        visual.proj.requires_grad_(True)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's weights (names and values): the identity of a fine-tuned encoder."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def encode_text_embeddings(clip_model: torch.nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor,
                           length: int | None = None) -> torch.Tensor:
    """open_clip's ``encode_text`` from token embeddings instead of token ids (for learnable prompts).

    With CLIP's causal mask and end-of-text pooling, the padding after the last end-of-text token
    cannot change the result, so the sequence is cut there: prompts of ~20 tokens cost ~20, not 77.
    ``length``: that cut, when the caller knows it (finding it in ``tokens`` on a GPU makes the host wait).
    """
    cast = clip_model.transformer.get_cast_dtype()
    mask = clip_model.attn_mask
    if mask is not None and clip_model.text_pool_type == "argmax":
        length = length or int(tokens.argmax(-1).max()) + 1
        embeddings, tokens, mask = embeddings[:, :length], tokens[:, :length], mask[:length, :length]
    x = embeddings.to(cast) + clip_model.positional_embedding[: embeddings.shape[1]].to(cast)
    x = clip_model.ln_final(clip_model.transformer(x, attn_mask=mask))
    x = text_global_pool(x, tokens, clip_model.text_pool_type, eos_token_id=getattr(clip_model, "text_eos_id", None))
    proj = clip_model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
