"""Evaluation: postprocessing and LiTS metrics of one case on one core, and whole-volume
inference against the bare model (docs/PERFORMANCE.md).

    python -m benchmarks.evaluation metrics             # 512x512x400 synthetic case, one core
    python -m benchmarks.evaluation metrics --slices 100 --size 128 --spacing 4 3 3
    python -m benchmarks.evaluation infer [--slices 400] [--batch-size 64]
    python -m benchmarks.evaluation infer --device cpu --slices 16 --batch-size 8 --encoder resnet18 --size 64
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import click
import numpy as np

from shardgen.preprocess import Preprocessing

from .common import machine

TESTS = Path(__file__).resolve().parents[1] / "tests"


@click.group()
def main() -> None:
    """Evaluation speed: metrics and inference (see docs/PERFORMANCE.md)."""


# --------------------------------------------------------------------------- metrics

def _ball(a: np.ndarray, centre_mm, radius_mm: float, spacing, value: int, within=None) -> None:
    """Paint an ellipsoid-in-voxels ball (centre and radius in mm) into ``a``."""
    sp = np.asarray(spacing, float)
    c = np.asarray(centre_mm, float) / sp
    lo = np.maximum(np.floor(c - radius_mm / sp).astype(int), 0)
    hi = np.minimum(np.ceil(c + radius_mm / sp).astype(int) + 1, a.shape)
    z, y, x = (np.arange(l, h) for l, h in zip(lo, hi))
    d2 = (((z[:, None, None] - c[0]) * sp[0]) ** 2 + ((y[None, :, None] - c[1]) * sp[1]) ** 2
          + ((x[None, None, :] - c[2]) * sp[2]) ** 2)
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    inside = d2 <= radius_mm ** 2
    if within is not None:
        inside &= within[box] != 0
    a[box][inside] = value


def _organ(shape, spacing, centre_mm, semi_mm, phases, shift_mm=(0, 0, 0), grow: float = 0.0) -> tuple:
    """Box and mask of a bumpy ellipsoid, deformed by low-frequency waves (one per phase)."""
    sp = np.asarray(spacing, float)
    lo = np.maximum(((np.asarray(centre_mm) - 1.3 * np.asarray(semi_mm)) / sp).astype(int), 0)
    hi = np.minimum(((np.asarray(centre_mm) + 1.3 * np.asarray(semi_mm)) / sp).astype(int), shape)
    z, y, x = (((np.arange(l, h) * s - c - d) / r).astype(np.float32)
               for l, h, s, c, d, r in zip(lo, hi, sp, centre_mm, shift_mm, semi_mm))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    p = phases
    f = z ** 2 + y ** 2 + x ** 2
    f -= 0.18 * np.sin(3.1 * z + p[0]) * np.cos(2.3 * y + p[1])
    f -= 0.15 * np.sin(2.7 * x + p[2]) * np.cos(1.9 * z + p[3])
    f -= 0.10 * np.cos(4.3 * y + p[4]) * np.sin(3.7 * x + p[5])
    return tuple(slice(l, h) for l, h in zip(lo, hi)), f < 1.0 + grow


# radius mm, centre as a fraction of the liver's semi-axes: inside it and 5 mm apart
LESIONS = ((3, (0.3, 0.3, -0.4)), (4, (-0.3, 0.45, 0.2)), (6, (0.1, -0.45, -0.3)), (9, (-0.25, -0.1, 0.4)),
           (12, (0.4, -0.15, 0.05)), (16, (-0.4, -0.1, -0.45)), (22, (0.0, 0.3, -0.1)))


def synthetic_eval_case(shape=(400, 512, 512), spacing=(1.0, 0.75, 0.75), seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference) uint8 labels of a liver with lesions; the prediction has a
    displaced boundary, holes, specks away from the liver, tiny tumour specks, a missed
    lesion and a false one."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    extent = np.asarray(shape) * sp
    centre, semi = extent * (0.5, 0.42, 0.36), np.array([60.0, 78.0, 95.0])
    phases = rng.uniform(0, 2 * np.pi, 6)
    ref, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    box, liver = _organ(shape, sp, centre, semi, phases)
    ref[box][liver] = 1
    box, liver = _organ(shape, sp, centre, semi, phases + 0.05, shift_mm=(1.0, 0.75, 1.5), grow=-0.02)
    pred[box][liver] = 1
    lesions = [(radius, centre + np.array(where) * semi) for radius, where in LESIONS]
    lesions.append((8, lesions[3][1] + (0, 0, 16)))  # overlaps the 9 mm lesion: one component
    for i, (radius, at) in enumerate(lesions):
        _ball(ref, at, radius, sp, 2, within=ref)
        if i != 1:  # the 4 mm lesion is missed
            _ball(pred, at + rng.normal(0, 1.0, 3), radius * rng.uniform(0.85, 1.1), sp, 2, within=pred)
    _ball(pred, centre + (10, -20, 30), 7, sp, 2, within=pred)  # a false lesion
    for _ in range(4):  # tiny tumour specks inside the liver, and holes
        _ball(pred, centre + rng.uniform(-0.4, 0.4, 3) * semi, 1.0, sp, 2, within=pred)
        _ball(pred, centre + rng.uniform(-0.4, 0.4, 3) * semi, 3.0, sp, 0)
    for value in (1, 1, 1, 1, 2):  # specks away from the liver
        _ball(pred, extent * rng.uniform((0.1, 0.1, 0.65), (0.9, 0.9, 0.9)), rng.uniform(2, 5), sp, value)
    return pred, ref


def scipy_postprocess(labels: np.ndarray, spacing: tuple) -> np.ndarray:
    """default_postprocess done plainly: scipy on the whole volume, no cropping."""
    from scipy import ndimage as ndi

    cube = np.ones((3, 3, 3), bool)
    components, _ = ndi.label(labels >= 1, structure=cube)
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    out = np.where(components == largest, labels, 0).astype(np.uint8)
    out[ndi.binary_fill_holes(out >= 1) & (out == 0)] = 1
    lesions, _ = ndi.label(out == 2, structure=cube)
    small = np.flatnonzero(np.bincount(lesions.ravel())[1:] * np.prod(spacing) < 10.0) + 1
    small_mask = np.isin(lesions, small)
    touching = np.unique(lesions[ndi.binary_dilation(out == 1, structure=cube) & small_mask])
    out[small_mask] = np.where(np.isin(lesions[small_mask], touching), 1, 0)
    return out


def monai_class_scores(pred: np.ndarray, ref: np.ndarray, spacing: tuple) -> dict[str, float]:
    """Overlap scores and MONAI's surface distances (edges of the whole volume): the
    implementation tests/test_lits.py checks liverseg.lits's distances against."""
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    tp, npred, nref = np.count_nonzero(pred & ref), np.count_nonzero(pred), np.count_nonzero(ref)
    edges_pred, edges_ref = get_mask_edges(pred, ref, crop=False)
    both = np.concatenate([get_surface_distance(edges_pred, edges_ref, spacing=spacing),
                           get_surface_distance(edges_ref, edges_pred, spacing=spacing)]).astype(float)
    return {"dice": 2 * tp / (npred + nref), "iou": tp / (npred + nref - tp), "rvd": (npred - nref) / nref,
            "assd": both.mean(), "mssd": both.max(), "hd95": np.percentile(both, 95)}


