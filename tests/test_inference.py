"""Whole-volume inference: predictions come back in the input's exact geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from liverseg import lits
from liverseg.errors import ConfigError
from liverseg.inference import (ENSEMBLE, Member, flips, load_members, member_name, predict_volume,
                                prediction_name, preprocess_torch, tta_note, write_labels)
from liverseg.checkpoint import ModelSpec, export_checkpoint
from liverseg.models import create_model
from shardgen.nifti import load_case, load_image
from shardgen.preprocess import Preprocessing, preprocess_image

from conftest import save_canonical

HU = {0: -100.0, 1: 150.0, 2: 400.0}  # 0, 0.5 and 1.0 after the default window


class Oracle(torch.nn.Module):
    """Labels read straight off the intensity of the centre channel: a stand-in for a
    perfect network, so any error left is the geometry's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
        levels = torch.tensor([0.0, 0.5, 1.0], device=x.device).view(1, 3, 1, 1)
        return -(centre - levels).abs() * 50


def geometry_case(tmp_path: Path) -> tuple[Path, Path]:
    """384×384 in-plane, 9 slices of 5 mm, stored with permuted and flipped axes."""
    label = np.zeros((9, 384, 384), np.uint8)
    zz, yy, xx = np.mgrid[:9, :384, :384]
    label[((yy - 170) / 110) ** 2 + ((xx - 200) / 140) ** 2 + ((zz - 4) / 4.5) ** 2 < 1] = 1
    label[((yy - 150) / 30) ** 2 + ((xx - 230) / 25) ** 2 + ((zz - 5) / 2.2) ** 2 < 1] = 2
    label[:, 300:, 20:40] = 1  # off-centre, asymmetric: a flip would show
    image = np.vectorize(HU.get)(label).astype(np.int16)
    kwargs = dict(spacing=(5.0, 0.7, 0.7), axcodes=("R", "I", "A"), origin=(120.0, -40.0, 300.0))
    save_canonical(tmp_path / "volume-7.nii.gz", image, **kwargs)
    save_canonical(tmp_path / "segmentation-7.nii.gz", label, **kwargs)
    return tmp_path / "volume-7.nii.gz", tmp_path / "segmentation-7.nii.gz"


# the CUDA path stages batches through pinned buffers and preprocesses with torch: same answers
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size, min_dice", [(384, 1.0), (64, 0.9)], ids=["no-resize", "resized-to-64"])
def test_prediction_has_the_inputs_shape_and_affine(tmp_path, size, min_dice, device):
    vol, seg = geometry_case(tmp_path)
    case = load_case(vol, seg)
    member = Member("oracle", tmp_path, Oracle(), Preprocessing(size=size, context=1))
    pred = predict_volume([member], case.image, case.spacing, torch.device(device), batch_size=4)
    assert pred.labels[ENSEMBLE] is pred.labels["oracle"]  # one member: its labels are the ensemble's
    out = write_labels(tmp_path / "out" / prediction_name("volume-7", True), pred.labels[ENSEMBLE], case.affine)
    written, truth = nib.load(out), nib.load(seg)
    assert out.name == "segmentation-7.nii.gz"
    assert written.shape == truth.shape == (384, 9, 384)
    assert np.array_equal(written.affine, truth.affine)
    assert written.get_data_dtype() == np.uint8
    got, want = np.asarray(written.dataobj), np.asarray(truth.dataobj)
    spacing = tuple(float(s) for s in truth.header.get_zooms())
    for cls, mask in (("liver", lambda a: a >= 1), ("tumour", lambda a: a == 2)):
        dice = lits.binary_scores(mask(got), mask(want), spacing)["dice"]
        assert dice >= min_dice, (cls, dice)
    if size == 384:
        assert np.array_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, spacing, size, min_dice", [
    ((9, 72, 100), (5.0, 0.7, 0.7), 100, 1.0),  # the slice's own pixels: rows padded, exact
    ((9, 100, 72), (5.0, 0.6, 0.9), 64, 0.9),   # non-square pixels: resampled, columns padded
], ids=["non-square-grid-native", "non-square-pixels-to-64"])
def test_prediction_of_a_non_square_slice_comes_back_on_its_grid(tmp_path, shape, spacing, size, min_dice, device):
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    centre = (np.array(shape) - 1) / 2
    r2 = sum(((g - c) * d / 25.0) ** 2 for g, c, d in zip((zz, yy, xx), centre, spacing))
    label = (r2 < 1).astype(np.uint8)
    label[r2 < 0.2] = 2
    label[:, 5:12, 3:9] = 1  # off-centre, asymmetric: a flip or a shift would show
    save_canonical(tmp_path / "volume-1.nii.gz", np.vectorize(HU.get)(label).astype(np.int16), spacing=spacing)
    case = load_image(tmp_path / "volume-1.nii.gz")
    member = Member("oracle", tmp_path, Oracle(), Preprocessing(size=size, context=1))
    got = predict_volume([member], case.image, case.spacing, torch.device(device), batch_size=4).labels[ENSEMBLE]
    assert got.shape == label.shape
    for mask in (lambda a: a >= 1, lambda a: a == 2):
        assert lits.binary_scores(mask(got), mask(label), spacing)["dice"] >= min_dice
    if min_dice == 1.0:
        assert np.array_equal(got, label)


