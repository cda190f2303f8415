"""Every option of every command, declared once.

A command's settings are a *record*: a dataclass whose fields are options (declared with ``option``)
or parts (other records). The CLI builds its flags from these declarations, config files use the
same names as keys, and both are checked against the same types, choices and ranges.

Run configs are flat in files (``lr: 0.01``, not ``optim: {lr: 0.01}``): every key is also a flag.
Values come from the defaults, then the YAML files (``--config``, repeatable: later files win), then the
flags that were given.
"""

import collections.abc
import dataclasses
import enum
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(str(importlib.resources.files("caer.configs")))


# ------------------------------------------------------------------------------------------ choices

class Source(enum.StrEnum):
    """Where training and evaluation read a clip from."""

    cache = "cache"
    raw = "raw"


class EvalSource(enum.StrEnum):
    auto = "auto"  # cache, unless the checkpoint's encoder was fine-tuned (stage 3) or there is no cache
    cache = "cache"
    raw = "raw"


class Streams(enum.StrEnum):
    both = "both"
    face = "face"
    context = "context"


class AdapterMode(enum.StrEnum):
    residual = "residual"
    replace = "replace"


class TokenPosition(enum.StrEnum):
    end = "end"
    middle = "middle"
    front = "front"


class SoftPromptText(enum.StrEnum):
    """What the learnable context vectors of t_soft are put in front of."""

    name = "name"  # "X X ... X <class name>." (CoOp)
    descriptor = "descriptor"  # "X X ... X <descriptive sentence>" (both public CLIP-CAER codes)


class IECBase(enum.StrEnum):
    desc = "desc"
    soft = "soft"


class Optimizer(enum.StrEnum):
    sgd = "sgd"
    adamw = "adamw"


class Scheduler(enum.StrEnum):
    cosine = "cosine"
    step = "step"


class StoreFormat(enum.StrEnum):
    auto = "auto"
    zarr = "zarr"
    h5 = "h5"


class PrintConfusion(enum.StrEnum):
    """When a stage prints the valid confusion matrix (``metrics.jsonl`` always records it)."""

    every = "every"  # after every epoch, as the method's log does
    best = "best"  # only after an epoch that becomes the best
    end = "end"  # once, the best epoch's, when the stage ends


class TTA(enum.StrEnum):
    none = "none"
    flip = "flip"


class Decode(enum.StrEnum):
    """How a frame file becomes the encoder's pixels (its two views)."""

    auto = "auto"  # the cache's; else tensor when the encoder runs on CUDA, else pil
    pil = "pil"  # PIL decode and crops, open_clip's own transform: the reference
    tensor = "tensor"  # torchvision decode (nvJPEG on CUDA), crops and resize as batched tensor operations


class Preprocessing(enum.StrEnum):
    """How a view's pixels become the image encoder's input (part of the encoder's identity in caches)."""

    open_clip = "open_clip"  # the encoder's own eval transform: shorter side resized (bicubic), centre crop, mean/std
    reference = "reference"  # CLIP-CAER's code: squashed to the input size (bilinear), pixels in [0, 1], no mean/std


class TemporalBlock(enum.StrEnum):
    """The layer of the temporal transformers."""

    torch = "torch"  # torch.nn.TransformerEncoderLayer (pre-norm, exact GELU, biased QKV), then a final LayerNorm
    reference = "reference"  # CLIP-CAER's: pre-norm, tanh-approximated GELU, QKV without bias, no final norm


class ClassPrompts(enum.StrEnum):
    """Where the token embeddings of the learnable prompts' class texts come from."""

    text = "text"  # the config's class texts, through CLIP's tokenizer
    embedded = "embedded"  # stored in the checkpoint (caer import-reference keeps the official checkpoint's)


# ------------------------------------------------------------------------------------------ declaring

def option(default=None, help: str = "", *, flags: tuple[str, ...] = (), min: float | None = None,
           max: float | None = None, panel: str | None = None, argument: bool = False, shown: str | None = None,
           factory=None, fallback=None):
    """Declare an option: its default, help text, flag spellings, allowed range and help panel.

    ``flags`` replaces the flag derived from the name (``--name`` and, for booleans, ``--no-name``);
    ``shown`` is the default as ``--help`` should print it when the value itself says little;
    ``fallback`` is the value of a crop option (default None) when neither a flag nor the cache sets it.
    """
    if fallback is not None and shown is None:
        shown = f"the cache's, else {fallback}"
    meta = {"help": help, "flags": flags, "min": min, "max": max, "panel": panel, "argument": argument, "shown": shown,
            "fallback": fallback}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def part(cls):
    """A record inside a record (its options keep their own names in files and on the command line)."""
    return field(default_factory=cls, metadata={"part": True})


def is_part(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("part"))


def options(record) -> list[tuple[dataclasses.Field, str]]:
    """Every option of a record class (parts flattened), with the help panel it belongs to."""
    out = []
    for f in dataclasses.fields(record):
        if is_part(f):
            out += options(f.default_factory)
        else:
            out.append((f, f.metadata.get("panel") or getattr(record, "PANEL", "Options")))
    return out


def option_type(f: dataclasses.Field):
    """The declared type without ``| None``."""
    args = [a for a in typing.get_args(f.type) if a is not type(None)]
    if isinstance(f.type, types.UnionType) and len(args) == 1:
        return args[0]
    return f.type


def default_of(f: dataclasses.Field):
    """An option's declared default (its factory's value for a list)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


FLAG = "flag"  # the ``where`` of values given as flags: their errors name each by its flag


def flag_label(f: dataclasses.Field) -> str:
    """How the command line spells an option: ``--lr``, ``--use-amp``, or the argument's metavar."""
    if f.metadata.get("argument"):
        return f.name.upper()
    spelled = f.metadata.get("flags") or ()
    return spelled[0].split("/")[0] if spelled else "--" + f.name.replace("_", "-")


