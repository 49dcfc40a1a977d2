"""ResUNet: a deep residual U-Net decoder (Zhang, Liu & Wang 2018) on any depth-5 smp
encoder, built by name through the registry in ``liverseg.models``."""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 32  # five ×2 downsamplings in every depth-5 encoder


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
    if height % STRIDE or width % STRIDE:
        raise ValueError(f"ResUNet input height and width must be divisible by {STRIDE}, "
                         f"got {height}×{width}")