@pytest.mark.parametrize("device", DEVICES)
def test_ensemble_averages_probabilities_and_flips_change_nothing_for_a_symmetric_model(tmp_path, device):
    vol, seg = geometry_case(tmp_path)
    case = load_case(vol, seg)
    pre = Preprocessing(size=64, context=1)
    members = [Member("a", tmp_path, Oracle(), pre), Member("b", tmp_path, Oracle(), pre)]
    plain = predict_volume(members, case.image, case.spacing, torch.device(device), batch_size=3)
    flipped = predict_volume(members, case.image, case.spacing, torch.device(device), batch_size=5, tta="flips")
    assert set(plain.labels) == {"a", "b", ENSEMBLE}
    assert np.array_equal(plain.labels["a"], plain.labels[ENSEMBLE])
    assert np.array_equal(plain.labels[ENSEMBLE], flipped.labels[ENSEMBLE])


class Constant(torch.nn.Module):
    """The same logits at every pixel."""

    def __init__(self, logits: tuple[float, float, float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.to(x.device)[None, :, None, None].expand(x.shape[0], 3, *x.shape[2:]).clone()


@pytest.mark.parametrize("device", DEVICES)
def test_the_tumour_probability_is_the_ensembles_mean_as_uint8(tmp_path, device):
    vol, seg = geometry_case(tmp_path)
    case = load_case(vol, seg)
    pre = Preprocessing(size=64, context=0)
    a, b = (0.0, 1.0, 2.0), (0.0, 2.0, 0.5)  # tumour 0.665 and 0.169 by softmax, liver wins for b
    members = [Member("a", tmp_path, Constant(a), pre), Member("b", tmp_path, Constant(b), pre)]
    done = predict_volume(members, case.image, case.spacing, torch.device(device), batch_size=4,
                          tumour_probability=True)
    p_a, p_b = (float(torch.tensor(x).softmax(0)[2]) for x in (a, b))
    assert done.tumour_probability.dtype == np.uint8 and done.tumour_probability.shape == case.image.shape
    values, counts = np.unique(done.tumour_probability, return_counts=True)
    assert values[counts.argmax()] == round((p_a + p_b) / 2 * 255)  # 107
    assert set(done.labels) == {"a", "b", ENSEMBLE} and np.all(done.labels[ENSEMBLE][done.tumour_probability > 0] == 1)
    alone = predict_volume(members[:1], case.image, case.spacing, torch.device(device), tumour_probability=True)
    assert np.unique(alone.tumour_probability, return_counts=True)[0][-1] == round(p_a * 255)
    assert predict_volume(members, case.image, case.spacing, torch.device(device)).tumour_probability is None


class LeftSided(torch.nn.Module):
    """Tumour in the left half of the slice, liver in the right: any left-right flip of the
    input changes its answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 3, *x.shape[2:], device=x.device)
        half = x.shape[-1] // 2
        out[:, 2, :, :half] = 5.0
        out[:, 1, :, half:] = 5.0
        return out


def trained(augment: dict | None) -> dict:
    return {} if augment is None else {"train": {"augment": augment}}


def test_tta_flips_only_the_ways_each_model_was_trained(tmp_path):
    assert flips("none", None) == [()]
    assert flips("flips", None) == [(), (3,), (2,)]  # unknown training: both, as before
    assert flips("flips", {"flip_lr": 0.5, "flip_ud": 0.0}) == [(), (3,)]
    assert flips("flips", {"flip_lr": 0.0, "flip_ud": 0.0}) == [()]
    vol, seg = geometry_case(tmp_path)
    case = load_case(vol, seg)
    image, spacing = case.image, case.spacing
    pre = Preprocessing(size=64, context=0)
    plain = predict_volume([Member("m", tmp_path, LeftSided(), pre, trained({"flip_lr": 0.0}))],
                           image, spacing, torch.device("cpu"), batch_size=4, tta="flips").labels["m"]
    half = plain.shape[-1] // 2  # 384 wide; the resize from 64 blurs the middle column or so
    assert (plain[..., :half - 4] == 2).all() and (plain[..., half + 4:] == 1).all()
    # trained with left-right flips: the flipped pass (liver left, tumour right) is averaged in,
    # ties go to the lower class, so the whole slice becomes liver
    mixed = predict_volume([Member("m", tmp_path, LeftSided(), pre, trained({"flip_lr": 0.5}))],
                           image, spacing, torch.device("cpu"), batch_size=4, tta="flips").labels["m"]
    assert (mixed == 1).all()
    untrained = [Member("a", tmp_path, LeftSided(), pre, trained({"flip_lr": 0.0, "flip_ud": 0.0}))]
    assert "no checkpoint was trained with flips" in tta_note(untrained, "flips")
    assert tta_note(untrained, "none") is None
    assert tta_note(untrained + [Member("b", tmp_path, LeftSided(), pre, trained(None))], "flips") is None


def export_random(folder: Path, size: int = 64, context: int = 1, arch: str = "unet") -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(arch, "tu-mobilenetv3_small_050", 2 * context + 1, 3)  # small: 4 MB of weights
    model = create_model(spec.arch, spec.encoder, spec.in_channels, spec.classes)
    return export_checkpoint(model, spec, folder, {"preprocessing": Preprocessing(size=size, context=context).to_dict()})


def test_checkpoints_with_different_preprocessing_refuse_to_ensemble(tmp_path):
    a = export_random(tmp_path / "a" / "best", size=64)
    b = export_random(tmp_path / "b" / "best", size=96)
    members = load_members([a], torch.device("cpu"))
    assert members[0].name == "a"
    with pytest.raises(ConfigError, match="cannot be ensembled"):
        load_members([a, b], torch.device("cpu"))


@pytest.mark.parametrize("path, taken, name", [
    ("runs/unet/best", set(), "unet"),
    ("runs/unet/last", set(), "unet-last"),
    ("runs/unet/best", {"unet"}, "unet-2"),
    ("exports/my-model", set(), "my-model"),
    ("runs/ensemble/best", set(), "ensemble-2"),
])
def test_member_names(path, taken, name):
    assert member_name(Path(path), taken) == name


@pytest.mark.parametrize("case, compressed, name", [
    ("volume-3", False, "segmentation-3.nii"),
    ("test-volume-12", False, "test-segmentation-12.nii"),
    ("liver_5", True, "liver_5.nii.gz"),
])
def test_prediction_names_follow_lits(case, compressed, name):
    assert prediction_name(case, compressed) == name


@pytest.mark.parametrize("shape, size, dtype, pixel_mm, spacing_mm", [
    ((40, 64, 64), 64, np.int16, (0.8, 0.8), None),
    ((37, 100, 90), 64, np.int16, (0.7, 0.7), None),
    ((5, 48, 40), 64, np.float32, (1.0, 1.0), None),
    ((6, 90, 70), 64, np.int16, (0.6, 0.9), None),   # non-square pixels: resampled and padded
    ((6, 90, 70), 64, np.int16, (0.6, 0.9), 0.7),    # a chosen pixel size: cropped and padded
])
def test_preprocessing_on_an_accelerator_is_shardgens(shape, size, dtype, pixel_mm, spacing_mm):
    """The torch preprocessing that inference runs on an accelerator (here run on the CPU)
    gives the slices shardgen writes into shards: identical without a resize, at most one
    grey level apart (rounding at a half) in a few pixels with one."""
    hu = np.random.default_rng(sum(shape)).normal(100, 300, shape).astype(dtype)
    pre = Preprocessing(size=size, spacing_mm=spacing_mm)
    ours = preprocess_torch(torch.from_numpy(hu), pre, pixel_mm)
    assert np.array_equal(hu, np.random.default_rng(sum(shape)).normal(100, 300, shape).astype(dtype))  # input untouched
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == (shape[0], size, size)
    diff = np.abs(ours.numpy().astype(int) - preprocess_image(hu, pre, pixel_mm).astype(int))
    if shape[1:] == (size, size):
        assert diff.max() == 0
    else:
        assert diff.max() <= 1 and diff.mean() < 1e-3


def rotated(angle_deg: float, spacing=(0.8, 0.8, 2.5), origin=(-150.0, 120.0, -300.0)) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.mark.parametrize("qcode, scode, qangle, sangle", [
    (2, 2, 0.0, 0.0),    # "aligned" codes, as many converters write them
    (1, 0, 5.0, 0.0),    # qform only: the sform is unset and must stay unset
    (1, 2, 0.0, 3.0),    # qform and sform that differ: both kept as they are
], ids=["codes-2-2", "qform-only", "qform-differs-from-sform"])
def test_predictions_keep_the_inputs_qform_sform_and_units(tmp_path, qcode, scode, qangle, sangle):
    label = np.zeros((12, 10, 6), np.uint8)
    label[3:8, 2:7, 1:4] = 1
    label[5, 4, 2] = 2
    image = nib.Nifti1Image(label.astype(np.int16), None)
    image.header.set_qform(rotated(qangle), code=qcode)
    image.header.set_sform(rotated(sangle) if scode else np.zeros((4, 4)), code=scode)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(tmp_path / "volume-3.nii.gz"))
    case = load_case(tmp_path / "volume-3.nii.gz", tmp_path / "volume-3.nii.gz")
    out = write_labels(tmp_path / "segmentation-3.nii.gz", case.label, case.affine, case.spatial)
    written = nib.load(out).header
    source = nib.load(tmp_path / "volume-3.nii.gz").header
    for coded in ("get_qform", "get_sform"):
        (want, want_code), (got, got_code) = getattr(source, coded)(coded=True), getattr(written, coded)(coded=True)
        assert int(got_code) == int(want_code), coded
        assert (got is None) == (want is None) and (got is None or np.allclose(got, want, atol=1e-5)), coded
    assert written.get_xyzt_units() == ("mm", "sec")
    assert np.array_equal(np.asarray(nib.load(out).dataobj), label)  # the input's voxel order