def type_name(kind) -> str:
    """A declared type as error messages name it."""
    if typing.get_origin(kind) is list:
        return f"a list of {type_name(typing.get_args(kind)[0])}"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(m.value for m in kind)
    return getattr(kind, "__name__", str(kind))


def _scalar(kind, value):
    """``value`` as the scalar type ``kind`` (ValueError if it is not one)."""
    if isinstance(value, (dict, list, tuple, set)):  # YAML mappings and lists: no scalar type takes them
        raise ValueError
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError
        return value
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if kind is float:
        if isinstance(value, bool):  # float(True) is 1.0: "lr: true" is a mistake, not a rate
            raise ValueError
        return float(value)  # YAML reads 1e-5 (no dot) as a string
    if isinstance(value, bool):  # YAML reads an unquoted yes/no/on/off as a boolean: "True" is not what was meant
        raise ValueError
    return str(value)


def allows_none(f: dataclasses.Field) -> bool:
    """Whether None is a value of the option: declared ``| None``, or unset until given (``out: str = None``)."""
    return type(None) in typing.get_args(f.type) or f.default is None


def coerce(f: dataclasses.Field, value, where: str):
    """A value from a file, a flag or a checkpoint, checked against the declaration (type, choices, range)."""
    kind = option_type(f)
    if value is None:
        if allows_none(f):
            return None
        raise ValueError(f"{where}: null is not allowed (expected {type_name(kind)})")
    try:
        if typing.get_origin(kind) is list:
            if not isinstance(value, list):
                raise ValueError
            value = [_scalar(typing.get_args(kind)[0], v) for v in value]
        else:
            value = _scalar(kind, value)
    except (ValueError, TypeError):
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            raise ValueError(f"{where}: {value!r} is not {type_name(kind)}") from None
        text = kind is str or typing.get_args(kind) == (str,)
        booleans = any(isinstance(v, bool) for v in (value if isinstance(value, list) else [value]))
        quote = " (YAML reads unquoted yes, no, on, off as booleans: quote the text)" if text and booleans else ""
        raise ValueError(f"{where}: expected {type_name(kind)}, got {value!r}{quote}") from None
    for item in value if isinstance(value, list) else [value]:
        check_range(f, item, where)
    return value


def check_range(f: dataclasses.Field, value, where: str) -> None:
    """Refuse a number outside the declared range, and any float that is NaN or infinite."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a finite number")
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise ValueError(f"{where}: {value} is outside {bounds}")


def from_flat(record, values: dict, where: str = "config"):
    """Build a record from flat ``{option name: value}`` (unknown keys are an error naming ``where``)."""
    known = {f.name for f, _ in options(record)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown option {unknown[0]!r}")
    built = _build(record, values, where)
    set_sources(built, dict.fromkeys(values, source_entry(where)))
    return built


def _build(record, values: dict, where: str):
    kwargs = {}
    for f in dataclasses.fields(record):
        if is_part(f):
            kwargs[f.name] = _build(f.default_factory, values, where)
        elif f.name in values:
            kwargs[f.name] = coerce(f, values[f.name], flag_label(f) if where == FLAG else f"{where}: {f.name}")
    return record(**kwargs)


def source_entry(where: str) -> tuple[str, str]:
    """The ``set_sources`` entry of values checked under ``where``."""
    return ("flag", "") if where == FLAG else ("record", where)


def set_sources(obj, sources: dict) -> None:
    """Record where each given option of ``obj`` (and its parts) came from: ``{name: (kind, label)}``, kind
    "flag", "file" (label: its path) or "record" (label: e.g. "checkpoint config"). Errors that blame a value
    (``CropConfig.resolved``) read it; a record made otherwise has none, and its values count as flags."""
    obj._sources = {}
    for f in dataclasses.fields(obj):
        if is_part(f):
            set_sources(getattr(obj, f.name), sources)
        elif f.name in sources:
            obj._sources[f.name] = sources[f.name]


def sources_of(obj) -> dict:
    """``set_sources``' record of ``obj`` and its parts, flat."""
    out = dict(getattr(obj, "_sources", {}))
    for f in dataclasses.fields(obj):
        if is_part(f):
            out |= sources_of(getattr(obj, f.name))
    return out


