"""Segmentation models by name (smp architectures and a ResUNet on smp encoders), and the
checkpoint folder for use: ``model.safetensors`` + ``config.json``, loaded without pickle."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from liverseg.errors import CheckpointError, ConfigError
from shardgen.errors import ShardgenError
from shardgen.preprocess import Preprocessing

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ATTENTIONS = ("scse",)
# Shown when an encoder name is wrong; a test checks that each is accepted.
EXAMPLE_ENCODERS = ("resnet18", "resnet34", "resnet50", "efficientnet-b0", "mobilenet_v2",
                    "mit_b0", "tu-convnext_tiny")
_STRIDE = 32  # five ×2 downsamplings in every depth-5 encoder


# --------------------------------------------------------------------------- ResUNet

def _conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    # no conv bias: the BatchNorm right after it has its own shift
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResidualUnit(nn.Module):
    """Post-activation residual unit: relu(conv3-BN-ReLU-conv3-BN(x) + shortcut(x)).

    The shortcut is the identity when the channel counts match, else a 1×1 conv + BN
    projection. Zhang et al. (2018) use full pre-activation units; post-activation is used
    here so every stage (and the head) receives normalised, rectified features, as smp's
    U-Net decoder does, and a zeroed last BN turns the unit into relu(shortcut(x)).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Sequential(
            *_conv_bn(in_channels, out_channels, 3),
            nn.ReLU(inplace=True),
            *_conv_bn(out_channels, out_channels, 3),
        )
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else _conv_bn(in_channels, out_channels, 1))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.residual(x) + self.shortcut(x))


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (Roy et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.spatial_gate = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel_gate(x) + x * self.spatial_gate(x)


class DecoderStage(nn.Module):
    """Upsample ×2, concatenate the encoder skip (if any), residual unit, optional scSE."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int,
                 attention: str | None = None):
        super().__init__()
        self.unit = ResidualUnit(in_channels + skip_channels, out_channels)
        self.attention = SCSE(out_channels) if attention == "scse" else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:  # fixed per stage (only the last has none), so compile sees no branch
            x = torch.cat([x, skip], dim=1)
        return self.attention(self.unit(x))


class ResUNetDecoder(nn.Module):
    """Five decoder stages from the stride-32 features back to full resolution."""

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int],
                 attention: str | None = None):
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"ResUNet needs 5 decoder channel counts, got {list(decoder_channels)}")
        # features[0] is the input itself: the last stage upsamples to full size without a skip
        skip_channels = [*reversed(encoder_channels[1:-1]), 0]
        in_channels = [encoder_channels[-1], *decoder_channels[:-1]]
        self.stages = nn.ModuleList(
            DecoderStage(i, s, o, attention)
            for i, s, o in zip(in_channels, skip_channels, decoder_channels)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        skips = [*reversed(features[1:-1]), None]
        x = features[-1]
        for stage, skip in zip(self.stages, skips):
            x = stage(x, skip)
        return x


class ResUNet(nn.Module):
    """Deep residual U-Net (Zhang, Liu & Wang 2018) on any depth-5 smp encoder.

    Takes the same keyword names as smp's models so ``ARCHITECTURES`` can build either.
    Returns ``classes`` logits at the input resolution; height and width must be
    divisible by 32.
    """

    def __init__(self, encoder_name: str = "resnet34", encoder_weights: str | None = None,
                 in_channels: int = 3, classes: int = 3,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                 decoder_attention_type: str | None = None):
        super().__init__()
        self.encoder = smp.encoders.get_encoder(encoder_name, in_channels=in_channels, depth=5,
                                                weights=encoder_weights)
        self.decoder = ResUNetDecoder(self.encoder.out_channels, decoder_channels,
                                      decoder_attention_type)
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # a shape guard is all compile would make of it
            _check_divisible(x)
        return self.segmentation_head(self.decoder(self.encoder(x)))


def _check_divisible(x: torch.Tensor) -> None:
    height, width = x.shape[-2:]
    if height % _STRIDE or width % _STRIDE:
        raise ValueError(f"ResUNet input height and width must be divisible by {_STRIDE}, "
                         f"got {height}×{width}")


# --------------------------------------------------------------------------- registry

# Every constructor takes encoder_name, encoder_weights, in_channels, classes and, where
# the architecture has decoder attention, decoder_attention_type.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    **smp.MODEL_ARCHITECTURES_MAPPING,
    "resunet": ResUNet,
}


def supports_attention(arch: str) -> bool:
    """Whether the architecture's decoder takes an attention type."""
    return "decoder_attention_type" in inspect.signature(ARCHITECTURES[arch]).parameters


def create_model(arch: str, encoder: str = "resnet34", in_channels: int = 3, classes: int = 3,
                 encoder_weights: str | None = None, attention: str | None = None,
                 decoder_channels: Sequence[int] | None = None) -> nn.Module:
    """Build a segmentation model that returns ``classes`` logits per pixel, e.g.
    ``create_model("resunet", "resnet18", in_channels=1, attention="scse")``.

    Names are checked first (ConfigError lists the valid ones); ``encoder_weights`` other
    than None are fetched by smp, and a failed fetch is a ConfigError, not a hang or a trace.
    ``decoder_channels`` narrows (or widens) the decoder of architectures that have the
    setting (unet, unetplusplus, resunet, ...): on a CPU, (64, 32, 16, 16, 16) trains
    1.6x faster than the default (256, 128, 64, 32, 16) at 128².
    """
    constructor = _lookup_arch(arch)
    _check_encoder(encoder)
    _check_weights(encoder, encoder_weights)
    kwargs: dict[str, Any] = dict(encoder_name=encoder, encoder_weights=encoder_weights,
                                  in_channels=in_channels, classes=classes)
    kwargs.update(_attention_kwargs(arch, attention))
    if decoder_channels is not None:
        kwargs["decoder_channels"] = _decoder_setting(arch, constructor, decoder_channels)
    try:
        return constructor(**kwargs)
    except OSError as err:
        # urllib's URLError, requests' and huggingface_hub's connection and offline errors
        # are all OSErrors; with weights None nothing is fetched, so that would be a bug
        if encoder_weights is None:
            raise
        raise ConfigError(f"could not fetch {encoder_weights} weights for {encoder} (no network?); "
                          "use encoder weights none") from err
    except ValueError as err:  # smp's way of refusing an arch/encoder pair, e.g. dpt + resnet
        raise ConfigError(f"{arch} cannot be built with encoder {encoder}: {err}") from err


def _decoder_setting(arch: str, constructor: Callable[..., nn.Module],
                     decoder_channels: Sequence[int]) -> tuple[int, ...]:
    parameter = inspect.signature(constructor).parameters.get("decoder_channels")
    if parameter is None:
        raise ConfigError(f"{arch} has no decoder_channels setting")
    # deeplabv3, pan, upernet, ... take one width, not one per stage; a tuple would be a TypeError deep in smp
    if not isinstance(parameter.default, (tuple, list)):
        raise ConfigError(f"{arch} takes one decoder width, not decoder_channels per stage")
    return tuple(int(c) for c in decoder_channels)


def _lookup_arch(arch: str) -> Callable[..., nn.Module]:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}{_did_you_mean(arch, ARCHITECTURES)}; "
                          f"valid: {', '.join(sorted(ARCHITECTURES))}") from None


