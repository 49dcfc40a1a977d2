"""The checkpoint folder for use: ``model.safetensors`` + ``config.json`` (the model's
``ModelSpec``, the preprocessing, the class names, the training settings), loaded
without pickle.

Reading and checking a config imports no torch, so the CLIs refuse a missing or bad
checkpoint at once; writing and loading weights import torch when they are called.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardgen.errors import ShardgenError
from shardgen.io import atomic_path
from shardgen.labels import CLASS_NAMES, NUM_CLASSES
from shardgen.preprocess import Preprocessing
from shardgen.settings import from_dict, shown

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What ``create_model`` needs to rebuild a model; stored as ``config.json["model"]``.

    Encoder weights are not part of it: a checkpoint's own weights replace them.
    """

    arch: str
    encoder: str = "resnet34"
    in_channels: int = 3
    classes: int = NUM_CLASSES
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
        return from_dict(cls, data, "model settings", ConfigError, required=("arch",),
                         check=lambda d: field_problems(d, SPEC_RULES, "model."))


# --------------------------------------------------------------------------- bounds

def _integer(lo: int, hi: int) -> Callable[[Any], bool]:
    # `type(v) is int`, not isinstance: JSON true is a bool, which Python counts as the int 1
    return lambda v: type(v) is int and lo <= v <= hi


def is_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 200


def _decoder_channels(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and len(value) == DECODER_STAGES
                             and all(map(_integer(1, MAX_DECODER_CHANNELS), value)))


# What a checkpoint's config.json may ask for, checked before anything is built: the file
# is user input, and classes 1e9 would have torch allocate 64 GB before failing. The
# bounds are far above any model liverseg trains (3 classes, 1-7 channels, 256-wide decoders).
MAX_CLASSES, MAX_IN_CHANNELS, MAX_DECODER_CHANNELS = 16, 64, 4096
DECODER_STAGES = 5  # one per ×2 downsampling of the depth-5 encoders (resunet.STRIDE)
SPEC_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "arch": (is_name, "an architecture name"),
    "encoder": (is_name, "an encoder name"),
    "in_channels": (_integer(1, MAX_IN_CHANNELS), f"an integer in 1..{MAX_IN_CHANNELS}"),
    "classes": (_integer(1, MAX_CLASSES), f"an integer in 1..{MAX_CLASSES}"),
    "attention": (lambda v: v is None or is_name(v), "null or an attention name"),
    "decoder_channels": (_decoder_channels,
                         f"null or {DECODER_STAGES} integers in 1..{MAX_DECODER_CHANNELS}"),
}


MAX_CONFIG_BYTES = 1 << 20  # a checkpoint's config.json is a few kB; a huge one is not parsed


def field_problems(data: Mapping[str, Any], rules: Mapping[str, tuple[Callable[[Any], bool], str]],
                   prefix: str = "") -> str:
    """'' when every field of ``data`` that has a rule passes it, else one line naming
    each failing field (``prefix`` + name), what it must be and what it is."""
    return "; ".join(f"invalid {prefix}{name}: must be {what}, got {shown(data[name])}"
                     for name, (ok, what) in rules.items() if name in data and not ok(data[name]))


# --------------------------------------------------------------------------- checkpoints

def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers (any nesting)."""
    from torch import nn

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
    from safetensors.torch import save_file

    if "model" in extra:
        raise ValueError("extra must not hold a 'model' key: it is the model spec's place")
    model = unwrap_model(model)
    config_text = json.dumps({"model": spec.to_dict(), **extra}, indent=2)
    _check_loadable(folder, config_text)
    tensors = tensors_for_safetensors(model.state_dict())
    _check_spec_fits(spec, tensors)
    folder = Path(folder)
    # the inner block's end renames the model file, the outer's then the config
    with atomic_path(folder / CONFIG_FILE) as config_tmp:
        with atomic_path(folder / MODEL_FILE) as model_tmp:
            save_file(tensors, str(model_tmp), metadata={"format": "pt"})
            config_tmp.write_text(config_text + "\n")
            (folder / CONFIG_FILE).unlink(missing_ok=True)
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
    import torch

    from .models import create_model  # smp and torch: imported only when a model is built

    try:
        with torch.device("meta"):
            return create_model(**spec.to_dict()).state_dict()
    except RuntimeError:  # some encoders (mit_b*) call .item() while building, which meta refuses
        return create_model(**spec.to_dict()).state_dict()


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
    from .models import create_model

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


def read_evaluable_config(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's config.json, checked (``read_checkpoint_config``) and found to be
    one evaluation can use (``check_evaluable``); builds nothing, imports no torch."""
    config = read_checkpoint_config(folder)
    check_evaluable(Path(folder) / CONFIG_FILE, config)
    return config


# the training settings whose flips test-time augmentation repeats (liverseg.inference.FLIP_DIMS)
FLIP_SETTINGS = ("flip_lr", "flip_ud")


def check_evaluable(path: Path, config: dict) -> None:
    """CheckpointError naming ``path`` and the field unless a checkpoint config (already
    checked by ``read_checkpoint_config``) is one evaluation can use: recorded
    preprocessing, labels 0 background, 1 liver, 2 tumour (what the scores read and the
    ensemble averages), and flip settings that are probabilities."""
    if "preprocessing" not in config:
        raise CheckpointError(f"{path}: no recorded preprocessing")
    classes = ModelSpec.from_dict(config["model"]).classes
    if classes != NUM_CLASSES:
        raise CheckpointError(f"{path}: invalid model.classes: evaluation needs {NUM_CLASSES} "
                              f"(background, liver, tumour), got {classes}")
    if config.get("classes", list(CLASS_NAMES)) != list(CLASS_NAMES):
        raise CheckpointError(f"{path}: invalid classes: evaluation needs {list(CLASS_NAMES)} "
                              f"in that order, got {config['classes']}")
    problem = _augment_problem(config.get("train"))
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def _augment_problem(train: object) -> str:
    """'' when the training settings' flips (read by ``flips``) are absent or probabilities."""
    if train is None:
        return ""
    if not isinstance(train, dict):
        return "invalid train: must be an object"
    augment = train.get("augment")
    if augment is None:
        return ""
    if not isinstance(augment, dict):
        return "invalid train.augment: must be an object"
    return "; ".join(f"invalid train.augment.{key}: must be a number in 0..1, got {augment[key]!r:.40}"
                     for key in FLIP_SETTINGS if key in augment and not _probability(augment[key]))


def _probability(value: object) -> bool:
    return type(value) in (int, float) and 0 <= value <= 1


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
    if not (isinstance(names, list) and len(names) == spec.classes and all(map(is_name, names))):
        raise ConfigError(f"invalid classes: must be model.classes ({spec.classes}) names, got {shown(names)}")


def _expected_shapes(path: Path, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shapes of ``spec``'s state dict, built on the meta device; CheckpointError
    naming ``path`` for settings that do not build."""
    try:
        return _shapes(_empty_state(spec))
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        with safe_open(str(path), framework="pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
