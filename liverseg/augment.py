"""Random flips, rotations, zooms and intensity changes applied to whole batches on the
batch's own device, so augmentation never becomes the data loader's bottleneck."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the settings live with the other configs, which must not import torch (`--help`)
from liverseg.config import AugmentConfig

# One value for building the grid and for both resamplings: a grid built under one
# convention and sampled under the other shifts the mask against the image (up to half a
# pixel). False treats pixels as squares tiling [-1, 1], so flips and 90° turns map pixel
# centres onto pixel centres.
_ALIGN_CORNERS = False


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _chance(p: float, n: int, generator: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def affine_matrix(angle_deg: torch.Tensor, zoom: torch.Tensor, flip_lr: torch.Tensor,
                  flip_ud: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """(B, 2, 3) `F.affine_grid` matrices: flip, then rotate by `angle_deg` about the centre,
    then enlarge the content by `zoom`; all arguments are (B,) tensors, flips boolean.

    A positive angle turns the picture the way ``torch.rot90(x, 1, dims=(-2, -1))`` does.
    `aspect` is height / width: the rotation is done in pixel units, so a disk stays a disk
    on a non-square image.
    """
    angle = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    sign_x = 1.0 - 2.0 * flip_lr.to(cos.dtype)
    sign_y = 1.0 - 2.0 * flip_ud.to(cos.dtype)
    zero = torch.zeros_like(cos)
    # affine_grid maps output coordinates to input coordinates, so dividing by the zoom
    # enlarges the content, and the picture's first operation (the flip) is the matrix's
    # left factor: theta = flip @ rotation. Normalised x spans the width and y the height,
    # hence `aspect`.
    return torch.stack([
        torch.stack([cos * sign_x, -sin * aspect * sign_x, zero], dim=-1),
        torch.stack([sin / aspect * sign_y, cos * sign_y, zero], dim=-1),
    ], dim=-2)


def random_affine(config: AugmentConfig, batch: int, height: int, width: int,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """One random (2, 3) affine per sample, drawn from `config`'s flip, rotation and zoom."""
    device = torch.device(device)
    angle = _uniform(-config.rotate_deg, config.rotate_deg, batch, generator, device)
    zoom = _uniform(*config.scale, batch, generator, device)
    flip_lr = _chance(config.flip_lr, batch, generator, device)
    flip_ud = _chance(config.flip_ud, batch, generator, device)
    return affine_matrix(angle, zoom, flip_lr, flip_ud, aspect=height / width)