def _check_encoder(encoder: str) -> None:
    if encoder.startswith("tu-") and timm.is_model(encoder[3:]):
        return
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        raise ConfigError(f"unknown encoder {encoder!r}{_did_you_mean(encoder, names)}; valid encoders "
                          f"include {', '.join(EXAMPLE_ENCODERS)}, or any timm model as 'tu-<name>'; "
                          "full list: segmentation_models_pytorch.encoders.get_encoder_names()")


def _check_weights(encoder: str, weights: str | None) -> None:
    # timm encoders ('tu-') take any non-None value as "pretrained" and name the variant themselves
    if weights is None or encoder.startswith("tu-"):
        return
    available = list(smp.encoders.encoders[encoder]["pretrained_settings"])
    if weights not in available:
        raise ConfigError(f"encoder {encoder} has no {weights!r} weights; "
                          f"available: {', '.join(available) or 'none'}, or none")


def _attention_kwargs(arch: str, attention: str | None) -> dict[str, str]:
    if attention is None:
        return {}
    if attention not in ATTENTIONS:
        raise ConfigError(f"unknown attention {attention!r}; valid: {', '.join(ATTENTIONS)} or none")
    if not supports_attention(arch):
        with_attention = sorted(a for a in ARCHITECTURES if supports_attention(a))
        raise ConfigError(f"{arch} has no decoder attention; use attention none, "
                          f"or one of {', '.join(with_attention)}")
    return {"decoder_attention_type": attention}


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- spec

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What ``create_model`` needs to rebuild a model; stored as ``config.json["model"]``.

    Encoder weights are not part of it: a checkpoint's own weights replace them.
    """

    arch: str
    encoder: str = "resnet34"
    in_channels: int = 3
    classes: int = 3
    attention: str | None = None
    decoder_channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.decoder_channels, list):  # back from JSON
            object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """The inverse of ``to_dict``; ConfigError on unknown, missing, mistyped or
        out-of-bounds fields (``SPEC_RULES``), before anything is built."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown model settings {_shown(unknown)}; valid: {sorted(fields)}")
        if "arch" not in data:
            raise ConfigError("model settings lack 'arch'")
        problems = field_problems(data, SPEC_RULES, "model.")
        if problems:
            raise ConfigError(problems)
        return cls(**data)


