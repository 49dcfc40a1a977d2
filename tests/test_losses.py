"""DiceCELoss: hand-computed values, perfect predictions, absent classes, gradients, autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from liverseg.errors import ConfigError
from liverseg.losses import DiceCELoss, batch_dice_loss

# Two 2×2 images, three classes. Every pixel's predicted distribution puts 0.5 on one
# class and 0.25 on each of the others.
TARGET = torch.tensor([[[0, 1], [1, 2]],
                       [[0, 0], [1, 0]]])
PREDICTED = torch.tensor([[[0, 1], [2, 2]],
                          [[0, 1], [1, 0]]])
# Per class, summed over both images (I = Σ p·t, P = Σ p, T = Σ t):
#   class 0: I = .5 + .5 + .25 + .5 = 1.75   P = 3·.5 + 5·.25 = 2.75   T = 4   Dice = 3.5 / 6.75 = 14/27
#   class 1: I = .5 + .25 + .5 = 1.25        P = 3·.5 + 5·.25 = 2.75   T = 3   Dice = 2.5 / 5.75 = 10/23
#   class 2: I = .5                          P = 2·.5 + 6·.25 = 2.5    T = 1   Dice = 1 / 3.5    = 2/7
# Cross-entropy: 6 pixels get p = 1/2 for their class, 2 get 1/4: (6 ln 2 + 2 ln 4) / 8.
DICE_FOREGROUND = 1 - (10 / 23 + 2 / 7) / 2
DICE_ALL = 1 - (14 / 27 + 10 / 23 + 2 / 7) / 3
CE = 1.25 * math.log(2)
# Class weights (1, 2, 4): targets weigh 1,2,2,4 and 1,1,2,1 (Σ 14); weighted −log p in
# units of ln 2 sum to (1 + 2 + 2·2 + 4) + (1 + 1·2 + 2 + 1) = 17.
CE_WEIGHTED = 17 / 14 * math.log(2)


def hand_logits() -> torch.Tensor:
    probs = torch.full((2, 3, 2, 2), 0.25)
    probs.scatter_(1, PREDICTED[:, None], 0.5)
    return probs.log()  # softmax(log p) = p when p sums to 1


@pytest.mark.parametrize("settings, expected", [
    (dict(ce_weight=0.0), DICE_FOREGROUND),
    (dict(ce_weight=0.0, include_background=True), DICE_ALL),
    (dict(dice_weight=0.0), CE),
    (dict(dice_weight=0.0, class_weights=(1.0, 2.0, 4.0)), CE_WEIGHTED),
    (dict(dice_weight=0.5, ce_weight=2.0), 0.5 * DICE_FOREGROUND + 2.0 * CE),
], ids=["dice", "dice with background", "cross-entropy", "weighted cross-entropy",
        "weighted sum"])
def test_hand_computed_example(settings, expected):
    loss = DiceCELoss(smooth=1e-9, **settings)(hand_logits(), TARGET)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def random_target(seed: int = 0, batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 3, (batch, size, size), generator=torch.Generator().manual_seed(seed))


def confident_logits(labels: torch.Tensor, magnitude: float = 50.0) -> torch.Tensor:
    return magnitude * F.one_hot(labels, 3).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("include_background", [False, True])
def test_perfect_prediction_gives_zero_loss(include_background):
    target = random_target()
    settings = dict(include_background=include_background)
    logits = confident_logits(target)
    assert DiceCELoss(ce_weight=0.0, **settings)(logits, target).item() < 1e-5
    assert DiceCELoss(**settings)(logits, target).item() < 1e-5


def test_confidently_wrong_prediction_gives_dice_loss_near_one():
    target = random_target()
    loss = DiceCELoss(ce_weight=0.0)(confident_logits((target + 1) % 3), target)
    assert loss.item() > 0.99


def test_dice_sums_over_the_batch_before_dividing():
    # image 0: liver with a 2×2 tumour, predicted exactly. image 1: all liver, no tumour;
    # 4 pixels predict (0, .75, .25). Batch sums: liver I = P = 12 + 12 + 3 = 27, T = 28;
    # tumour I = 4, P = 4 + 1, T = 4. Per-image Dice would instead score image 1's tumour 0
    # and pull the mean down to ~0.5.
    target = torch.ones(2, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 2
    probs = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    probs[1, :, 2:, 2:] = torch.tensor([0.0, 0.75, 0.25]).view(3, 1, 1)
    loss = batch_dice_loss(probs.log(), target, smooth=1e-9)
    assert loss.item() == pytest.approx(1 - (54 / 55 + 8 / 9) / 2, abs=1e-6)


@pytest.mark.parametrize("tumour_logit", [-30.0, -1e4], ids=["small mass", "underflows to 0"])
@pytest.mark.parametrize("include_background", [False, True])
def test_class_absent_from_batch_and_prediction_gives_no_nan(tumour_logit, include_background):
    target = random_target() % 2  # no tumour anywhere
    logits = confident_logits(target, 10.0)
    logits[:, 2] = tumour_logit
    logits.requires_grad_()
    loss = DiceCELoss(include_background=include_background)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_gradient_flows_and_is_finite():
    target = random_target()
    logits = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1),
                         requires_grad=True)
    DiceCELoss()(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # and it points downhill: a small step against it lowers the loss
    with torch.no_grad():
        before = DiceCELoss()(logits, target)
        after = DiceCELoss()(logits - 0.5 * logits.grad / logits.grad.norm(), target)
    assert after < before


def test_bf16_autocast_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    image = torch.rand(2, 3, 32, 32)
    target = random_target(size=32)
    loss_fn = DiceCELoss()
    reference = loss_fn(model(image), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(image)
        loss = loss_fn(logits, target)
    assert logits.dtype == torch.bfloat16  # the test really feeds half-precision logits
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_class_weights_follow_the_module_and_stay_out_of_the_state_dict():
    loss_fn = DiceCELoss(dice_weight=0.0, class_weights=[1.0, 2.0, 4.0]).to(torch.float64)
    assert loss_fn.class_weights.dtype == torch.float64  # moved along with the module
    assert loss_fn(hand_logits(), TARGET).item() == pytest.approx(CE_WEIGHTED, abs=1e-6)
    assert "class_weights" not in loss_fn.state_dict()


@pytest.mark.parametrize("settings, match", [
    (dict(classes=1), "classes"),
    (dict(smooth=0.0), "smooth"),
    (dict(class_weights=(1.0, 2.0)), "class_weights"),
], ids=["one class", "zero smooth", "weights too short"])
def test_bad_settings_are_config_errors(settings, match):
    with pytest.raises(ConfigError, match=match):
        DiceCELoss(**settings)


def test_wrong_shapes_are_rejected():
    with pytest.raises(ValueError, match="logits"):
        DiceCELoss()(torch.zeros(2, 4, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))
