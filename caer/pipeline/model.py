"""The CLIP-CAER model with its enhancements (SPEC section 5).

Per-frame image features of the face and context streams (from the cache, or from the CLIP image
encoder for raw frames) -> EAA adapter on the face stream -> one temporal transformer per stream
-> fusion Linear(2D -> D) + L2 norm = ``z``. Class prototypes are the fixed descriptive sentences
``t_desc`` or the CoOp prompts ``t_soft``, optionally pulled towards ``z`` by slerp (IEC);
logits = cos(z, prototype) / temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from .encoder import ClipModel


@dataclass
class ModelConfig:
    classes: list[str]
    descriptions: list[str]
    num_frames: int = 16
    streams: str = "both"  # both | face | context (single-stream ablations)
    input_norm: bool = True  # BatchNorm of the frame features before adapter and temporal encoders
    adapter: bool = True
    adapter_reduction: int = 4
    adapter_scale: float = 1.0
    adapter_mode: str = "residual"  # residual | replace (the reference's ReLU replacement)
    temporal_layers: int = 1
    temporal_heads: int | None = None  # default: D // 64 (8 for D = 512)
    temporal_mlp: int | None = None  # default: 2 * D (1024 for D = 512)
    dropout: float = 0.1
    contexts_number: int = 8
    class_specific_contexts: bool = True
    class_token_position: str = "end"  # end | middle | front
    temperature: float = 0.2
    slerp_weight: float = 0.0
    iec_base: str = "desc"  # desc | soft


class ExpressionAdapter(nn.Module):
    """EAA: bottleneck D -> D/r -> D. Residual with a zero-initialised up-projection, so training starts from CLIP's features."""

    def __init__(self, dim: int, reduction: int = 4, scale: float = 1.0, mode: str = "residual"):
        super().__init__()
        if mode not in ("residual", "replace"):
            raise ValueError(f"adapter mode must be residual or replace, got {mode!r}")
        self.down, self.up = nn.Linear(dim, dim // reduction), nn.Linear(dim // reduction, dim)
        self.scale, self.mode = scale, mode
        if mode == "residual":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(F.relu(self.down(x)))
        return x + self.scale * h if self.mode == "residual" else F.relu(h)


class TemporalEncoder(nn.Module):
    """Pre-norm transformer over T frame tokens with a learned CLS token and positions; returns the CLS output."""

    def __init__(self, dim: int, num_frames: int, layers: int, heads: int, mlp: int, dropout: float):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, num_frames + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, D]
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos[:, : x.shape[1] + 1]
        return self.norm(self.blocks(x)[:, 0])