def naive_detection() -> Callable[[np.ndarray, np.ndarray, tuple], dict]:
    """The deliberately plain LiTS lesion rule (scipy labels, every pair of components
    tested, union-find) that tests/test_lits.py checks liverseg.lits against: the same
    reference, not a second one kept here."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from test_lits import naive_detection as detection

    return detection


def reference_scores(pred: np.ndarray, ref: np.ndarray, spacing: tuple) -> dict:
    detection = naive_detection()
    return {"liver": monai_class_scores(pred >= 1, ref >= 1, spacing),
            "tumour": monai_class_scores(pred == 2, ref == 2, spacing),
            "lesions": detection(pred == 2, ref == 2, spacing)}


def staged_runs(postprocess, score, pred: np.ndarray, ref: np.ndarray, spacing: tuple, repeat: int
                ) -> tuple[list[tuple[float, float]], dict]:
    """(postprocess s, scoring s) of each run and the last scores. Runs that allocate fresh
    memory pay ~0.3 s of page faults on the development VM, so ours is timed after a warm-up."""
    times, scores = [], {}
    for _ in range(repeat):
        start = time.perf_counter()
        post = postprocess(pred, spacing)
        middle = time.perf_counter()
        scores = score(post, ref, spacing)
        times.append((middle - start, time.perf_counter() - middle))
    return times, scores


def score_differences(ours: dict, other: dict) -> tuple[float, bool]:
    """Largest |difference| of the metrics both computed, and whether detection agrees."""
    diff = max(abs(ours[c][m] - other[c][m]) for c in ("liver", "tumour") for m in other[c])
    same = all(ours["lesions"][k] == other["lesions"][k] for k in ("tp", "fp", "fn"))
    return float(diff), same


@main.command()
@click.option("--slices", default=400, show_default=True)
@click.option("--size", default=512, show_default=True)
@click.option("--spacing", nargs=3, type=float, default=(1.0, 0.75, 0.75), show_default=True,
              help="z, y, x in mm.")
@click.option("--repeat", default=3, show_default=True,
              help="Timed runs of ours after one untimed (median reported).")
@click.option("--reference-repeat", default=1, show_default=True,
              help="Timed runs of the reference implementation (~45 s each at the default size).")
def metrics(slices: int, size: int, spacing: tuple[float, float, float], repeat: int,
            reference_repeat: int) -> None:
    """default_postprocess + lits.score_case on one synthetic case on ONE core, against a
    plain reference of the same (scipy without cropping, MONAI's edges and surface
    distances, the tests' naive lesion detection: scipy labels and a union-find)."""
    import torch
    from threadpoolctl import threadpool_limits

    from liverseg import lits
    from liverseg.postprocess import default_postprocess

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)  # MONAI imports torch; nothing here should use it
    pred, ref = synthetic_eval_case((slices, size, size), spacing)
    with threadpool_limits(1):
        (first, *ours_t), ours = staged_runs(default_postprocess(), lits.score_case, pred, ref, spacing,
                                             1 + repeat)
        other_t, other = staged_runs(scipy_postprocess, reference_scores, pred, ref, spacing,
                                     reference_repeat)
    print(f"# eval, {date.today()}, {machine()}, pinned to one core")
    print(f"# synthetic case {slices}x{size}x{size}, spacing {spacing} mm, liver "
          f"{np.count_nonzero(ref) * np.prod(spacing) / 1e6:.2f} L, {ours['lesions']['ref_lesions']} "
          f"reference lesions; median of {repeat} runs after a warm-up (ours), of "
          f"{reference_repeat} (reference)")
    print(f"{'implementation':<44} {'postprocess s':>14} {'metrics s':>10} {'total s':>8}  totals")
    for name, runs in (("ours (liverseg.postprocess + liverseg.lits)", ours_t),
                       ("reference (scipy uncropped, MONAI, naive)", other_t)):
        post, metric, total = np.median([[r[0], r[1], sum(r)] for r in runs], axis=0)
        totals = ", ".join(f"{sum(r):.3f}" for r in runs)
        print(f"{name:<44} {post:>14.3f} {metric:>10.3f} {total:>8.3f}  {totals}")
    mine, theirs = (float(np.median([sum(r) for r in runs])) for runs in (ours_t, other_t))
    diff, same = score_differences(ours, other)
    print(f"reference / ours: {theirs / mine:.1f}x; metrics agree to {diff:.2g}, detection "
          f"{'agrees' if same else 'DIFFERS'} (tp/fp/fn {ours['lesions']['tp']}/{ours['lesions']['fp']}/"
          f"{ours['lesions']['fn']}); ours' untimed first run: {sum(first):.3f} s")


