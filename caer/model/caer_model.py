"""The CLIP-CAER model with its enhancements (SPEC section 5).

Per-frame image features of the face and context streams (from the cache, or from the CLIP image
encoder for raw frames) -> EAA adapter on the face stream -> one temporal transformer per stream
-> fusion Linear(2D -> D) + L2 norm = ``z``. Class prototypes are the fixed descriptive sentences
``t_desc`` or the CoOp prompts ``t_soft``, optionally pulled towards ``z`` by slerp (IEC);
logits = cos(z, prototype) / temperature.

With the adapter, input norms and IEC off and ``--temporal-block reference`` it is the published CLIP-CAER
(``configs/clip-caer-reference.yaml``; ``reference.py`` loads the authors' weights into it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    AdapterMode,
    ClassPrompts,
    IECBase,
    ModelConfig,
    SoftPromptText,
    Streams,
    TemporalBlock,
    TokenPosition,
)
from ..runtime import no_autocast, upcast
from .encoder import CLIPBackbone, encode_text_embeddings, unfreeze_last_blocks

# the parameter groups each stage trains (SPEC section 7); the text tower is never trained
STAGE_GROUPS = {
    1: ("prompt",),
    2: ("adapter", "temporal", "fusion"),
    3: ("prompt", "adapter", "temporal", "fusion", "image_encoder"),
}


class ExpressionAdapter(nn.Module):
    """EAA: bottleneck D -> D/r -> D. Residual with a zero-initialised up-projection, so training starts from CLIP's features."""

    def __init__(self, dim: int, reduction: int = 4, scale: float = 1.0, mode: AdapterMode = AdapterMode.residual):
        super().__init__()
        mode = AdapterMode(mode)
        self.down, self.up = nn.Linear(dim, dim // reduction), nn.Linear(dim // reduction, dim)
        self.scale, self.mode = scale, mode
        if mode == AdapterMode.residual:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(F.relu(self.down(x)))
        return x + self.scale * h if self.mode == AdapterMode.residual else F.relu(h)


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


class ReferenceBlock(nn.Module):
    """One layer of CLIP-CAER's temporal transformer: pre-norm attention with a bias-free QKV projection, then a
    pre-norm MLP with the tanh approximation of GELU; each adds to its input."""

    def __init__(self, dim: int, heads: int, mlp: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        b, n, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.drop(self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)))
        hidden = self.drop(F.gelu(self.fc1(self.mlp_norm(x)), approximate="tanh"))
        return x + self.drop(self.fc2(hidden))


