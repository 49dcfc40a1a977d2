"""BatchAugment: exact identity and flips, agreement with torch.rot90, image/mask
registration, value ranges, determinism, channels_last and the config's checks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from liverseg.augment import AugmentConfig, BatchAugment, affine_matrix, affine_warp, take_window, window_theta
from liverseg.errors import ConfigError

SIZE = 64
OFF = dict(flip_lr=0.0, flip_ud=0.0, rotate_deg=0.0, scale=(1.0, 1.0), intensity_shift=0.0,
           intensity_scale=(1.0, 1.0), noise_std=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def only(**changes) -> AugmentConfig:
    """Every transform off except `changes`."""
    return AugmentConfig(**{**OFF, **changes})


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(batch: int = 2, channels: int = 3, height: int = SIZE, width: int = SIZE,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = seeded(seed)
    image = torch.rand(batch, channels, height, width, generator=generator)
    mask = torch.randint(0, 3, (batch, height, width), generator=generator)
    return image, mask


def phantom_batch(batch: int = 4, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A liver ellipse with a tumour off to the left, and an image whose intensity is its
    label / 2: tumour 1.0, liver 0.5, background 0. Nothing about it is symmetric."""
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32),
                            torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    mask = torch.zeros(SIZE, SIZE, dtype=torch.long)
    mask[((yy - 30) / 18) ** 2 + ((xx - 26) / 22) ** 2 < 1] = 1
    mask[(yy - 32) ** 2 + (xx - 16) ** 2 < 8 ** 2] = 2
    mask = mask.expand(batch, SIZE, SIZE).clone()
    image = (mask.float() / 2)[:, None].expand(batch, channels, SIZE, SIZE).clone()
    return image, mask


# --------------------------------------------------------------------------- exact cases

@pytest.mark.parametrize("config", [
    only(),
    AugmentConfig(p=0.0),
], ids=["everything off", "p=0"])
def test_identity_config_returns_inputs_exactly(config):
    image, mask = random_batch()
    out_image, out_mask = BatchAugment(config)(image, mask, seeded())
    assert torch.equal(out_image, image) and torch.equal(out_mask, mask)


@pytest.mark.parametrize("changes, dims", [
    (dict(flip_lr=1.0), [-1]),
    (dict(flip_ud=1.0), [-2]),
    (dict(flip_lr=1.0, flip_ud=1.0), [-2, -1]),
], ids=["left-right", "up-down", "both"])
def test_certain_flip_equals_torch_flip_exactly(changes, dims):
    image, mask = random_batch()
    out_image, out_mask = BatchAugment(only(**changes))(image, mask, seeded())
    assert torch.equal(out_image, torch.flip(image, dims=dims))
    assert torch.equal(out_mask, torch.flip(mask, dims=dims))


def test_p_leaves_unchosen_samples_exactly_unchanged():
    image, mask = random_batch(batch=8)
    out_image, out_mask = BatchAugment(AugmentConfig(p=0.5))(image, mask, seeded(1))
    unchanged = [torch.equal(out_image[i], image[i]) and torch.equal(out_mask[i], mask[i])
                 for i in range(8)]
    assert 0 < sum(unchanged) < 8


# --------------------------------------------------------------------------- the affine

def rot(k):
    return lambda x: torch.rot90(x, k, dims=(-2, -1))


@pytest.mark.parametrize("angle, flip_lr, flip_ud, reference", [
    (90.0, False, False, rot(1)),
    (-90.0, False, False, rot(-1)),
    (180.0, False, False, rot(2)),
    (0.0, True, False, lambda x: x.flip(-1)),
    (0.0, False, True, lambda x: x.flip(-2)),
    (90.0, True, False, lambda x: rot(1)(x.flip(-1))),  # flip first, then turn
], ids=["rot+90", "rot-90", "rot180", "flip-lr", "flip-ud", "flip-lr-then-rot90"])
def test_affine_warp_matches_exact_transform(angle, flip_lr, flip_ud, reference):
    image, mask = random_batch()
    theta = affine_matrix(torch.full((2,), angle), torch.ones(2), torch.full((2,), flip_lr),
                          torch.full((2,), flip_ud))
    out_image, out_mask = affine_warp(image, mask, theta)
    assert torch.equal(out_mask, reference(mask))
    torch.testing.assert_close(out_image, reference(image), atol=1e-5, rtol=0)