# --------------------------------------------------------------------------- inference

@main.command()
@click.option("--slices", default=400, show_default=True, help="Depth of the synthetic volume.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--encoder", default="resnet34", show_default=True)
@click.option("--size", default=512, show_default=True, help="Network input size (the volume is 512x512).")
@click.option("--device", default="cuda", show_default=True, help="cpu only to check the script itself.")
@click.option("--tumour-probability", is_flag=True,
              help="Also bring back the tumour probability, as a chain with remove_unsure_lesions asks.")
def infer(slices: int, batch_size: int, encoder: str, size: int, device: str, tumour_probability: bool) -> None:
    """Whole-volume inference (liverseg.inference.predict_volume: windowing, resizing,
    2.5D stacking, autocast, softmax, labels back on the host) vs. the bare model on
    synthetic tensors already on the device, in one run. Target >= 90 %."""
    import torch

    from liverseg.inference import Member, predict_volume
    from liverseg.runtime import autocast_dtype
    from liverseg.models import create_model

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device here (use --device cpu only to test the script)")
    pre = Preprocessing(size=size, context=1)
    model = create_model("unet", encoder, pre.channels, 3).to(device, memory_format=torch.channels_last).eval()
    dtype = autocast_dtype(device)
    x = torch.rand(batch_size, pre.channels, size, size, device=device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def bare() -> float:
        rounds = max(1, slices // batch_size)
        for timed in (False, True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(rounds if timed else 1):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    model(x).float().softmax(1).argmax(1)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return rounds * batch_size / (time.perf_counter() - start)

    def whole() -> float:
        start = time.perf_counter()
        predict_volume([member], volume, (1.0, 0.8, 0.8), device, batch_size,  # labels on the host: synchronised
                       tumour_probability=tumour_probability)
        return slices / (time.perf_counter() - start)

    volume = np.random.default_rng(0).integers(-1000, 1000, (slices, 512, 512)).astype(np.int16)
    member = Member("unet", Path("."), model, pre)
    # warm-up on a whole volume: kernels chosen, and the pinned staging buffers allocated
    # once, as over an evaluation's many cases; then the median of three of each
    whole()
    wholes = sorted(whole() for _ in range(3))
    bares = sorted(bare() for _ in range(3))
    synthetic, whole_rate = bares[1], wholes[1]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# infer, {date.today()}, {name}, torch {torch.__version__}, unet {encoder}, "
          f"{size}x{size}x{pre.channels}, batch {batch_size}, {slices} slices"
          + (", with the tumour probability" if tumour_probability else ""))
    print(f"bare model on device tensors: {synthetic:.4g} slices/s; whole-volume inference: "
          f"{whole_rate:.4g} slices/s ({100 * whole_rate / synthetic:.0f} %); medians of 3 "
          f"(whole: {', '.join(f'{w:.4g}' for w in wholes)})")


if __name__ == "__main__":
    main()