# --------------------------------------------------------------------------- bounds

def _integer(lo: int, hi: int) -> Callable[[Any], bool]:
    # `type(v) is int`, not isinstance: JSON true is a bool, which Python counts as the int 1
    return lambda v: type(v) is int and lo <= v <= hi


def _name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 200


def _decoder_channels(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and len(value) == DECODER_STAGES
                             and all(map(_integer(1, MAX_DECODER_CHANNELS), value)))


# What a checkpoint's config.json may ask for, checked before anything is built: the file
# is user input, and classes 1e9 would have torch allocate 64 GB before failing. The
# bounds are far above any model liverseg trains (3 classes, 1-7 channels, 256-wide decoders).
MAX_CLASSES, MAX_IN_CHANNELS, MAX_DECODER_CHANNELS = 16, 64, 4096
DECODER_STAGES = 5  # one per ×2 downsampling of the depth-5 encoders (see _STRIDE)
SPEC_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "arch": (_name, "an architecture name"),
    "encoder": (_name, "an encoder name"),
    "in_channels": (_integer(1, MAX_IN_CHANNELS), f"an integer in 1..{MAX_IN_CHANNELS}"),
    "classes": (_integer(1, MAX_CLASSES), f"an integer in 1..{MAX_CLASSES}"),
    "attention": (lambda v: v is None or _name(v), "null or an attention name"),
    "decoder_channels": (_decoder_channels,
                         f"null or {DECODER_STAGES} integers in 1..{MAX_DECODER_CHANNELS}"),
}


MAX_CONFIG_BYTES = 1 << 20  # a checkpoint's config.json is a few kB; a huge one is not parsed


def field_problems(data: Mapping[str, Any], rules: Mapping[str, tuple[Callable[[Any], bool], str]],
                   prefix: str = "") -> str:
    """'' when every field of ``data`` that has a rule passes it, else one line naming
    each failing field (``prefix`` + name), what it must be and what it is."""
    return "; ".join(f"invalid {prefix}{name}: must be {what}, got {_shown(data[name])}"
                     for name, (ok, what) in rules.items() if name in data and not ok(data[name]))


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 40
_SHORT.maxlist = _SHORT.maxdict = 6


def _shown(value: Any) -> str:
    """A value for a one-line message: repr, shortened (a hostile file may hold megabytes)."""
    return _SHORT.repr(value)


# --------------------------------------------------------------------------- checkpoints

def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