@pytest.mark.parametrize("angle", [30.0, 90.0])
def test_rotation_keeps_a_disk_round_on_a_non_square_image(angle):
    height, width = 32, 64
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disk = ((yy - 15.5) ** 2 + (xx - 31.5) ** 2 < 12 ** 2).long()[None]
    theta = affine_matrix(torch.tensor([angle]), torch.ones(1), torch.zeros(1, dtype=torch.bool),
                          torch.zeros(1, dtype=torch.bool), aspect=height / width)
    _, turned = affine_warp(disk[:, None].float(), disk, theta)
    # only rim pixels may change; an unequal x/y scaling would squash the disk into an ellipse
    assert (turned != disk).sum() < 0.1 * disk.sum()


def test_zoom_out_fills_the_border_with_air_and_background():
    image = torch.ones(2, 1, SIZE, SIZE)
    mask = torch.full((2, SIZE, SIZE), 2)
    out_image, out_mask = BatchAugment(only(scale=(0.5, 0.5)))(image, mask, seeded())
    corner, centre = (slice(None), slice(0, 8), slice(0, 8)), (slice(None), slice(28, 36), slice(28, 36))
    assert (out_mask[corner] == 0).all() and (out_image[:, 0][corner] == 0).all()
    assert (out_mask[centre] == 2).all() and (out_image[:, 0][centre] == 1).all()


# --------------------------------------------------------------------------- random batches

STRONG = AugmentConfig(flip_lr=0.5, flip_ud=0.5, rotate_deg=45.0, scale=(0.7, 1.3),
                       intensity_shift=0.3, intensity_scale=(0.5, 2.0), noise_std=0.2)


@pytest.mark.parametrize("config", [AugmentConfig(), STRONG], ids=["default", "strong"])
def test_mask_stays_long_labels_and_image_stays_in_unit_range(config):
    image, mask = random_batch(batch=4)
    image[:, :, :4], image[:, :, -4:] = 0.0, 1.0  # the extremes are present to push past
    out_image, out_mask = BatchAugment(config)(image, mask, seeded())
    assert out_mask.dtype == torch.long and set(out_mask.unique().tolist()) <= {0, 1, 2}
    assert out_image.dtype == image.dtype and out_image.shape == image.shape
    assert out_image.min() >= 0.0 and out_image.max() <= 1.0