def to_flat(obj) -> dict:
    """``{option name: value}`` of a record, enums as their plain values (for YAML, JSON and checkpoints)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if is_part(f):
            out |= to_flat(value)
        else:
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
    return out


# ------------------------------------------------------------------------------------------ shared parts

def default_workers() -> int:
    """All cores but one for the main process, at most 16."""
    import os

    return max(1, min(16, (os.cpu_count() or 2) - 1))


@dataclass
class EncoderConfig:
    """The CLIP image encoder whose features everything else reads."""

    PANEL = "Encoder"
    model: str = option("ViT-B-32-quickgelu", "open_clip model name (caer-tiny is the offline test model). OpenAI's "
                        "weights need the -quickgelu names: plain ViT-B-32 runs exact GELU on weights trained with "
                        "QuickGELU.")
    pretrained: str = option("openai", "Weights: an open_clip tag (needs internet once), a local file "
                             "(open_clip state dict or OpenAI .pt), or 'random'.")
    preprocess: Preprocessing = option(Preprocessing.open_clip, "Pixels to encoder input: open_clip (the encoder's "
                                       "own transform: resize, centre crop, CLIP mean/std) or reference (CLIP-CAER's "
                                       "code: squashed to the input size, [0, 1] pixels, no mean/std).")


@dataclass
class CropConfig:
    """How a frame becomes its face crop and context view (SPEC section 3)."""

    PANEL = "Crops"
    root: str | None = option(None, "Dataset root the clip dirs are relative to.",
                              shown="the first annotation file's folder (caer train: the training list's)")
    face_boxes: str | None = option(None, "Face boxes JSON (needed by caer extract; training and evaluation default "
                                     "to those the cache was cut with).")
    body_boxes: str | None = option(None, "Body boxes JSON (for --crop-body).")
    crop_body: bool | None = option(None, "Context view = the body box crop instead of the whole frame.", fallback=False)
    margin: float | None = option(None, "Pixels added around each face box.", min=0, fallback=20.0)
    frame_stride: int | None = option(None, "Keep every k-th frame.", min=1, fallback=1)
    fps: float | None = option(None, "Resample video files to N frames/s before --frame-stride (0: every frame): at each "
                               "time k/N s the frame on screen then, each frame once. Frame folders keep every frame.",
                               min=0, fallback=0.0)
    decode: Decode | None = option(None, "How frames are decoded and cut: pil (open_clip's own PIL transform, the "
                                   "reference), tensor (torchvision decode, nvJPEG on CUDA; crops and resize as "
                                   "batched tensor operations), or auto (the cache's, else tensor when the encoder "
                                   "runs on CUDA).",
                                   fallback=Decode.pil)

    def resolved(self, stored: dict | None = None, inputs: dict | None = None, strict: bool = True,
                 where: str = "the cache", device=None) -> "CropConfig":
        """The geometry a run uses: the flags', else the store's (``stored``: its fingerprint; ``inputs``: the box
        files and root it was cut with), else the declared fallbacks. With ``strict``, a flag that contradicts the
        store is refused, naming both values (extraction leaves that to the store's own fingerprint check).
        ``--decode auto`` is the store's path, else tensor when ``device`` (the encoder's) is a CUDA device, else pil."""
        values = {}
        for f in dataclasses.fields(self):
            geometry = f.metadata["fallback"] is not None  # margin, crop_body, frame_stride, fps, decode; else a path
            given, kept = getattr(self, f.name), ((stored if geometry else inputs) or {}).get(f.name)
            if f.name == "decode" and given == Decode.auto:
                given = kept or (Decode.tensor if str(device).startswith("cuda") else Decode.pil)
            if strict and geometry and given is not None and kept is not None and given != kept:
                raise ValueError(self._contradiction(f, given, kept, where))
            value = given if given is not None else kept
            values[f.name] = coerce(f, value if value is not None else f.metadata["fallback"], f"{where}: {f.name}")
        return CropConfig(**values)

    def _contradiction(self, f: dataclasses.Field, given, kept, where: str) -> str:
        """Why ``given`` cannot be used with a store cut with ``kept``, blaming where ``given`` came from."""
        kind, label = getattr(self, "_sources", {}).get(f.name, ("flag", ""))
        flag, against = flag_label(f), f"contradicts {where}, which was extracted with {f.name} {kept}"
        if kind == "file":
            return (f"{f.name} {given} (from the config {label}) {against}: give the cache's value ({flag} {kept}, "
                    f"or remove {f.name} from {label}), or extract a new cache with {f.name} {given}")
        if kind == "record":
            return f"{f.name} {given} (from the {label}) {against}: use a cache extracted with {f.name} {given}"
        return f"{flag} {given} {against}: drop the flag (or give the cache's value), or extract a new cache with it"


@dataclass
class RuntimeConfig:
    """Where and how a command computes: device, mixed precision, worker processes."""

    PANEL = "Runtime"
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    use_amp: bool = option(True, "Mixed precision on CUDA: bf16 where the GPU has it, else fp16; caer extract always "
                           "fp16, as the store keeps float16. No effect on the CPU.", flags=("--use-amp/--no-amp",))
    workers: int | None = option(None, "Worker processes that decode frames or load batches (caer boxes: that detect "
                                 "faces).", min=0,
                                 shown="CPU cores - 1, at most 16")

    def num_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers


# ------------------------------------------------------------------------------------------ caer train

@dataclass
class DataConfig:
    """What a run reads: the annotation lists, and the feature cache or raw frames."""

    PANEL = "Data"
    train_list: str | None = option(None, "Training annotation file.")
    val_list: str | None = option(None, "Validation annotation file.")
    test_list: str | None = option(None, "Test annotation file.")
    cache: str | None = option(None, "Feature cache from caer extract.")
    source: Source = option(Source.cache, "cache, or raw (decode frames and run the encoder every step, as the reference).")
    cache_in_memory: bool = option(False, "Load the whole cache into RAM.")


# the RAER label set: the classes, and our descriptive sentence for each (t_desc; facial action units + context)
DEFAULT_CLASSES = ["Neutrality", "Enjoyment", "Confusion", "Fatigue", "Distraction"]
DEFAULT_DESCRIPTIONS = [
    "A student with a relaxed face, lips closed and brows at rest, quietly watching the lesson from the desk.",
    "A student smiling with raised cheeks and crinkled eyes, leaning in and engaged with the class activity.",
    "A student with lowered, drawn-together brows and narrowed eyes, staring at the notes as if something does not "
    "make sense.",
    "A student with drooping eyelids and a slack jaw, yawning or resting the head on a hand at the desk.",
    "A student whose gaze and head are turned away from the teacher and the material, looking at a phone or around "
    "the room.",
]


@dataclass
class ModelConfig:
    """The CAER model on top of CLIP (SPEC section 5)."""

    PANEL = "Model"
    classes: list[str] = option(help="Class names, in label order (repeat the flag per class).",
                                factory=lambda: list(DEFAULT_CLASSES), shown="the RAER classes")
    descriptions: list[str] = option(help="One descriptive sentence per class (t_desc; repeat the flag per class).",
                                     factory=lambda: list(DEFAULT_DESCRIPTIONS), shown="a sentence per RAER class")
    num_frames: int = option(16, "T: frames (TSN segments) per clip.", min=1)
    streams: Streams = option(Streams.both, "both, or face / context alone (single-stream ablations).")
    input_norm: bool = option(True, "BatchNorm of the frame features before adapter and temporal encoders.")
    adapter: bool = option(True, "Expression-Aware Adapter on the face stream.")
    adapter_reduction: int = option(4, "Adapter bottleneck: D -> D / r -> D.", min=1)
    adapter_scale: float = option(1.0, "Scale of the residual adapter's branch.")
    adapter_mode: AdapterMode = option(AdapterMode.residual, "residual, or replace (the reference's ReLU output).")
    temporal_layers: int = option(1, "Layers of each temporal transformer.", min=1)
    temporal_heads: int | None = option(None, "Attention heads of the temporal transformers.", min=1, shown="D / 64")
    temporal_mlp: int | None = option(None, "MLP width of the temporal transformers.", min=1, shown="2 D")
    dropout: float = option(0.1, "Dropout in the temporal transformers.", min=0, max=1)
    temporal_block: TemporalBlock = option(TemporalBlock.torch, "Layer of the temporal transformers: torch (PyTorch's, "
                                           "then a final LayerNorm) or reference (CLIP-CAER's: tanh GELU, QKV without "
                                           "bias, no final norm).")
    contexts_number: int = option(8, "CoOp context vectors per prompt.", min=1, panel="Prompts and classifier")
    class_specific_contexts: bool = option(True, "One set of context vectors per class.", panel="Prompts and classifier",
                                           flags=("--class-specific-contexts/--shared-contexts",))
    soft_prompt_text: SoftPromptText = option(SoftPromptText.name, "What the learnable context vectors precede: the "
                                              "class name (CoOp), or its descriptive sentence (the reference).",
                                              panel="Prompts and classifier")
    class_token_position: TokenPosition = option(TokenPosition.end, "Where the class text sits among the context vectors.",
                                                 panel="Prompts and classifier")
    temperature: float = option(0.2, "tau in logits = cos / tau.", min=1e-4, panel="Prompts and classifier")
    slerp_weight: float = option(0.0, "IEC: lambda of slerp(prototype, z); 0 turns IEC off.", min=0, max=1,
                                 panel="Prompts and classifier")
    iec_base: IECBase = option(IECBase.desc, "Prototype base: desc (fixed sentences) or soft (learnable prompts).",
                               panel="Prompts and classifier")
    class_prompts: ClassPrompts = option(ClassPrompts.text, "Token embeddings of the learnable prompts' class texts: "
                                         "text (tokenised from the config) or embedded (stored in the checkpoint, as "
                                         "caer import-reference writes them).", panel="Prompts and classifier")


@dataclass
class LossConfig:
    """Cross-entropy remedies for class imbalance, and the MI and DC prompt losses (SPEC section 6)."""

    PANEL = "Losses and imbalance"
    class_balanced_loss: bool = option(False, "Effective-number class weights in the CE loss.")
    cb_beta: float = option(0.9999, "beta of the effective number of samples.", min=0, max=0.999999)
    logit_adj: bool = option(False, "Add tau * log prior to the training logits.")
    logit_adj_tau: float = option(1.0, "tau of --logit-adj.")
    label_smoothing: float = option(0.0, "Label smoothing.", min=0, max=1)
    use_weighted_sampler: bool = option(False, "Sample clips with inverse class frequency.",
                                        flags=("--use-weighted-sampler/--no-weighted-sampler",))
    lambda_mi: float = option(0.0, "Weight of the mutual-information loss.", min=0, flags=("--lambda-mi", "--lambda_mi"))
    mi_warmup: int = option(0, "Epochs with the MI loss off.", min=0)
    mi_ramp: int = option(0, "Epochs to ramp the MI weight up.", min=0)
    lambda_dc: float = option(0.0, "Weight of the decorrelation loss.", min=0, flags=("--lambda-dc", "--lambda_dc"))
    dc_warmup: int = option(0, "Epochs with the DC loss off.", min=0)
    dc_ramp: int = option(0, "Epochs to ramp the DC weight up.", min=0)


@dataclass
class OptimConfig:
    """The optimiser, its learning rates per stage and parameter group, and the schedule."""

    PANEL = "Optimisation"
    optimizer: Optimizer = option(Optimizer.sgd, "sgd (with --momentum) or adamw.")
    lr: float = option(1e-3, "Learning rate of the temporal encoders and fusion; default of the others.", min=0)
    lr_adapter: float | None = option(None, "Learning rate of the adapter.", min=0, shown="the stage's")
    lr_prompt: float | None = option(None, "Learning rate of the prompt context vectors.", min=0, shown="the stage's")
    lr_image_encoder: float = option(1e-6, "Learning rate of the image encoder (it trains in stage 3 only).", min=0)
    lr_stage1: float | None = option(None, "Learning rate of every group in stage 1.", min=0, shown="per group")
    lr_stage2: float | None = option(None, "Learning rate of every group in stage 2.", min=0, shown="per group")
    lr_stage3: float | None = option(None, "Learning rate of every group but the image encoder in stage 3.", min=0,
                                     shown="per group")
    lr_group: list[str] = option(help="One group's rate in one stage, STAGE.GROUP=RATE (e.g. 3.adapter=1e-5); "
                                 "repeat the flag. Wins over every other rate.", factory=list, shown="none")
    momentum: float = option(0.9, "SGD momentum.", min=0, max=1)
    weight_decay: float = option(1e-4, "Weight decay.", min=0)
    scheduler: Scheduler = option(Scheduler.cosine, "Per-epoch schedule: cosine, or step (--step-size or "
                                  "--milestones, --gamma).")
    step_size: int = option(10, "Epochs between steps of the step schedule.", min=1)
    milestones: list[int] = option(help="Epochs after which the step schedule multiplies the rates by --gamma (repeat "
                                   "the flag); given, they replace --step-size.", factory=list, min=1, shown="none")
    gamma: float = option(0.1, "Factor of each step of the step schedule.", min=0)
    batch_size: int = option(8, "Clips per batch.", min=1)
    grad_accum: int = option(1, "Accumulate gradients over N batches.", min=1)
    grad_clip: float | None = option(None, "Clip the gradient norm to this value.", min=0)

    def ignored_settings(self) -> list[str]:
        """Notes on options set to other than their default that the chosen optimiser or schedule does not use."""
        unused = [] if self.optimizer == Optimizer.sgd else [("momentum", f"--optimizer {self.optimizer.value}")]
        if self.scheduler != Scheduler.step:
            unused += [(name, f"--scheduler {self.scheduler.value}") for name in ("step_size", "milestones", "gamma")]
        elif self.milestones:
            unused.append(("step_size", "--milestones"))
        fields = {f.name: f for f in dataclasses.fields(self)}
        return [f"{flag_label(fields[name])} {getattr(self, name)} has no effect under {mode}" for name, mode in unused
                if getattr(self, name) != default_of(fields[name])]


@dataclass
class StageConfig:
    """Which stage runs, for how long, and the stage-3 specifics (SPEC section 7)."""

    PANEL = "Stages"
    stage: int = option(2, "Stage to run: 1 prompts, 2 adapter/temporal/fusion, 3 end to end.", min=1, max=3)
    staged_training: bool = option(False, "Run stages 1 -> 2 -> 3, each from the previous best.")
    epochs: int = option(20, "Epochs (of any stage without its own count).", min=0)
    epochs_stage1: int | None = option(None, "Epochs of stage 1.", min=0, shown="--epochs")
    epochs_stage2: int | None = option(None, "Epochs of stage 2.", min=0, shown="--epochs")
    epochs_stage3: int | None = option(None, "Epochs of stage 3.", min=0, shown="--epochs")
    unfreeze_last: int | None = option(None, "Stage 3: unfreeze only the last N encoder blocks.", min=1, shown="all")
    rotate_degrees: float = option(4.0, "Stage 3 augmentation: random rotation in [-r, r] degrees per clip "
                                   "(plus a random flip).", min=0, max=180)
    grad_checkpointing: bool = option(False, "Stage 3: activation checkpointing in the image encoder.")


@dataclass
class RunDirConfig:
    """The run itself: its directory, what a stage starts from, resume or overwrite, seed, and how it reports."""

    PANEL = "Run"
    run_dir: str = option("runs/caer", "Where config, metrics.jsonl and checkpoints go.")
    init_from: str | None = option(None, "Checkpoint a single stage starts from.",
                                   shown="stage{N-1}-best.pt of the run dir, if there")
    resume: bool = option(False, "Continue a stopped run from its last checkpoint.")
    overwrite: bool = option(False, "Train a stage that --run-dir already holds records of, replacing them (the other "
                             "stages' files stay).")
    seed: int = option(0, "Random seed (data order, sampled frames, init).", min=0)
    print_confusion: PrintConfusion = option(PrintConfusion.every, "When to print the valid confusion matrix: every "
                                             "epoch, when the best epoch improves, or at the end of the stage.")
    tensorboard: bool = option(False, "Also log each epoch's scalars and valid confusion matrix to RUN_DIR/tensorboard "
                               "(needs pip install -e '.[tensorboard]').")


@dataclass
class RunConfig:
    """Everything ``caer train`` (and ``caer eval`` through a checkpoint) is set by."""

    stages: StageConfig = part(StageConfig)
    data: DataConfig = part(DataConfig)
    crop: CropConfig = part(CropConfig)
    encoder: EncoderConfig = part(EncoderConfig)
    model: ModelConfig = part(ModelConfig)
    loss: LossConfig = part(LossConfig)
    optim: OptimConfig = part(OptimConfig)
    run: RunDirConfig = part(RunDirConfig)
    runtime: RuntimeConfig = part(RuntimeConfig)

    def group_lr(self, stage: int, group: str) -> float:
        """A parameter group's learning rate in a stage; the most specific setting wins:

        ``--lr-group STAGE.GROUP=RATE``; for the image encoder ``--lr-image-encoder``; ``--lr-stageN``;
        ``--lr-prompt`` / ``--lr-adapter``; ``--lr``.
        """
        o = self.optim
        specific = self.stage_group_rates().get((stage, group))
        if specific is not None:
            return specific
        if group == "image_encoder":
            return o.lr_image_encoder
        for rate in (getattr(o, f"lr_stage{stage}"), getattr(o, f"lr_{group}", None)):
            if rate is not None:
                return rate
        return o.lr

    def stage_group_rates(self) -> dict[tuple[int, str], float]:
        """``--lr-group`` as ``{(stage, group): rate}`` (a malformed entry is an error naming it)."""
        rates = {}
        for entry in self.optim.lr_group:
            try:
                key, rate = entry.split("=")
                stage, group = key.split(".")
                stage, rate = int(stage), float(rate)
                if not 1 <= stage <= 3 or not 0 <= rate < math.inf:  # NaN fails both comparisons
                    raise ValueError
            except ValueError:
                raise ValueError(f"--lr-group {entry!r}: expected STAGE.GROUP=RATE with STAGE 1..3 and a finite RATE >= 0, "
                                 "e.g. 3.adapter=1e-5") from None
            rates[(stage, group)] = rate
        return rates

    def stage_epochs(self, stage: int) -> int:
        value = getattr(self.stages, f"epochs_stage{stage}")
        return self.stages.epochs if value is None else value

    def with_absolute_paths(self) -> "RunConfig":
        """These settings with their files as absolute paths, so that a checkpoint's config works from any folder
        (``pretrained`` only when it names a file: else it is an open_clip tag)."""
        def absolute(record, names: tuple[str, ...]):
            return dataclasses.replace(record, **{n: str(Path(getattr(record, n)).absolute()) for n in names
                                                  if getattr(record, n)})

        pretrained = ("pretrained",) if Path(self.encoder.pretrained).is_file() else ()
        return dataclasses.replace(
            self, data=absolute(self.data, ("train_list", "val_list", "test_list", "cache")),
            crop=absolute(self.crop, ("root", "face_boxes", "body_boxes")),
            encoder=absolute(self.encoder, pretrained), run=absolute(self.run, ("init_from",)))

    def list_for(self, split: str, remedy: str = "give it as a flag or in the config") -> str:
        """The annotation file of a split ("train", "val" or "test"), or an error saying ``remedy``."""
        path = getattr(self.data, f"{split}_list")
        if not path:
            raise ValueError(f"--{split}-list is not set ({remedy})")
        return path

    def dataset_root(self, split: str) -> str:
        """The folder the clips' paths are relative to: --root, else the training list's folder (the first list
        caer extract is given), else ``split``'s own list's; one root for every split, as the cache has."""
        return self.crop.root or str(Path(self.data.train_list or self.list_for(split)).parent)

    def to_dict(self) -> dict:
        return to_flat(self)



def from_saved(values: dict, where: str) -> RunConfig:
    """The run config a checkpoint or ``config.yaml`` saved; keys this version no longer declares are dropped, so
    older runs still load."""
    declared = {f.name for f, _ in options(RunConfig)}
    return from_flat(RunConfig, {k: v for k, v in values.items() if k in declared}, where)

# ------------------------------------------------------------------------------------------ other commands

@dataclass
class ExtractConfig:
    """``caer extract``: phase one."""

    PANEL = "Output"
    annotations: list[str] = option(help="Annotation files (train.txt val.txt ...); each is a split.",
                                    factory=list, argument=True)
    out: str = option(None, "Cache to write: a .zarr folder or a .h5 file.", flags=("--out", "-o"))
    views: int = option(1, "1, or 2 to add a horizontally flipped view.", min=1, max=2)
    format: StoreFormat = option(StoreFormat.auto, "zarr, h5, or auto (by the --out suffix).")
    overwrite: bool = option(False, "Replace a cache that was extracted with other settings.")
    num_classes: int = option(5, "Labels must lie in 1..N.", min=1, panel="Data")
    skip_bad: bool = option(False, "Skip clips with bad input (listed in the summary) instead of stopping.", panel="Data")
    from_checkpoint: str | None = option(None, "Use the image encoder of a caer checkpoint (e.g. fine-tuned by stage 3) "
                                         "instead of --model/--pretrained (--pretrained then says where the CLIP "
                                         "weights it was trained from are, if not where its config says).",
                                         panel="Encoder")
    batch_size: int = option(256, "Images per encoder batch.", min=1, panel="Runtime")
    encoder: EncoderConfig = part(EncoderConfig)
    crop: CropConfig = part(CropConfig)
    runtime: RuntimeConfig = part(RuntimeConfig)

    def dataset_root(self) -> Path:
        """The folder the clips' paths are relative to: --root, else the first annotation file's folder."""
        return Path(self.crop.root or Path(self.annotations[0]).parent)


@dataclass
class EvalConfig:
    """``caer eval``; the checkpoint's own run config fills in the rest (see ``EVAL_OVERRIDES``)."""

    PANEL = "Options"
    checkpoint: str = option(None, "Checkpoint from caer train (e.g. runs/x/stage2-best.pt).", argument=True)
    split: str = option("test", "train, val, test, or an annotation file.")
    source: EvalSource = option(EvalSource.auto, "cache, raw frames, or auto: the cache unless the checkpoint's "
                                "image encoder was fine-tuned (stage 3).")
    tta: TTA = option(TTA.none, "none, or flip: average the logits of the plain and mirrored view.")
    json: str | None = option(None, "Write the report (metrics, confusion matrix, predictions) as JSON.")
    plot: str | None = option(None, "Write a picture of the row-normalised confusion matrix (.png, .pdf, .svg, ...).")
    overwrite: bool = option(False, "Replace --json and --plot files that already exist (the checkpoint, the split's "
                             "list or another input is never replaced).")


