"""TrainConfig, AugmentConfig and EvalConfig: every training and evaluation setting in
frozen dataclasses, saved next to what they produced. No torch here, so `--help` and
config checks stay fast; the CLIs read their defaults from these classes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shardgen.settings import from_dict

from .errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "no")
REPORTERS = ("none", "wandb", "tensorboard")
BAD_SHARD_POLICIES = ("fail", "skip")  # what training does with a shard it cannot read
TTA_CHOICES = ("none", "flips")  # test-time augmentation of inference (liverseg.inference.flips)
CONVENTIONS = ("liverseg", "lits")  # scores: liverseg's (docs/METRICS.md) or the LiTS challenge scorer's
EVAL_REPORTERS = ("none", "wandb")
OUTPUT_FORMATS = ("nifti", "dicom-seg")  # predictions: NIfTI label maps; also DICOM SEG for DICOM series


@dataclass(frozen=True)
class AugmentConfig:
    """Settings of `BatchAugment`; set a field to 0 (or ``(1.0, 1.0)``) to turn it off.

    flip_lr: chance of a left-right flip. 0: preprocessing fixes the orientation, and the
        liver lies on the patient's right; a mirrored abdomen puts the spleen, of nearly
        the liver's density, where the liver belongs (situs inversus is about 1 in 10 000).
    flip_ud: chance of an up-down (anterior-posterior) flip. 0: preprocessing fixes the
        orientation, and no real scan shows the spine above the belly.
    rotate_deg: rotation drawn uniformly from ±rotate_deg. 10: patients lie a little
        askew on the table; larger turns show anatomy that never occurs.
    scale: isotropic zoom drawn uniformly from this range. (0.9, 1.1): body sizes and
        reconstruction fields of view differ by roughly that much after resizing.
    intensity_shift: brightness offset drawn from ±intensity_shift (in [0, 1] units).
        0.05 (25 HU in a 500 HU window): scanners and contrast timing shift liver HU so.
    intensity_scale: contrast gain drawn from this range. (0.9, 1.1): the same reason.
    noise_std: standard deviation of added Gaussian noise. 0.02 (10 HU): low-dose scans
        are that much noisier than the typical training scan.
    p: chance that a sample is augmented at all; the others pass through unchanged.
        1.0: every sample, since each transform above already has its own mild range.
    crop: train on a random crop × crop window of every slice (each sample its own,
        after the other transforms; p does not apply). 0: whole slices. A fully
        convolutional net trained on windows still predicts whole slices, so shards of a
        finer size train at the cost of the window: more pixels per lesion for the same
        compute, at the price of less context per step. A multiple of 32.
    crop_foreground: chance that a sample's window is placed around a random tumour
        pixel of it (a random liver pixel if it has no tumour; anywhere if neither)
        instead of anywhere. 0: uniform windows. nnU-Net places a third of its patches
        on foreground so that a small class is seen at all; with windows a quarter of
        the slice, a uniform window misses a lesion most of the time.
    """

    flip_lr: float = 0.0
    flip_ud: float = 0.0
    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: float = 0.05
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    noise_std: float = 0.02
    p: float = 1.0
    crop: int = 0
    crop_foreground: float = 0.0

    def __post_init__(self):
        for name in ("scale", "intensity_scale"):
            # configs come back from JSON with lists; tuples keep the dataclass hashable
            object.__setattr__(self, name, _range_pair(name, getattr(self, name)))
        for name in ("flip_lr", "flip_ud", "p", "crop_foreground"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augment {name} must be a probability in [0, 1], "
                                  f"got {getattr(self, name)}")
        for name in ("rotate_deg", "intensity_shift", "noise_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment {name} must be >= 0, got {getattr(self, name)}")
        if self.crop < 0 or self.crop % 32:
            raise ConfigError(f"augment crop must be 0 (whole slices) or a positive multiple of 32, "
                              f"got {self.crop}")

    @property
    def flips_only(self) -> bool:
        """No rotation or zoom: flips can be done by indexing, exactly."""
        return self.rotate_deg == 0 and self.scale == (1.0, 1.0)

    @property
    def geometric(self) -> bool:
        return not self.flips_only or self.flip_lr > 0 or self.flip_ud > 0

    @property
    def photometric(self) -> bool:
        return (self.intensity_shift > 0 or self.intensity_scale != (1.0, 1.0)
                or self.noise_std > 0)

    @property
    def identity(self) -> bool:
        return not self.crop and (self.p == 0 or not (self.geometric or self.photometric))


def _range_pair(name: str, value) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low, high = 0.0, -1.0  # reported below
    if not 0 < low <= high:
        raise ConfigError(f"augment {name} must be a (low, high) pair with 0 < low <= high, "
                          f"got {value!r}")
    return low, high


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
    on_bad_shard: str = "fail"  # "skip": leave out shards that cannot be read, warn and count them
    trace_samples: bool = False  # write the sample keys of every step to samples.jsonl

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
            (self.on_bad_shard in BAD_SHARD_POLICIES, f"on_bad_shard must be one of {BAD_SHARD_POLICIES}"),
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
            object.__setattr__(self, "augment", from_dict(AugmentConfig, self.augment, "augment settings",
                                                          ConfigError))

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
    return from_dict(TrainConfig, data, "training settings", ConfigError, required=("shards", "out"))


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation (``liverseg-eval run``, ``predict``, ``tune``); written to
    EVAL/config.json and summary.json."""

    checkpoints: tuple[str, ...]
    data: str
    out: str
    split: str = "test"
    tta: str = "none"
    postprocess: str = "default"
    batch_size: int = 16
    device: str | None = None
    report_to: str = "none"
    with_labels: bool = True
    convention: str = "liverseg"  # "lits": also the LiTS challenge scorer's figures (lits_official)
    output_format: str = "nifti"  # "dicom-seg": a DICOM series' prediction also as a DICOM SEG
    report: bool = True  # charts/, panels/ and report.html; False: the CSV and JSON files only

    def __post_init__(self) -> None:
        if self.tta not in TTA_CHOICES:
            raise ConfigError(f"unknown tta {self.tta!r}; valid: {', '.join(TTA_CHOICES)}")
        if self.batch_size < 1:
            raise ConfigError("batch size must be >= 1")
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"unknown convention {self.convention!r}; valid: {', '.join(CONVENTIONS)}")
        if self.report_to not in EVAL_REPORTERS:
            raise ConfigError(f"unknown report_to {self.report_to!r}; valid: {', '.join(EVAL_REPORTERS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"unknown output format {self.output_format!r}; valid: {', '.join(OUTPUT_FORMATS)}")
        object.__setattr__(self, "checkpoints", tuple(str(c) for c in self.checkpoints))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of ``liverseg-eval score``. reference, predictions: folders of label maps
    paired by case number; convention: "liverseg" (docs/METRICS.md) or "lits" (the
    challenge's scorer); out: output folder."""

    reference: str
    predictions: str
    out: str
    convention: str = "liverseg"

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"unknown convention {self.convention!r}; valid: {', '.join(CONVENTIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
