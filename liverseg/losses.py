"""Dice + cross-entropy loss for (B, K, H, W) segmentation logits, with the Dice taken over
the whole batch so slices without tumour do not each contribute a noisy 0/0 term."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from liverseg.errors import ConfigError


def one_hot_masks(target: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, H, W) labels → (B, K, H, W) boolean masks, one per class."""
    # a comparison rather than F.one_hot: no transpose, and no range check that would
    # read the labels back to the host on some devices
    labels = torch.arange(classes, device=target.device).view(1, classes, 1, 1)
    return target[:, None] == labels


def batch_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                    include_background: bool = False, smooth: float = 1e-5) -> torch.Tensor:
    """1 − mean over classes of soft Dice, each class's sums taken over batch and pixels.

    Computed in float32 whatever the logits' dtype: sums over a batch of 512² images
    overflow fp16 and lose every digit that matters in bf16.
    A class absent from both target and prediction scores (smooth)/(Σp + smooth): close to
    1 once the predicted probability mass is small, and never NaN because smooth > 0.
    """
    classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    truth = one_hot_masks(target, classes).to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * truth).sum(dims)
    total = probs.sum(dims) + truth.sum(dims)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    if not include_background:
        dice = dice[1:]
    return 1.0 - dice.mean()


class DiceCELoss(nn.Module):
    """``dice_weight * batch_dice_loss + ce_weight * cross_entropy``, a scalar.

    `class_weights` (one per class) weight the cross-entropy only; Dice already treats
    a small class like a large one. The background is left out of the Dice mean by
    default: it covers most pixels, so its Dice is near 1 and would only dilute the rest.
    """

    def __init__(self, classes: int = 3, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 include_background: bool = False, smooth: float = 1e-5,
                 class_weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        if classes < 2:
            raise ConfigError(f"DiceCELoss needs at least 2 classes, got {classes}")
        if smooth <= 0:
            # with smooth = 0 a class absent from target and prediction divides 0 by 0
            raise ConfigError(f"DiceCELoss smooth must be > 0, got {smooth}")
        if class_weights is not None and len(class_weights) != classes:
            raise ConfigError(f"DiceCELoss class_weights needs {classes} values, "
                              f"got {len(class_weights)}")
        self.classes = classes
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.smooth = smooth
        weights = (None if class_weights is None
                   else torch.as_tensor(class_weights, dtype=torch.float32))
        # a buffer follows the module to its device, and stays out of the optimiser
        self.register_buffer("class_weights", weights, persistent=False)

    def extra_repr(self) -> str:
        return (f"classes={self.classes}, dice_weight={self.dice_weight}, "
                f"ce_weight={self.ce_weight}, include_background={self.include_background}, "
                f"smooth={self.smooth}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or logits.shape[1] != self.classes or \
                target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"expected logits (B, {self.classes}, H, W) and target (B, H, W), "
                             f"got {tuple(logits.shape)} and {tuple(target.shape)}")
        # float32 stated here rather than left to each backend's autocast op lists
        weights = None if self.class_weights is None else self.class_weights.float()
        ce = F.cross_entropy(logits.float(), target, weight=weights)
        dice = batch_dice_loss(logits, target, self.include_background, self.smooth)
        return self.dice_weight * dice + self.ce_weight * ce