# run-config options that `caer eval` may override; their declarations are RunConfig's
EVAL_OVERRIDES = ("cache", "root", "face_boxes", "pretrained", "batch_size", "workers", "device")


@dataclass
class ImportReferenceConfig:
    """``caer import-reference``: the authors' released CLIP-CAER checkpoint as a caer checkpoint."""

    PANEL = "Options"
    source: str = option(None, "The official CLIP-CAER checkpoint (a .pth saved by its main.py).", argument=True)
    out: str = option(None, "caer checkpoint to write (.pt).", flags=("--out", "-o"))
    overwrite: bool = option(False, "Replace an existing --out file (never the official checkpoint).")


# run-config options that `caer import-reference` writes into the converted checkpoint's config (the rest is
# configs/clip-caer-reference.yaml's, and what the official checkpoint's shapes say); declarations are RunConfig's.
# `model` is the official ViT-B-32-quickgelu unless a modified reference was trained on another CLIP.
IMPORT_OVERRIDES = ("train_list", "val_list", "test_list", "root", "face_boxes", "body_boxes", "crop_body", "margin",
                    "model")


@dataclass
class BoxesConfig:
    """``caer boxes``: face (and body) boxes for clips that have none; ``--root`` and ``--workers`` are RunConfig's."""

    PANEL = "Output"
    annotations: list[str] = option(help="Annotation files whose clips (frame folders or videos) get boxes, or "
                                    "videos and frame folders themselves (keyed by their path from --root).",
                                    factory=list, argument=True)
    out: str = option(None, "Face boxes JSON to write.", flags=("--out", "-o"))
    body_boxes: str | None = option(None, "Also write each clip's body box (for --crop-body), derived from its "
                                    "person's face track, to this JSON.")
    overwrite: bool = option(False, "Replace box files that already exist.")
    # a free-form name rather than a choice: yunet takes the path of a model file
    detector: str = option("hog", "Face detector: hog (dlib), cnn (dlib's CNN, more accurate, ~65x slower on a CPU), "
                           "haar (OpenCV cascades, frontal and profile), or yunet:PATH.onnx (OpenCV's YuNet, a model "
                           "file you downloaded).", panel="Detection")
    upsample: int = option(1, "Times the frame is doubled before detection: each step finds faces half as small "
                           "(about 80 px at 0, 40 px at 1) for about 4x the time.", min=0, max=3, panel="Detection")
    min_iou: float = option(0.3, "A detection continues a track when its IoU with the track's expected box is at "
                            "least this.", min=0.01, max=1, panel="Tracking")
    max_gap: int = option(5, "Fill gaps of up to N frames in the person's face track by interpolation; frames in "
                          "longer gaps get no box.", min=0, panel="Tracking")