def tumour_registered(image: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of tumour-labelled pixels whose (label / 2) image is closer to 1 than to 0.5."""
    tumour = (mask == 2)[:, None].expand_as(image)
    return (image[tumour] > 0.75).float().mean().item()


def labels_agree(image: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of all pixels whose (label / 2) image is nearer their own label than another."""
    return ((image - mask[:, None] / 2).abs() < 0.25).float().mean().item()


@pytest.mark.parametrize("changes", [
    dict(flip_lr=0.5, flip_ud=0.5),
    dict(rotate_deg=30.0),
    dict(scale=(0.8, 1.25)),
    dict(flip_lr=0.5, flip_ud=0.5, rotate_deg=30.0, scale=(0.8, 1.25)),
], ids=["flips", "rotation", "zoom", "all"])
def test_mask_stays_registered_to_image(changes):
    image, mask = phantom_batch()
    out_image, out_mask = BatchAugment(only(**changes))(image, mask, seeded(3))
    assert not torch.equal(out_mask, mask)  # something moved
    assert tumour_registered(out_image, out_mask) >= 0.95
    # only rim pixels may disagree: ≥ 99.6 % here, while a half-pixel shift between the
    # two (align_corners differing between image and mask) leaves ≤ 99.0 %
    assert labels_agree(out_image, out_mask) >= 0.994
    # the check can fail: a mask mirrored relative to its image is caught
    assert tumour_registered(out_image, out_mask.flip(-1)) < 0.5


def test_intensity_change_is_shared_by_a_samples_channels():
    image, mask = random_batch(batch=4, channels=1)
    image = image.expand(4, 3, SIZE, SIZE).contiguous()
    config = only(intensity_shift=0.1, intensity_scale=(0.8, 1.2))
    out_image, _ = BatchAugment(config)(image, mask, seeded())
    assert torch.equal(out_image[:, 0], out_image[:, 1]) and torch.equal(out_image[:, 0], out_image[:, 2])
    gains = (out_image[:, 0] / image[:, 0].clamp(min=0.5))[:, 10, 10]
    assert not torch.allclose(gains, gains[0].expand(4))  # but differs between samples


def test_same_seed_same_output_different_seed_different_output():
    image, mask = random_batch(batch=4)
    augment = BatchAugment(AugmentConfig())
    first, again, other = (augment(image, mask, seeded(seed)) for seed in (7, 7, 8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_channels_last_input_gives_the_same_channels_last_output():
    image, mask = random_batch(batch=2, channels=3)
    augment = BatchAugment(STRONG)
    plain = augment(image, mask, seeded())
    last = augment(image.contiguous(memory_format=torch.channels_last), mask, seeded())
    assert last[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last[0], plain[0])
    assert torch.equal(last[1], plain[1])


def test_half_precision_image_keeps_its_dtype():
    image, mask = random_batch()
    out_image, out_mask = BatchAugment(STRONG)(image.to(torch.bfloat16), mask, seeded())
    assert out_image.dtype == torch.bfloat16 and out_mask.dtype == torch.long


def test_no_autograd_graph_is_built():
    image, mask = random_batch()
    out_image, _ = BatchAugment(STRONG)(image.requires_grad_(), mask, seeded())
    assert not out_image.requires_grad


# --------------------------------------------------------------------------- the config

@pytest.mark.parametrize("changes", [
    dict(flip_lr=1.5), dict(flip_ud=-0.1), dict(p=2.0), dict(rotate_deg=-5.0),
    dict(noise_std=-0.1), dict(intensity_shift=-0.1), dict(scale=(1.1, 0.9)),
    dict(scale=(0.0, 1.0)), dict(intensity_scale=(1.0,)), dict(scale=1.1), dict(crop=48), dict(crop=-32),
    dict(crop_foreground=1.5),
], ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()))
def test_bad_config_is_a_config_error(changes):
    with pytest.raises(ConfigError, match=next(iter(changes))):
        AugmentConfig(**changes)


def test_config_round_trips_through_json():
    config = AugmentConfig(rotate_deg=15.0, scale=(0.8, 1.2))
    assert AugmentConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_wrong_shapes_are_rejected():
    image, mask = random_batch()
    with pytest.raises(ValueError, match="mask"):
        BatchAugment()(image, mask[:, :-1])


# --------------------------------------------------------------------------- crops

@pytest.mark.parametrize("config", [only(crop=32), AugmentConfig(crop=32), AugmentConfig(crop=32, p=0.0)],
                         ids=["crop only", "crop after the default transforms", "p=0 still crops"])
def test_crop_gives_windows_registered_to_their_masks(config):
    image, mask = phantom_batch(batch=8)
    out_image, out_mask = BatchAugment(config)(image, mask, seeded(5))
    assert out_image.shape == (8, 3, 32, 32) and out_mask.shape == (8, 32, 32)
    assert labels_agree(out_image, out_mask) >= 0.99
    if config == only(crop=32):  # exact windows of the input, not all at the same place
        corners = set()
        for i in range(8):
            hits = [(r, c) for r in range(SIZE - 31) for c in range(SIZE - 31)
                    if torch.equal(mask[i, r:r + 32, c:c + 32], out_mask[i])
                    and torch.equal(image[i, :, r:r + 32, c:c + 32], out_image[i])]
            assert hits, i
            corners.add(hits[0])
        assert len(corners) > 1


def test_crop_keeps_channels_last_and_refuses_a_window_larger_than_the_slice():
    image, mask = random_batch(batch=2, channels=3)
    out_image, _ = BatchAugment(only(crop=32))(image.contiguous(memory_format=torch.channels_last), mask, seeded())
    assert out_image.is_contiguous(memory_format=torch.channels_last)
    assert BatchAugment(only(crop=32))(image, mask, seeded())[0].is_contiguous()
    with pytest.raises(ValueError, match="crop 96"):
        BatchAugment(only(crop=96))(image, mask)


def small_objects(batch: int = 6) -> torch.Tensor:
    """Masks with a 3x3 tumour (samples 0, 3), a 4x4 liver patch only (1, 4) or nothing
    (2, 5), each in a corner region a uniform 32 px window misses most of the time."""
    mask = torch.zeros(batch, SIZE, SIZE, dtype=torch.uint8)
    for i in range(batch):
        if i % 3 == 0:
            mask[i, 58:61, 2:5] = 2
            mask[i, 2:6, 58:62] = 1  # liver elsewhere: the tumour must win
        elif i % 3 == 1:
            mask[i, 2:6, 2:6] = 1
    return mask


def test_foreground_crop_puts_the_tumour_else_the_liver_in_every_window():
    mask = small_objects()
    image = mask[:, None].float().repeat(1, 3, 1, 1)
    for seed in range(10):
        out_image, out_mask = BatchAugment(only(crop=32, crop_foreground=1.0))(image, mask, seeded(seed))
        assert torch.equal(out_image[:, 0].to(torch.uint8), out_mask)  # still registered
        for i in range(len(mask)):
            expected = {0: 2, 1: 1, 2: 0}[i % 3]
            assert int(out_mask[i].max()) == expected, (seed, i)
            if expected:  # the whole 3x3 / 4x4 object: it lies in the window's middle half
                assert int((out_mask[i] == expected).sum()) == int((mask[i] == expected).sum()), (seed, i)


def test_foreground_crop_chance_is_per_sample_and_zero_is_the_uniform_window():
    mask = small_objects(batch=300)
    image = mask[:, None].float()
    _, out_mask = BatchAugment(only(crop=32, crop_foreground=0.5))(image, mask, seeded(1))
    tumour_seen = (out_mask[::3] == 2).flatten(1).any(1).float().mean().item()
    uniform_seen = 6 / 33 * 5 / 33  # a uniform window shows rows 58-60 for 6 of 33 tops, cols 2-4 for 5 lefts
    assert 0.35 < tumour_seen < 0.7, tumour_seen  # about 0.5 + 0.5 * uniform_seen
    plain = BatchAugment(only(crop=32))(image, mask, seeded(1))
    zero = BatchAugment(only(crop=32, crop_foreground=0.0))(image, mask, seeded(1))
    assert torch.equal(plain[1], zero[1]) and torch.equal(plain[0], zero[0])
    assert (plain[1][::3] == 2).flatten(1).any(1).float().mean().item() < 0.1 + uniform_seen


def test_a_warped_window_is_the_window_of_the_warped_slice():
    image, mask = random_batch(batch=6, channels=3, height=SIZE, width=48, seed=3)
    theta = affine_matrix(torch.tensor([0.0, 7.0, -9.5, 30.0, 3.0, 0.0]),
                          torch.tensor([1.0, 0.9, 1.1, 1.05, 0.95, 1.0]),
                          torch.tensor([False, False, True, False, True, False]),
                          torch.tensor([False, True, False, False, False, False]), aspect=SIZE / 48)
    top, left = torch.tensor([0, 32, 5, 17, 32, 9]), torch.tensor([0, 16, 3, 16, 0, 7])
    whole_image, whole_mask = affine_warp(image, mask, theta)
    expected_image, expected_mask = take_window(32, whole_image, whole_mask, top, left)
    window_image, window_mask = affine_warp(image, mask, window_theta(theta, top, left, 32, SIZE, 48), size=32)
    assert window_image.shape == (6, 3, 32, 32)
    assert torch.allclose(window_image, expected_image, atol=1e-5)
    assert (window_mask == expected_mask).float().mean() > 0.999  # nearest ties may round apart
    # the identity's window is the plain window, exactly
    assert torch.equal(window_mask[0], mask[0, :32, :32])


def test_foreground_windows_follow_the_tumour_through_rotation_and_zoom():
    mask = torch.zeros(24, SIZE, SIZE, dtype=torch.long)
    mask[:, 10:40, 8:50] = 1
    mask[:, 44:47, 22:25] = 2  # a 3x3 tumour 16 px from the centre: turned, it stays clear of the edges
    image = mask[:, None].float().repeat(1, 3, 1, 1) / 2
    config = only(crop=32, crop_foreground=1.0, rotate_deg=45.0, scale=(0.9, 1.1))
    for seed in range(3):
        out_image, out_mask = BatchAugment(config)(image, mask, seeded(seed))
        assert out_mask.shape == (24, 32, 32)
        assert labels_agree(out_image, out_mask) >= 0.95
        for i in range(24):  # the tumour lies in the window's middle half (give or take a pixel)
            rows, cols = (out_mask[i] == 2).nonzero(as_tuple=True)
            assert len(rows), (seed, i)
            assert 8 - 4 <= rows.float().mean() <= 24 + 4 and 8 - 4 <= cols.float().mean() <= 24 + 4, (seed, i)
    uniform = BatchAugment(only(crop=32, rotate_deg=45.0))(image, mask, seeded(0))[1]
    assert (uniform == 2).flatten(1).any(1).float().mean() < 0.8  # the choice of window is what finds it