class ReferenceTemporalEncoder(nn.Module):
    """CLIP-CAER's temporal transformer (``--temporal-block reference``): CLS token and positions initialised from
    N(0, 1) as the reference does, ``layers`` ReferenceBlocks and no final norm; returns the CLS output."""

    def __init__(self, dim: int, num_frames: int, layers: int, heads: int, mlp: int, dropout: float):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, num_frames + 1, dim))
        self.blocks = nn.ModuleList(ReferenceBlock(dim, heads, mlp, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, D]
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return x[:, 0]




class PromptLearner(nn.Module):
    """CoOp: ``n_ctx`` learnable context vectors around each class's text, through the frozen text encoder.

    The class text is its name (``texts`` = class names, ``ending`` ".": "X X ... X name.") or, as both
    public CLIP-CAER codes do, its descriptive sentence (``ending`` "": "X X ... X <sentence>").
    With ``embedded`` the class texts' token embeddings are not tokenised here but stored with the weights
    (``prefix``, ``suffix`` and ``tokens`` come from a checkpoint, as ``caer import-reference`` writes them).
    """

    def __init__(self, backbone: CLIPBackbone, texts: list[str], n_ctx: int, class_specific: bool,
                 position: TokenPosition = TokenPosition.end, ending: str = ".", embedded: bool = False):
        super().__init__()
        position = TokenPosition(position)
        width = backbone.model.token_embedding.weight.shape[1]
        shape = (len(texts), n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx = nn.Parameter(torch.randn(shape) * 0.02)
        self.n_ctx, self.position = n_ctx, position
        if embedded:
            self._empty_slots(backbone, len(texts))
        else:
            self._tokenise(backbone, texts, ending)

    def _tokenise(self, backbone: CLIPBackbone, texts: list[str], ending: str) -> None:
        """``prefix`` (SOS) and ``suffix`` (text, ending, EOS, padding) embeddings of "X X ... X <text><ending>"."""
        model, n_ctx = backbone.model, self.n_ctx
        placeholder = " ".join(["X"] * n_ctx)
        encode = getattr(backbone.tokenizer, "encode", None)
        limit = getattr(model, "context_length", 77)
        for k, text in enumerate(texts):
            if encode is not None and n_ctx + len(encode(text + ending)) + 2 > limit:
                raise ValueError(f"class {k + 1}'s prompt text is too long: {n_ctx} context vectors + {text!r} "
                                 f"exceed the text encoder's {limit} tokens (shorten it, or lower --contexts-number)")
        tokens = backbone.tokenizer([f"{placeholder} {text}{ending}" for text in texts])
        self.length = int(tokens.argmax(-1).max()) + 1  # up to the last end-of-text token (the highest id)
        tokens = tokens.to(backbone.device)
        with torch.no_grad():
            embedding = model.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedding[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)  # text, ending, EOS, pad
        self.name_lens = [len(encode(text)) if encode is not None else 1 for text in texts]

    def _empty_slots(self, backbone: CLIPBackbone, classes: int) -> None:
        """Saved (persistent) buffers of the tokenised shapes, for a checkpoint to fill: ``tokens`` only needs the
        end-of-text id at the end-of-text position (the text encoder pools there)."""
        if self.position != TokenPosition.end:
            raise ValueError("--class-prompts embedded needs --class-token-position end (the class text's length "
                             "inside the stored embeddings is not known)")
        model = backbone.model
        length, width = getattr(model, "context_length", 77), model.token_embedding.weight.shape[1]
        self.register_buffer("tokens", torch.zeros(classes, length, dtype=torch.long, device=backbone.device))
        self.register_buffer("prefix", torch.zeros(classes, 1, width, device=backbone.device))
        self.register_buffer("suffix", torch.zeros(classes, length - 1 - self.n_ctx, width, device=backbone.device))
        self.name_lens = []
        self.length = None  # the checkpoint's tokens fill the buffer: found in them at each use

    def embeddings(self) -> torch.Tensor:
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(len(self.prefix), -1, -1)
        if self.position == TokenPosition.end:
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for k, n in enumerate(self.name_lens):
            name, rest = self.suffix[k : k + 1, :n], self.suffix[k : k + 1, n:]
            c = ctx[k : k + 1]
            parts = [c[:, :half], name, c[:, half:]] if self.position == TokenPosition.middle else [name, c]
            rows.append(torch.cat([self.prefix[k : k + 1], *parts, rest], dim=1))
        return torch.cat(rows)

    def forward(self, clip_model: nn.Module) -> torch.Tensor:
        # argmax pooling finds the EOS token, which keeps its index whatever the order inside the prompt
        return F.normalize(encode_text_embeddings(clip_model, self.embeddings(), self.tokens, self.length), dim=-1)


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
    """Both streams -> ``z``; class prototypes from the text side; cosine logits (see the module docstring).

    The model also owns which of its parameters each training stage trains (``prepare_stage``).
    """

    def __init__(self, backbone: CLIPBackbone, cfg: ModelConfig):
        super().__init__()
        if len(cfg.classes) != len(cfg.descriptions):
            raise ValueError(f"{len(cfg.classes)} classes but {len(cfg.descriptions)} descriptions in the config")
        self.cfg = cfg
        self.streams, self.iec_base = Streams(cfg.streams), IECBase(cfg.iec_base)
        # ``clip``: the open_clip model (image + text towers); the name keeps older checkpoints' keys (``clip.visual.*``)
        self.clip = backbone.model
        self.preprocess = backbone.preprocess
        d = backbone.embed_dim
        heads = cfg.temporal_heads or max(1, d // 64)
        if d % heads:  # both temporal blocks split the width into heads
            raise ValueError(f"--temporal-heads {heads} does not divide the feature width {d}")
        mlp = cfg.temporal_mlp or 2 * d
        self.adapter = (ExpressionAdapter(d, cfg.adapter_reduction, cfg.adapter_scale, cfg.adapter_mode)
                        if cfg.adapter else nn.Identity())
        temporal = ReferenceTemporalEncoder if cfg.temporal_block == TemporalBlock.reference else TemporalEncoder
        self.temporal_face = temporal(d, cfg.num_frames, cfg.temporal_layers, heads, mlp, cfg.dropout)
        self.temporal_context = temporal(d, cfg.num_frames, cfg.temporal_layers, heads, mlp, cfg.dropout)
        self.fusion = nn.Linear(d * (2 if self.streams == Streams.both else 1), d)
        # CLIP features of one dataset share a large common direction; centring and scaling each
        # dimension (BatchNorm over frames) lets the temporal encoders learn in far fewer steps.
        self.norm_face = nn.BatchNorm1d(d) if cfg.input_norm else nn.Identity()
        self.norm_context = nn.BatchNorm1d(d) if cfg.input_norm else nn.Identity()
        by_descriptor = cfg.soft_prompt_text == SoftPromptText.descriptor
        self.prompt_learner = PromptLearner(
            backbone, cfg.descriptions if by_descriptor else cfg.classes, cfg.contexts_number,
            cfg.class_specific_contexts, cfg.class_token_position, ending="" if by_descriptor else ".",
            embedded=cfg.class_prompts == ClassPrompts.embedded,
        )
        self.tokenizer = backbone.tokenizer
        self.register_buffer("t_desc", self.encode_descriptions())  # fixed, computed once
        for name, p in self.clip.named_parameters():  # the text tower (all of CLIP but ``visual``) never trains
            if not name.startswith("visual."):
                p.requires_grad_(False)

    # ----------------------------------------------------------------- what each stage trains

    def uses(self, stream: Streams) -> bool:
        return self.streams in (Streams.both, stream)

    def temporal_modules(self) -> list[nn.Module]:
        """Input norms and temporal encoders of the streams in use (``--streams``)."""
        face = [self.norm_face, self.temporal_face] if self.uses(Streams.face) else []
        context = [self.norm_context, self.temporal_context] if self.uses(Streams.context) else []
        return [*face, *context]

    def group_modules(self) -> dict[str, list[nn.Module]]:
        """Named groups the stages train, each with its own learning rate. Modules of unused streams are
        in no group: they never train (DDP needs every trainable parameter to be used)."""
        return {
            "prompt": [self.prompt_learner],
            "adapter": [self.adapter] if self.uses(Streams.face) else [],
            "temporal": self.temporal_modules(),
            "fusion": [self.fusion],  # its own group: the reference trains it at the image encoder's small rate
            "image_encoder": [self.clip.visual],
        }

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {name: [p for m in modules for p in m.parameters()] for name, modules in self.group_modules().items()}

    def prepare_stage(self, stage: int, unfreeze_last: int | None = None) -> None:
        """Make exactly the groups of ``STAGE_GROUPS[stage]`` trainable; everything else is frozen."""
        self.requires_grad_(False)
        for name, modules in self.group_modules().items():
            if name in STAGE_GROUPS[stage]:
                for m in modules:
                    m.requires_grad_(True)
        if stage == 3 and unfreeze_last is not None:
            unfreeze_last_blocks(self.clip.visual, unfreeze_last)

    def train_for_stage(self, stage: int) -> None:
        """Training mode for the groups a stage trains; frozen groups stay in eval mode (no dropout, fixed norms)."""
        self.train()
        for name, modules in self.group_modules().items():
            if name not in STAGE_GROUPS[stage]:
                for m in modules:
                    m.eval()
        self.clip.transformer.eval()
        if stage == 3:  # input-norm statistics stay those of stage 2: augmented raw frames would shift them
            self.norm_face.eval()
            self.norm_context.eval()

    def encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.clip.visual.parameters())

    # ----------------------------------------------------------------- forward pieces

    @torch.no_grad()
    def encode_descriptions(self) -> torch.Tensor:
        """t_desc [C, D], L2-normalised: the text encoder's features of the config's descriptive sentences."""
        tokens = self.tokenizer(self.cfg.descriptions).to(self.clip.token_embedding.weight.device)
        return F.normalize(encode_text_embeddings(self.clip, self.clip.token_embedding(tokens), tokens).float(), dim=-1)

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_desc, t_soft), both [C, D] and L2-normalised."""
        return self.t_desc, self.prompt_learner(self.clip).float()

    def frame_features(self, face: torch.Tensor, context: torch.Tensor, flip: torch.Tensor | None = None):
        """Per-frame features [B, T, D] of both streams.

        Cached features pass through. uint8 frames [B, T, 3, S, S] go through the CLIP image encoder
        (with gradients only when it trains); ``flip`` [B] bool mirrors a clip's images (view 1). Features that no
        gradient flows back through are rounded to float16, as the cache stores them, so that raw frames and the
        cache give the model the same numbers (stage 3's training steps keep full precision).
        """
        if face.dtype != torch.uint8:
            return face.float(), context.float()
        b, t = face.shape[:2]
        x = self.preprocess.normalize(torch.stack([face, context], dim=2))
        if flip is not None:
            x = torch.where(flip.view(b, 1, 1, 1, 1, 1), x.flip(-1), x)
        learns = torch.is_grad_enabled() and self.encoder_trains()
        with torch.set_grad_enabled(learns):
            feats = self.clip.encode_image(x.flatten(0, 2)).float().view(b, t, 2, -1)
        if not learns:
            feats = feats.half().float()
        return feats[:, :, 0], feats[:, :, 1]

    def embed(self, face: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Per-frame features [B, T, D] of both streams -> fused, L2-normalised ``z`` [B, D]."""
        parts = []
        if self.uses(Streams.face):
            parts.append(self.temporal_face(self.adapter(_per_frame(self.norm_face, face.float()))))
        if self.uses(Streams.context):
            parts.append(self.temporal_context(_per_frame(self.norm_context, context.float())))
        return F.normalize(self.fusion(torch.cat(parts, dim=-1)), dim=-1)

    def classifies_with_prompts(self) -> bool:
        """Whether the learnable prompts are the prototypes, and so reach the classification loss: without IEC
        (``--slerp-weight 0``: CLIP-CAER's classifier on the learnable prompts), and with IEC on ``--iec-base soft``."""
        return self.cfg.slerp_weight == 0 or self.iec_base == IECBase.soft

    def logits(self, z: torch.Tensor, t_desc: torch.Tensor, t_soft: torch.Tensor) -> torch.Tensor:
        """cos(z, prototype_k) / temperature, prototypes pulled towards ``z`` by slerp when IEC is on; in float32
        even under autocast (dividing by a temperature of 0.01 magnifies bf16's rounding a hundredfold)."""
        base, z = upcast(t_soft if self.classifies_with_prompts() else t_desc, z)
        with no_autocast(z.device):
            if self.cfg.slerp_weight > 0:
                base = slerp(base.unsqueeze(0), z.unsqueeze(1), self.cfg.slerp_weight)  # [B, C, D]
                return (base * z.unsqueeze(1)).sum(-1) / self.cfg.temperature
            return z @ base.t() / self.cfg.temperature

    def forward(self, face: torch.Tensor, context: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor] | None = None,
                flip: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C] from cached features or raw frames of both streams (see ``frame_features``).

        Pass precomputed ``text`` (``text_features()``) when the prompts are frozen.
        """
        t_desc, t_soft = text if text is not None else self.text_features()
        return self.logits(self.embed(*self.frame_features(face, context, flip)), t_desc, t_soft)