@dataclass
class PredictConfig:
    """``caer predict``: the emotion of the people in videos or frame folders (see ``PREDICT_OVERRIDES`` and
    ``PREDICT_DETECTION`` for the options it shares with ``caer train`` and ``caer boxes``)."""

    PANEL = "Options"
    checkpoint: str = option(None, "Checkpoint of any stage (caer train, or caer import-reference).", argument=True)
    inputs: list[str] = option(help="Video files (.mp4 .avi .mkv .webm .mov) or frame folders.", factory=list,
                               argument=True)
    all_faces: bool = option(False, "Predict for every tracked face, not only the clip's person.", panel="Detection")
    window: int = option(16, "Frames per window (the frames the checkpoint uses, after its --fps and "
                         "--frame-stride); a shorter clip is one window.", min=1)
    stride: int = option(8, "Frames from one window's start to the next's.", min=1)
    json: str | None = option(None, "Write every number (persons, their boxes, windows, probabilities) as JSON.",
                              panel="Output")
    annotate: str | None = option(None, "Write a copy of the video (.mp4, .mkv or .mov) with each person's face "
                                  "boxed and labelled; with several inputs, one file each (OUT-1-NAME.mp4, ...).",
                                  panel="Output")
    overwrite: bool = option(False, "Replace --json and --annotate files that already exist (an input, the "
                             "checkpoint or a box file is never replaced).", panel="Output")
    skip_bad: bool = option(False, "Skip an input that cannot be read or has no face (listed in the summary "
                            "and under \"skipped\" in --json) instead of stopping.")


