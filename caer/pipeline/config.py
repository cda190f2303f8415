"""Run configuration: one flat record, filled from defaults < a YAML file (``--config``) < command-line flags."""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .model import ModelConfig

CONFIG_DIR = Path(str(importlib.resources.files("caer.configs")))


@dataclass
class RunConfig:
    # data
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    root: str | None = None  # dataset root for --source raw [default: the annotation file's folder]
    face_boxes: str | None = None
    body_boxes: str | None = None
    crop_body: bool = False
    margin: float = 20.0
    cache: str | None = None
    source: str = "cache"  # cache | raw
    cache_in_memory: bool = False
    frame_stride: int = 1  # raw source without a cache; with a cache its own stride is used
    workers: int = 2
    # encoder
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    # model (see ModelConfig)
    classes: list[str] = field(default_factory=lambda: ["Neutrality", "Enjoyment", "Confusion", "Fatigue", "Distraction"])
    descriptions: list[str] = field(default_factory=list)
    num_frames: int = 16
    streams: str = "both"
    input_norm: bool = True
    adapter: bool = True
    adapter_reduction: int = 4
    adapter_scale: float = 1.0
    adapter_mode: str = "residual"
    temporal_layers: int = 1
    temporal_heads: int | None = None
    temporal_mlp: int | None = None
    dropout: float = 0.1
    contexts_number: int = 8
    class_specific_contexts: bool = True
    class_token_position: str = "end"
    temperature: float = 0.2
    slerp_weight: float = 0.0
    iec_base: str = "desc"
    # losses and imbalance
    class_balanced_loss: bool = False
    cb_beta: float = 0.9999
    logit_adj: bool = False
    logit_adj_tau: float = 1.0
    label_smoothing: float = 0.0
    use_weighted_sampler: bool = False
    lambda_mi: float = 0.0
    mi_warmup: int = 0
    mi_ramp: int = 0
    lambda_dc: float = 0.0
    dc_warmup: int = 0
    dc_ramp: int = 0
    # optimisation
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 1e-3
    lr_adapter: float | None = None  # default: the stage's learning rate
    lr_prompt: float | None = None
    lr_image_encoder: float = 1e-6
    lr_stage1: float | None = None  # default: lr
    lr_stage2: float | None = None
    lr_stage3: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | step
    step_size: int = 10
    gamma: float = 0.1
    batch_size: int = 8
    epochs: int = 20
    epochs_stage1: int | None = None  # default: epochs
    epochs_stage2: int | None = None
    epochs_stage3: int | None = None
    grad_clip: float | None = None
    use_amp: bool = False
    seed: int = 0
    # stage 3
    unfreeze_last: int | None = None  # None: the whole image encoder
    rotate_degrees: float = 4.0  # train-time rotation in [-r, r], one angle per clip (with a random flip)
    grad_accum: int = 1
    grad_checkpointing: bool = False
    # run
    stage: int = 2
    staged_training: bool = False
    run_dir: str = "runs/caer"
    resume: bool = False
    init_from: str | None = None  # checkpoint a single stage starts from [default: the run dir's previous stage's best]
    device: str = "auto"

    def model_config(self) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def stage_lr(self, stage: int) -> float:
        return getattr(self, f"lr_stage{stage}") or self.lr

    def stage_epochs(self, stage: int) -> int:
        value = getattr(self, f"epochs_stage{stage}")
        return self.epochs if value is None else value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a shipped config (``raer``, ``tiny``)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{p.name}.yaml"
    if not p.suffix and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"--config {path}: no such file (shipped configs: {', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))})")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults, then the YAML file, then ``overrides`` (flags that were given; None values are ignored)."""
    values: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{p}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of option names to values")
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ValueError(f"{p}: unknown option {key!r}")
            if name in values:
                raise ValueError(f"{p}: option {name!r} is given twice (dashes and underscores are the same key)")
            values[name] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    cfg = RunConfig(**values)
    if not cfg.descriptions:
        raise ValueError("the config must give one descriptive sentence per class under 'descriptions'")
    return cfg


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