def encode_text_embeddings(clip: nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` from token embeddings instead of token ids (for learnable prompts).

    With CLIP's causal mask and end-of-text pooling, the padding after the last end-of-text token
    cannot change the result, so the sequence is cut there: prompts of ~20 tokens cost ~20, not 77.
    """
    cast = clip.transformer.get_cast_dtype()
    mask = clip.attn_mask
    if mask is not None and clip.text_pool_type == "argmax":
        length = int(tokens.argmax(-1).max()) + 1
        embeddings, tokens, mask = embeddings[:, :length], tokens[:, :length], mask[:length, :length]
    x = embeddings.to(cast) + clip.positional_embedding[: embeddings.shape[1]].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=mask))
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class PromptLearner(nn.Module):
    """CoOp: ``n_ctx`` learnable context vectors around each class name, through the frozen text encoder."""

    def __init__(self, clip: ClipModel, classes: list[str], n_ctx: int, class_specific: bool, position: str):
        super().__init__()
        if position not in ("end", "middle", "front"):
            raise ValueError(f"class token position must be end, middle or front, got {position!r}")
        model = clip.model
        width = model.token_embedding.weight.shape[1]
        shape = (len(classes), n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx = nn.Parameter(torch.randn(shape) * 0.02)
        self.n_ctx, self.position = n_ctx, position
        placeholder = " ".join(["X"] * n_ctx)
        tokens = clip.tokenizer([f"{placeholder} {name}." for name in classes]).to(clip.device)
        name_lens = [len(clip.tokenizer.encode(name)) if hasattr(clip.tokenizer, "encode") else 1 for name in classes]
        with torch.no_grad():
            embedding = model.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedding[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)  # name . EOS pad
        self.name_lens = name_lens

    def embeddings(self) -> torch.Tensor:
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(len(self.prefix), -1, -1)
        if self.position == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for k, n in enumerate(self.name_lens):
            name, rest = self.suffix[k : k + 1, :n], self.suffix[k : k + 1, n:]
            c = ctx[k : k + 1]
            parts = [c[:, :half], name, c[:, half:]] if self.position == "middle" else [name, c]
            rows.append(torch.cat([self.prefix[k : k + 1], *parts, rest], dim=1))
        return torch.cat(rows)

    def forward(self, clip_model: nn.Module) -> torch.Tensor:
        # argmax pooling finds the EOS token, which keeps its index whatever the order inside the prompt
        return F.normalize(encode_text_embeddings(clip_model, self.embeddings(), self.tokens), dim=-1)


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float, eps: float = 1e-5) -> torch.Tensor:
    """Spherical interpolation from unit vectors ``a`` towards ``b`` (broadcast over leading dims).

    Near-parallel pairs (cos > 1 - eps) fall back to lerp + renormalise; near-antiparallel pairs
    (cos < -1 + eps: no unique arc) turn towards a fixed direction orthogonal to ``a``. Finite
    values and gradients everywhere.
    """
    dot = (a * b).sum(-1, keepdim=True)
    # decide on the cosine, not on sin(theta): the clamp keeps sin(theta) >= ~1.4e-3, so a test on
    # sin(theta) < eps never fired and antiparallel pairs came out shorter than unit (zero at weight 0.5)
    near = dot.abs() > 1 - eps
    theta = torch.acos(dot.clamp(-1 + 1e-6, 1 - 1e-6))
    sin = torch.sin(theta)
    safe = torch.where(near, torch.ones_like(sin), sin)
    arc = (torch.sin((1 - weight) * theta) * a + torch.sin(weight * theta) * b) / safe
    lerp = F.normalize((1 - weight) * a + weight * b, dim=-1, eps=1e-12)
    # orthogonal helper for antiparallel pairs: Gram-Schmidt of the basis vector where |a| is smallest
    basis = F.one_hot(a.abs().argmin(-1), a.shape[-1]).to(a.dtype)
    ortho = F.normalize(basis - (basis * a).sum(-1, keepdim=True) * a, dim=-1)
    turn = math.cos(weight * math.pi) * a + math.sin(weight * math.pi) * ortho
    return torch.where(near, torch.where(dot > 0, lerp, turn), arc)


def _per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a [N, D] module to every frame of [B, T, D]."""
    return module(x.flatten(0, 1)).view_as(x)


class CAERModel(nn.Module):
    """Both streams -> ``z``; class prototypes from the text side; cosine logits (see the module docstring)."""

    def __init__(self, clip: ClipModel, cfg: ModelConfig):
        super().__init__()
        if len(cfg.classes) != len(cfg.descriptions):
            raise ValueError(f"{len(cfg.classes)} classes but {len(cfg.descriptions)} descriptions in the config")
        if cfg.streams not in ("both", "face", "context"):
            raise ValueError(f"streams must be both, face or context, got {cfg.streams!r}")
        if cfg.iec_base not in ("desc", "soft"):
            raise ValueError(f"--iec-base must be desc or soft, got {cfg.iec_base!r}")
        self.cfg = cfg
        self.clip = clip.model  # image + text towers; the text tower is always frozen
        self.preprocess = clip.preprocess
        d = clip.embed_dim
        heads = cfg.temporal_heads or max(1, d // 64)
        mlp = cfg.temporal_mlp or 2 * d
        self.adapter = ExpressionAdapter(d, cfg.adapter_reduction, cfg.adapter_scale, cfg.adapter_mode) if cfg.adapter else nn.Identity()
        self.temporal_face = TemporalEncoder(d, cfg.num_frames, cfg.temporal_layers, heads, mlp, cfg.dropout)
        self.temporal_context = TemporalEncoder(d, cfg.num_frames, cfg.temporal_layers, heads, mlp, cfg.dropout)
        self.fusion = nn.Linear(d * (2 if cfg.streams == "both" else 1), d)
        # CLIP features of one dataset share a large common direction; centring and scaling each
        # dimension (BatchNorm over frames) lets the temporal encoders learn in far fewer steps.
        self.norm_face = nn.BatchNorm1d(d) if cfg.input_norm else nn.Identity()
        self.norm_context = nn.BatchNorm1d(d) if cfg.input_norm else nn.Identity()
        self.prompt_learner = PromptLearner(
            clip, cfg.classes, cfg.contexts_number, cfg.class_specific_contexts, cfg.class_token_position
        )
        with torch.no_grad():  # t_desc: fixed, computed once
            tokens = clip.tokenizer(cfg.descriptions).to(clip.device)
            t_desc = encode_text_embeddings(self.clip, self.clip.token_embedding(tokens), tokens)
            self.register_buffer("t_desc", F.normalize(t_desc.float(), dim=-1))
        for p in self.text_parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------- parameter groups

    def text_parameters(self):
        """The CLIP text tower (everything of ``clip`` but ``visual``): always frozen."""
        return [p for n, p in self.clip.named_parameters() if not n.startswith("visual.")]

    def temporal_modules(self) -> list[nn.Module]:
        """Input norms, temporal encoders and fusion of the streams in use (``--streams``)."""
        face = [self.norm_face, self.temporal_face] if self.cfg.streams in ("both", "face") else []
        context = [self.norm_context, self.temporal_context] if self.cfg.streams in ("both", "context") else []
        return [*face, *context, self.fusion]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups the stages train, each with its own learning rate; parameters in none stay frozen."""
        return {
            "prompt": list(self.prompt_learner.parameters()),
            "adapter": list(self.adapter.parameters()) if self.cfg.streams != "context" else [],
            "temporal": [p for m in self.temporal_modules() for p in m.parameters()],
            "image_encoder": list(self.clip.visual.parameters()),
        }

    # ----------------------------------------------------------------- forward pieces

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_desc, t_soft), both [C, D] and L2-normalised."""
        return self.t_desc, self.prompt_learner(self.clip).float()

    def encode_frames(self, pixels: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 frames [B, T, 2, 3, S, S] -> per-frame features [B, T, 2, D] via the CLIP image encoder.

        ``flip`` [B] bool mirrors a clip's images (view 1 of the cache).
        """
        b, t = pixels.shape[:2]
        x = self.preprocess.normalize(pixels)
        if flip is not None:
            x = torch.where(flip.view(b, 1, 1, 1, 1, 1), x.flip(-1), x)
        return self.clip.encode_image(x.flatten(0, 2)).float().view(b, t, 2, -1)

    def embed(self, face: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Per-frame features [B, T, D] of both streams -> fused, L2-normalised ``z`` [B, D]."""
        parts = []
        if self.cfg.streams in ("both", "face"):
            parts.append(self.temporal_face(self.adapter(_per_frame(self.norm_face, face.float()))))
        if self.cfg.streams in ("both", "context"):
            parts.append(self.temporal_context(_per_frame(self.norm_context, context.float())))
        return F.normalize(self.fusion(torch.cat(parts, dim=-1)), dim=-1)

    def logits(self, z: torch.Tensor, t_desc: torch.Tensor, t_soft: torch.Tensor) -> torch.Tensor:
        """cos(z, prototype_k) / temperature, prototypes pulled towards ``z`` by slerp when IEC is on."""
        base = t_desc if self.cfg.iec_base == "desc" else t_soft
        if self.cfg.slerp_weight > 0:
            base = slerp(base.unsqueeze(0), z.unsqueeze(1), self.cfg.slerp_weight)  # [B, C, D]
            return (base * z.unsqueeze(1)).sum(-1) / self.cfg.temperature
        return z @ base.t() / self.cfg.temperature

    def forward(self, face: torch.Tensor, context: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, C] from per-frame features; pass precomputed ``text`` when the prompts are frozen."""
        t_desc, t_soft = text if text is not None else self.text_features()
        return self.logits(self.embed(face, context), t_desc, t_soft)