# options of `caer predict` declared elsewhere: the run config's (the box files of the inputs, their root, the
# checkpoint's base weights where its recorded path is not on this machine, the device) and caer boxes' detection
PREDICT_OVERRIDES = ("face_boxes", "body_boxes", "root", "pretrained", "device")
PREDICT_DETECTION = ("detector", "upsample", "min_iou", "max_gap")


@dataclass
class SplitConfig:
    """``caer split``: hold out a validation list from a training list (``--num-classes`` is ExtractConfig's)."""

    PANEL = "Options"
    train_list: str = option(None, "The training annotation file to split.", argument=True)
    train_out: str = option(None, "Training list to write: the clips not held out.", panel="Output")
    val_out: str = option(None, "Validation list to write: the clips held out.", panel="Output")
    overwrite: bool = option(False, "Replace output lists that already exist.", panel="Output")
    # typer's ranges are closed: 0 and 1 pass the flag and are refused by the recipe
    # strictly between 0 and 1: checked by caer split (an option's range here is a closed one)
    val_fraction: float = option(0.1, "Share of each class held out for validation, strictly between 0 and 1.")
    seed: int = option(0, "Random seed of the choice (the same seed and list give the same split).", min=0)
    group: str | None = option(None, "Regular expression whose first capture group names a clip's group (e.g. "
                               "'^([^/]+)/' for a per-student folder): a group's clips all go to the same side.")