def export_checkpoint(model: nn.Module, spec: ModelSpec, folder: Path,
                      extra: Mapping[str, Any]) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` = {"model": spec, **extra}.

    Each file is written under a temporary name and renamed into place; the old
    config.json goes first, so a crash can leave an unloadable folder but never a new
    model file paired with an old config. Returns the folder.
    """
    if "model" in extra:
        raise ValueError("extra must not hold a 'model' key: it is the model spec's place")
    model = unwrap_model(model)
    config_text = json.dumps({"model": spec.to_dict(), **extra}, indent=2)
    _check_loadable(folder, config_text)
    tensors = tensors_for_safetensors(model.state_dict())
    _check_spec_fits(spec, tensors)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_tmp = _temp_path(folder, MODEL_FILE)
    config_tmp = _temp_path(folder, CONFIG_FILE)
    try:
        save_file(tensors, str(model_tmp), metadata={"format": "pt"})
        _fsync(model_tmp)
        config_tmp.write_text(config_text + "\n")
        _fsync(config_tmp)
        (folder / CONFIG_FILE).unlink(missing_ok=True)
        os.replace(model_tmp, folder / MODEL_FILE)
        os.replace(config_tmp, folder / CONFIG_FILE)
    finally:
        model_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    return folder


def _check_loadable(folder: Path, config_text: str) -> None:
    # a checkpoint that load_checkpoint would refuse is a bug in the caller: refuse to write it
    try:
        check_checkpoint_config(Path(folder) / CONFIG_FILE, json.loads(config_text))
    except CheckpointError as err:
        raise ValueError(f"refusing to write a checkpoint that would not load: {err}") from None


def tensors_for_safetensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, each owning its storage.

    safetensors refuses tensors that share memory (tied weights, views); those get a copy,
    so every state-dict key is saved and a strict load finds them all.
    """
    tensors, seen = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
            key = tensor.untyped_storage().data_ptr()
        seen.add(key)
        tensors[name] = tensor
    return tensors


def _check_spec_fits(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    # A spec that does not describe the model would otherwise only show at load time, after training.
    problem = _state_mismatch(_shapes(_empty_state(spec)), _shapes(tensors))
    if problem:
        raise ValueError(f"spec {spec} does not describe the model: {problem}")


def _empty_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The state dict's keys and shapes, built on the meta device (no memory, ~0.1 s) where possible."""
    try:
        with torch.device("meta"):
            return create_model(**spec.to_dict()).state_dict()
    except RuntimeError:  # some encoders (mit_b*) call .item() while building, which meta refuses
        return create_model(**spec.to_dict()).state_dict()


def _temp_path(folder: Path, name: str) -> Path:
    # not tempfile.mkstemp: its 0600 mode would survive the rename and hide the checkpoint
    # from other users of a shared cluster; the pid keeps concurrent writers apart
    return folder / f".{name}.{os.getpid()}.tmp"


def _fsync(path: Path) -> None:
    # the rename is only crash-safe if the data reached the disk before it
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def load_checkpoint(folder: Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of an exported checkpoint folder, in eval mode, and return its config.

    Uses safetensors only (no pickle). CheckpointError names the file for a missing folder
    or file, invalid JSON, out-of-bounds or inconsistent settings, settings that do not
    build, a corrupt weights file or weights that do not fit the model. Nothing is
    allocated before the settings are checked and the weights file's header (the tensor
    names and shapes) is found to fit them.
    """
    folder = Path(folder)
    config = read_checkpoint_config(folder)
    spec = ModelSpec.from_dict(config["model"])
    expected = _expected_shapes(folder / CONFIG_FILE, spec)
    problem = _state_mismatch(expected, _weight_shapes(folder / MODEL_FILE))
    if problem:
        raise CheckpointError(f"{folder / MODEL_FILE}: weights do not fit {config['model']}: {problem}")
    model = create_model(**spec.to_dict())
    model.load_state_dict(_read_weights(folder / MODEL_FILE), strict=True)
    return model.to(map_location).eval(), config


def read_checkpoint_config(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's config.json, checked (``check_checkpoint_config``); builds nothing."""
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    path = Path(folder) / CONFIG_FILE
    config = _read_json(path)
    check_checkpoint_config(path, config)
    return config


def _read_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, not a checkpoint config (a few kB)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: invalid JSON (nested too deeply)") from None


def check_checkpoint_config(path: Path, config: Any) -> None:
    """CheckpointError naming ``path`` and the field unless ``config`` holds model settings
    within ``SPEC_RULES`` and, when recorded, preprocessing that shardgen accepts,
    whose channel count is the model's, and one class name per class."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: no \"model\" settings object")
    try:
        spec = ModelSpec.from_dict(config["model"])
        if "preprocessing" in config:
            _check_preprocessing(config["preprocessing"], spec)
        if "classes" in config:
            _check_class_names(config["classes"], spec)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _check_preprocessing(settings: Any, spec: ModelSpec) -> None:
    try:  # shardgen's own bounds: a size of 1e6 would have evaluation allocate terabytes
        channels = Preprocessing.from_dict(settings).channels
    except ShardgenError as err:
        field, _, reason = str(err).partition(": ")
        named = field in {f.name for f in dataclasses.fields(Preprocessing)}
        raise ConfigError(f"invalid preprocessing.{field}: {reason}" if named
                          else f"invalid preprocessing: {err}") from None
    if spec.in_channels != channels:
        raise ConfigError(f"invalid model.in_channels: {spec.in_channels}, but the preprocessing makes "
                          f"{channels} channels (2 x preprocessing.context + 1)")


def _check_class_names(names: Any, spec: ModelSpec) -> None:
    if not (isinstance(names, list) and len(names) == spec.classes and all(map(_name, names))):
        raise ConfigError(f"invalid classes: must be model.classes ({spec.classes}) names, got {_shown(names)}")


def _expected_shapes(path: Path, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shapes of ``spec``'s state dict, built on the meta device; CheckpointError
    naming ``path`` for settings that do not build."""
    try:
        return _shapes(_empty_state(spec))
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        with safe_open(str(path), framework="pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _state_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                    shown: int = 5) -> str:
    """'' when the keys and shapes agree, else which keys are missing, unexpected or reshaped."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    parts = [f"{label} {len(keys)} keys {keys[:shown]}{' …' if len(keys) > shown else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected),
                                 ("shape-mismatched", reshaped)) if keys]
    return "; ".join(parts)
