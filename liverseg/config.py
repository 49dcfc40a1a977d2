"""TrainConfig: every training setting in one frozen dataclass, saved next to what it produced."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .augment import AugmentConfig
from .errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "no")
REPORTERS = ("none", "wandb", "tensorboard")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. ``shards`` is a shard folder, URL or ``pipe:`` template; ``out``
    the run folder (checkpoints/, best/, last/, history.jsonl)."""

    shards: str
    out: str
    arch: str = "unet"
    encoder: str = "resnet34"
    attention: str | None = None
    decoder_channels: tuple[int, ...] | None = None  # None: the architecture's default
    encoder_weights: str | None = None
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); validated and exported
    grad_accum: int = 1
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    val_every: int = 250
    val_batches: int | None = None
    save_every: int = 500
    keep_checkpoints: int = 3
    resume: str | None = None
    report_to: str = "none"
    project: str = "liverseg"
    run_name: str | None = None
    workers: int = 4
    shuffle_buffer: int = 1000
    oversample_tumour: float = 0.0
    class_weights: tuple[float, ...] | None = None  # cross-entropy weights of background, liver, tumour
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    max_nonfinite: int = 5
    log_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.report_to in REPORTERS, f"report_to must be one of {REPORTERS}"),
            (self.steps >= 1 and self.batch_size >= 1 and self.grad_accum >= 1,
             "steps, batch_size and grad_accum must be >= 1"),
            (self.lr > 0 and self.warmup_steps >= 0, "lr must be > 0 and warmup_steps >= 0"),
            (self.val_every >= 1 and self.save_every >= 1 and self.log_every >= 1,
             "val_every, save_every and log_every must be >= 1"),
            (self.max_nonfinite >= 1 and self.keep_checkpoints >= 1,
             "max_nonfinite and keep_checkpoints must be >= 1"),
            (0.0 <= self.ema < 1.0, f"ema must be in [0, 1), got {self.ema}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for name in ("attention", "encoder_weights", "resume"):
            if getattr(self, name) in ("none", "None", ""):
                object.__setattr__(self, name, None)
        if isinstance(self.class_weights, list):
            object.__setattr__(self, "class_weights", tuple(self.class_weights))
        if self.class_weights is not None and (len(self.class_weights) != 3
                                               or min(self.class_weights) <= 0):
            raise ConfigError(f"class_weights must be 3 positive numbers, got {self.class_weights}")
        if isinstance(self.decoder_channels, list):
            object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from an optional YAML file, with command-line values on top."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown training settings {unknown}; valid: {sorted(known)}")
    missing = [name for name in ("shards", "out") if name not in data]
    if missing:
        raise ConfigError(f"missing required settings {missing}")
    try:
        return TrainConfig(**data)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