@dataclass
class VerifyConfig:
    """``caer cache verify``."""

    PANEL = "Options"
    path: str = option(None, "The feature cache to check (.zarr folder or .h5 file).", argument=True)


@dataclass
class SynthConfig:
    """``caer synth``: a synthetic dataset in the RAER layout."""

    PANEL = "Options"
    out: str = option(None, "Folder to write the dataset into.", argument=True)
    clips: int = option(60, "Number of clips in all splits.", min=1)
    frames: int = option(12, "Mean frames per clip (lengths vary from half to 1.5x).", min=2)
    width: int = option(128, "Frame width in pixels.", min=96)
    height: int = option(96, "Frame height in pixels.", min=96)
    classes: int = option(5, "Number of classes.", min=2)
    seed: int = option(0, "Random seed.", min=0)
    missing_face_rate: float = option(0.1, "Share of frames left without a face box.", min=0, max=1)


@dataclass
class InitWeightsConfig:
    """`caer init-weights`: randomly initialised open_clip weights, saved as a file."""

    PANEL = "Options"
    out: str = option(None, "Checkpoint file to write (.pt).", argument=True)
    model: str = option("caer-tiny", "open_clip model name.")
    seed: int = option(0, "Random seed.", min=0)
    overwrite: bool = option(False, "Replace an existing OUT file.")