def affine_warp(image: torch.Tensor, mask: torch.Tensor, theta: torch.Tensor,
                size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a (B, C, H, W) image bilinearly and its (B, H, W) mask by nearest neighbour
    on one shared grid; pixels from outside the field get image 0 (air) and mask 0. With
    `size` the output is size × size (see `window_theta`), else the input's H × W."""
    # in bf16 the grid coordinates near the edge of a 512 px image are off by up to 2 px
    work_dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    shape = list(image.shape) if size is None else [*image.shape[:2], size, size]
    grid = F.affine_grid(theta.to(work_dtype), shape, align_corners=_ALIGN_CORNERS)
    warped = F.grid_sample(image.to(work_dtype), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=_ALIGN_CORNERS)
    # labels 0..2 are exact in any float type, and nearest sampling never mixes them
    labels = F.grid_sample(mask[:, None].to(work_dtype), grid, mode="nearest",
                           padding_mode="zeros", align_corners=_ALIGN_CORNERS)
    return warped.to(image.dtype), labels[:, 0].to(mask.dtype)


def _where_sample(chosen: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample: `a` where `chosen` (B,) is true, else `b`."""
    return torch.where(chosen.view(-1, *([1] * (a.dim() - 1))), a, b)


def random_flips(config: AugmentConfig, image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip samples by indexing: exact, and cheaper than resampling when nothing else moves."""
    batch = image.shape[0]
    flip_lr = _chance(config.flip_lr, batch, generator, image.device)
    flip_ud = _chance(config.flip_ud, batch, generator, image.device)
    if config.flip_lr > 0:
        image = _where_sample(flip_lr, image.flip(-1), image)
        mask = _where_sample(flip_lr, mask.flip(-1), mask)
    if config.flip_ud > 0:
        image = _where_sample(flip_ud, image.flip(-2), image)
        mask = _where_sample(flip_ud, mask.flip(-2), mask)
    return image, mask


def random_intensity(config: AugmentConfig, image: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample gain and offset, then Gaussian noise, clamped to [0, 1].

    Gain and offset are shared by a sample's channels (neighbouring slices of one scan);
    the noise is drawn per voxel, as CT noise is.
    """
    batch, device = image.shape[0], image.device
    shape = (batch, 1, 1, 1)
    gain = _uniform(*config.intensity_scale, batch, generator, device).view(shape)
    offset = _uniform(-config.intensity_shift, config.intensity_shift, batch, generator,
                      device).view(shape)
    image = image * gain.to(image.dtype) + offset.to(image.dtype)
    if config.noise_std > 0:
        image = image + config.noise_std * torch.randn_like(image, generator=generator)
    return image.clamp(0.0, 1.0)


class BatchAugment:
    """Augment a batch on its device: ``image, mask = BatchAugment(AugmentConfig())(image, mask)``.

    `image` is (B, C, H, W) float in [0, 1], `mask` (B, H, W) with labels 0/1/2. Every
    sample gets its own random flip/rotation/zoom (one affine, one resampling) and
    intensity change. Outputs keep the inputs' dtypes and memory format (channels_last
    stays channels_last). A `generator` (on the tensors' device) makes the result
    reproducible; an identity config returns the inputs themselves.
    """

    def __init__(self, config: AugmentConfig = AugmentConfig()):
        self.config = config

    def __repr__(self) -> str:
        return f"BatchAugment({self.config})"

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if image.dim() != 4 or mask.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(f"expected image (B, C, H, W) and mask (B, H, W), "
                             f"got {tuple(image.shape)} and {tuple(mask.shape)}")
        config = self.config
        if config.identity:
            return image, mask
        batch, _, height, width = image.shape
        if config.crop and (config.crop > height or config.crop > width):
            raise ValueError(f"augment crop {config.crop} is larger than the {height}x{width} slices")
        chosen = _chance(config.p, batch, generator, image.device) if 0 < config.p < 1 else None
        if config.p == 0:
            return random_crop(config.crop, image, mask, generator, config.crop_foreground)
        if config.crop and not config.flips_only:
            return self._warp_window(image, mask, chosen, generator)
        out_image, out_mask = image, mask
        if config.flips_only:
            out_image, out_mask = random_flips(config, out_image, out_mask, generator)
        elif config.geometric:
            theta = random_affine(config, batch, height, width, generator, image.device)
            out_image, out_mask = affine_warp(out_image, out_mask, theta)
            # bilinear weights sum to 1 only up to rounding
            out_image = out_image.clamp(0.0, 1.0)
        if config.photometric:
            out_image = random_intensity(config, out_image, generator)
        if chosen is not None:
            out_image = _where_sample(chosen, out_image, image)
            out_mask = _where_sample(chosen, out_mask, mask)
        if config.crop:
            out_image, out_mask = random_crop(config.crop, out_image, out_mask, generator,
                                              config.crop_foreground)
        return _like(out_image, image), out_mask

    def _warp_window(self, image: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor | None,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation/zoom and crop in one resampling that computes only the window's pixels:
        the same pixels as warping the whole slice and then cutting the window out, at the
        window's cost (a 128² window of a 256² slice: about 5x cheaper on a CPU core)."""
        config = self.config
        batch, _, height, width = image.shape
        theta = random_affine(config, batch, height, width, generator, image.device)
        if chosen is not None:  # samples left alone get the identity, and their exact window below
            identity = torch.eye(2, 3, dtype=theta.dtype, device=theta.device).expand_as(theta)
            theta = _where_sample(chosen, theta, identity)
        top, left = window_origin(config.crop, mask, generator, config.crop_foreground, theta)
        out_image, out_mask = affine_warp(image, mask, window_theta(theta, top, left, config.crop, height, width),
                                          size=config.crop)
        out_image = out_image.clamp(0.0, 1.0)  # bilinear weights sum to 1 only up to rounding
        if config.photometric:
            out_image = random_intensity(config, out_image, generator)
        if chosen is not None:
            plain_image, plain_mask = take_window(config.crop, image, mask, top, left)
            out_image = _where_sample(chosen, out_image, plain_image.to(out_image.dtype))
            out_mask = _where_sample(chosen, out_mask, plain_mask)
        return _like(out_image.contiguous(), image), out_mask


def random_crop(size: int, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
                foreground: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A size × size window of each sample (B, C, H, W) / (B, H, W), each at its own
    uniformly drawn position; ``size`` 0 returns the input. With chance ``foreground`` a
    sample's window instead holds a random pixel of its highest label (tumour, else
    liver, else any) at a uniformly drawn place in the window's middle half."""
    if not size:
        return image, mask
    top, left = window_origin(size, mask, generator, foreground)
    return take_window(size, image, mask, top, left)


def window_origin(size: int, mask: torch.Tensor, generator: torch.Generator | None = None,
                  foreground: float = 0.0, theta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's window corner (top, left), as `random_crop` places it. With `theta`
    the windows are of the slices warped by it (`affine_warp`): a foreground pixel is
    picked in `mask` and followed to where the warp puts it."""
    batch, height, width = mask.shape
    device = mask.device
    top = (torch.rand(batch, generator=generator, device=device) * (height - size + 1)).long()
    left = (torch.rand(batch, generator=generator, device=device) * (width - size + 1)).long()
    if foreground > 0:
        # a random pixel among those of the sample's highest label: noise in [0, 1) breaks
        # ties, the label (0, 1, 2) dominates it
        score = torch.rand(mask.shape, generator=generator, device=device) + mask.float()
        pixel = score.view(batch, -1).argmax(dim=1)
        row, col = pixel // width, pixel % width
        if theta is not None:
            row, col = warped_position(theta, row, col, height, width)
        offset = ((0.25 + 0.5 * torch.rand(batch, 2, generator=generator, device=device)) * size).long()
        centred_top = (row - offset[:, 0]).clamp(0, height - size)
        centred_left = (col - offset[:, 1]).clamp(0, width - size)
        chosen = _chance(foreground, batch, generator, device)
        top = torch.where(chosen, centred_top, top)
        left = torch.where(chosen, centred_left, left)
    return top, left


def warped_position(theta: torch.Tensor, row: torch.Tensor, col: torch.Tensor, height: int,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `affine_warp` with `theta` moves input pixels (row, col), rounded to pixels."""
    # theta maps output to input coordinates (normalised, pixels as squares tiling
    # [-1, 1]); the inverse of its 2x2 part (a flip and a turn over a zoom, never
    # singular) maps back, written out: torch.linalg.solve would wait for the GPU to
    # check for singular matrices
    x = (2 * col.to(theta.dtype) + 1) / width - 1 - theta[:, 0, 2]
    y = (2 * row.to(theta.dtype) + 1) / height - 1 - theta[:, 1, 2]
    a, b, c, d = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    det = a * d - b * c
    target_x, target_y = (d * x - b * y) / det, (a * y - c * x) / det
    return ((target_y + 1) * height - 1).div(2).round().long(), ((target_x + 1) * width - 1).div(2).round().long()


def window_theta(theta: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, height: int,
                 width: int) -> torch.Tensor:
    """The (B, 2, 3) affine that resamples only the size × size window at (top, left) of
    the height × width output of `theta`: normalised window coordinates are first mapped
    to the whole output's, then through `theta`."""
    scale_x, scale_y = size / width, size / height
    shift_x = (2 * left.to(theta.dtype) + size) / width - 1
    shift_y = (2 * top.to(theta.dtype) + size) / height - 1
    return torch.stack([theta[:, :, 0] * scale_x, theta[:, :, 1] * scale_y,
                        theta[:, :, 0] * shift_x[:, None] + theta[:, :, 1] * shift_y[:, None] + theta[:, :, 2]],
                       dim=-1)


def take_window(size: int, image: torch.Tensor, mask: torch.Tensor, top: torch.Tensor,
                left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The size × size windows at (top, left) of (B, C, H, W) images and (B, H, W) masks."""
    device = image.device
    steps = torch.arange(size, device=device)
    rows = (top[:, None] + steps)[:, :, None]  # (B, size, 1)
    cols = (left[:, None] + steps)[:, None, :]  # (B, 1, size)
    samples = torch.arange(image.shape[0], device=device)[:, None, None]
    crop_image = image.permute(0, 2, 3, 1)[samples, rows, cols].permute(0, 3, 1, 2)  # channels_last
    if image.is_contiguous():  # keep the input's memory format
        crop_image = crop_image.contiguous()
    return crop_image, mask[samples, rows, cols]


def _like(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    # channels_last is worth 2.3x on an H100 (DESIGN.md); do not silently drop it
    if reference.is_contiguous(memory_format=torch.channels_last) and not reference.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out
