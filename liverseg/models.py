"""Segmentation models by name: smp's architectures and liverseg's ResUNet, built by one
factory whose errors list the valid names. Checkpoints: ``liverseg.checkpoint``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import timm
from torch import nn

from .errors import ConfigError
from .resunet import ResUNet

ATTENTIONS = ("scse",)
# Shown when an encoder name is wrong; a test checks that each is accepted.
EXAMPLE_ENCODERS = ("resnet18", "resnet34", "resnet50", "efficientnet-b0", "mobilenet_v2",
                    "mit_b0", "tu-convnext_tiny")


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