@dataclass
class DemoConfig:
    """`caer demo`: the whole pipeline on a synthetic dataset, offline."""

    PANEL = "Options"
    out: str | None = option(None, "Folder for everything the demo writes.", shown="./caer-demo-<time>")
    clips: int = option(400, "Clips in the synthetic dataset.", min=11)
    frames: int = option(8, "Mean frames per clip.", min=2)
    epochs: int | None = option(None, "Stage-2 epochs.", min=0, shown="configs/tiny.yaml's")
    model: str = option("caer-tiny", "open_clip model; the default is the offline tiny one.")
    pretrained: str | None = option(None, "Weights for --model: an open_clip tag or a local file.",
                                    shown="random tiny weights")
    device: str = option("cpu", "auto, cpu, cuda or cuda:N.")
    ablations: bool = option(False, "After the demo, train the full model and each configs/ablations file (stages 1 "
                             "and 2; --epochs, else 15, stage-2 epochs) and print their caer compare table.")


@dataclass
class PlotConfig:
    """``caer plot``: the training curves of a run."""

    PANEL = "Options"
    run_dir: str = option(None, "Run directory of caer train (holds metrics.jsonl).", argument=True)
    out: str | None = option(None, "PNG to write.", flags=("--out", "-o"), shown="RUN_DIR/curves.png")
    overwrite: bool = option(False, "Replace an existing --out file (RUN_DIR/curves.png is always redrawn).")


@dataclass
class CompareConfig:
    """``caer compare``: one table of several runs."""

    PANEL = "Options"
    run_dirs: list[str] = option(help="Run directories of caer train.", factory=list, argument=True)
    markdown: bool = option(False, "Print the table as Markdown instead of a console table.")
    csv: str | None = option(None, "Also write the table to this CSV file.")
    overwrite: bool = option(False, "Replace an existing --csv file (never one inside a compared run directory).")


# ------------------------------------------------------------------------------------------ files

def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a shipped config (``raer``, ``tiny``, ``ablations/no_eaa``, ...)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{p.as_posix()}.yaml"
    if not p.suffix and not p.is_absolute() and shipped.is_file():
        return shipped
    names = ", ".join(sorted(q.relative_to(CONFIG_DIR).with_suffix("").as_posix() for q in CONFIG_DIR.rglob("*.yaml")))
    raise FileNotFoundError(f"--config {path}: no such file (shipped configs: {names})")


class DuplicateKey(ValueError):
    """A YAML mapping gives a key twice (the message says where)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": a merged key may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):
                continue  # the safe loader's own error says so
            line = key_node.start_mark.line + 1
            if key in first:
                raise DuplicateKey(f"line {line}: {key!r} is given twice (first on line {first[key]})")
            first[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(p: Path):
    """The data of a YAML file; a file that is not YAML text is an error naming it."""
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ValueError(f"{p}: not a YAML text file (byte {err.object[err.start]:#04x} at offset {err.start} "
                         "is not UTF-8 text)") from None
    except yaml.reader.ReaderError as err:
        raise ValueError(f"{p}: not a YAML text file (character #x{err.character:04x} at offset {err.position} "
                         "is not text)") from None
    except DuplicateKey as err:
        raise ValueError(f"{p}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{p}: not valid YAML ({err})") from None


def read_config_file(path: str | Path) -> dict:
    """Flat ``{option name: value}`` of a YAML config file (dashes in keys read as underscores)."""
    p = resolve_config_path(path)
    data = read_yaml(p) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of option names to values")
    values: dict = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in values:
            raise ValueError(f"{p}: option {name!r} is given twice (dashes and underscores are the same key)")
        values[name] = value
    return values


STAGE_EPOCHS = ("epochs_stage1", "epochs_stage2", "epochs_stage3")


def load_config(path: str | Path | list | tuple | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults, then the YAML file(s) in order (a later file's keys win), then ``overrides`` (flags that were
    given; None values are ignored). Each file's keys are checked naming that file."""
    paths = [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]
    values, sources = {}, {}
    for one in paths:
        mine, where = read_config_file(one), str(resolve_config_path(one))
        from_flat(RunConfig, mine, where)  # checked on its own, so errors name its file
        values |= mine
        sources |= dict.fromkeys(mine, ("file", where))
    if overrides and overrides.get("epochs") is not None:  # flags win over files: --epochs over their per-stage counts
        for key in STAGE_EPOCHS:
            values.pop(key, None)
            sources.pop(key, None)
    cfg = from_flat(RunConfig, values, str(resolve_config_path(paths[-1])) if len(paths) == 1 else "config")
    set_sources(cfg, sources)
    if overrides:
        cfg = replace_options(cfg, overrides)
    given = set(values) | {k for k, v in (overrides or {}).items() if v is not None}
    if "descriptions" not in given and cfg.model.classes != DEFAULT_CLASSES:  # the RAER sentences are RAER's own
        raise ValueError(f"classes {', '.join(cfg.model.classes)} come without descriptions: give one descriptive "
                         "sentence per class (--descriptions, repeated, or 'descriptions' in the config)")
    check_config(cfg)
    return cfg


def replace_options(cfg: RunConfig, overrides: dict, where: str = FLAG) -> RunConfig:
    """A copy of ``cfg`` with the given options changed (None values ignored)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    new = from_flat(RunConfig, to_flat(cfg) | given, where)
    set_sources(new, sources_of(cfg) | dict.fromkeys(given, source_entry(where)))
    return new


def check_config(cfg: RunConfig) -> None:
    """Rules between options that no single declaration can state."""
    m = cfg.model
    if not m.descriptions:
        raise ValueError("the config must give one descriptive sentence per class under 'descriptions'")
    if len(m.classes) != len(m.descriptions):
        raise ValueError(f"{len(m.classes)} classes but {len(m.descriptions)} descriptions in the config")


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write a run's settings, with --overwrite off: a run started from this file should not replace another
    silently."""
    settings = cfg.to_dict() | {"overwrite": False}
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
