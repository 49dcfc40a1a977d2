"""Specification of the synthetic CT phantoms (shardgen/phantom.py), at small sizes."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest
from scipy import ndimage as ndi

from shardgen import phantom
from shardgen.orientation import canonical_spacing, from_canonical, to_canonical
from shardgen.phantom import LIVER_TISSUES, TISSUE_CODES, make_phantom, write_phantoms

CODE = TISSUE_CODES
TINY = dict(size=64, slices=(8, 16))
DEMO = dict(size=128, slices=(24, 48))

SHAPE_CASES = [  # name, case index, make_phantom keywords
    ("tiny", 0, TINY),
    ("demo", 5, DEMO),
    ("odd matrix, fixed slice count", 2, dict(size=96, slices=(10, 10))),
    ("single slice", 3, dict(size=48, slices=(1, 1))),
]


def canonical(p: phantom.Phantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(to_canonical(a, p.affine) for a in (p.volume, p.label, p.tissue))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def demo_cases() -> list[phantom.Phantom]:
    return [make_phantom(i, seed=0, **DEMO) for i in range(4)]


# ----------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_arrays():
    a, b = make_phantom(3, seed=7, **TINY), make_phantom(3, seed=7, **TINY)
    assert np.array_equal(a.volume, b.volume)
    assert np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    assert a.lesion_diameters_mm == b.lesion_diameters_mm


@pytest.mark.parametrize("name, other", [("another seed", dict(case_index=3, seed=8)),
                                         ("another case", dict(case_index=4, seed=7))])
def test_other_seed_or_case_differs(name, other):
    a, b = make_phantom(3, seed=7, **TINY), make_phantom(**other, **TINY)
    assert a.volume.shape != b.volume.shape or not np.array_equal(a.volume, b.volume)


def test_case_does_not_depend_on_how_many_cases_are_written_or_by_how_many_processes(tmp_path):
    write_phantoms(tmp_path / "two", cases=2, seed=5, **TINY)
    paths = write_phantoms(tmp_path / "four", cases=4, seed=5, workers=2, **TINY)
    assert [p.name for p in paths[:4]] == ["volume-0.nii.gz", "segmentation-0.nii.gz",
                                           "volume-1.nii.gz", "segmentation-1.nii.gz"]
    for name in ("volume-1.nii.gz", "segmentation-1.nii.gz"):
        a, b = (np.asanyarray(nib.load(tmp_path / d / name).dataobj) for d in ("two", "four"))
        assert np.array_equal(a, b)
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "two" / "volume-1.nii.gz").dataobj),
                          make_phantom(1, seed=5, **TINY).volume)


def test_anatomy_does_not_depend_on_matrix_size():
    """The field of view is fixed in mm, so the liver's volume in ml is the same at any size."""
    volumes = []
    for size in (64, 128):
        p = make_phantom(6, seed=1, size=size, slices=(12, 12))
        volumes.append((p.label > 0).sum() * np.prod(p.spacing) / 1000.0)
    assert volumes[0] == pytest.approx(volumes[1], rel=0.1)


# ----------------------------------------------------------------------------- arrays and geometry

@pytest.mark.parametrize("name, index, kwargs", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_dtypes_shapes_and_label_values(name, index, kwargs):
    p = make_phantom(index, **kwargs)
    assert p.volume.dtype == np.int16 and p.label.dtype == np.uint8 and p.tissue.dtype == np.uint8
    assert p.affine.shape == (4, 4) and p.affine.dtype == np.float64
    assert p.volume.shape == p.label.shape == p.tissue.shape
    nz, rows, cols = to_canonical(p.volume, p.affine).shape
    assert rows == cols == kwargs["size"]
    assert kwargs["slices"][0] <= nz <= kwargs["slices"][1]
    assert set(np.unique(p.label)) <= {0, 1, 2}


@pytest.mark.parametrize("index", range(6))
def test_spacing_ranges_and_affine_agree(index):
    size = 128
    p = make_phantom(index, **DEMO)
    thickness, row, col = p.spacing
    assert 0.6 * 512 / size <= row == col <= 0.9 * 512 / size
    assert 0.7 <= thickness <= 5.0
    assert canonical_spacing(p.affine) == pytest.approx(p.spacing)


@pytest.mark.parametrize("axcodes, signs", [(("L", "P", "S"), (-1, -1, 1)), (("R", "A", "S"), (1, 1, 1)),
                                            (("L", "P", "I"), (-1, -1, -1))],
                         ids=["LPS (usual LiTS)", "RAS (flipped)", "LPI (flipped)"])
def test_storage_orientation_round_trips_to_the_canonical_array(monkeypatch, axcodes, signs):
    monkeypatch.setattr(phantom, "_STORAGE", ((axcodes, 1.0),))
    p = make_phantom(2, **TINY)
    case = phantom._synthesise(2, 0, TINY["size"], TINY["slices"])
    assert p.axcodes == axcodes
    assert np.sign(np.diag(p.affine)[:3]).tolist() == list(signs)
    assert nib.aff2axcodes(p.affine) == axcodes
    assert np.array_equal(to_canonical(p.volume, p.affine), case.volume)
    assert np.array_equal(to_canonical(p.tissue, p.affine), case.tissue)
    assert np.array_equal(from_canonical(case.volume, p.affine), p.volume)


@pytest.mark.parametrize("index", range(4))
def test_canonical_view_is_the_radiological_view(index):
    """imshow(vol[z]): liver on the image's left (patient's right), spleen and aorta to the
    right of the IVC, spine in the lower half near the centre."""
    _, label, tissue = canonical(make_phantom(index, **DEMO))
    size = label.shape[2]
    centroid = lambda mask: np.array(ndi.center_of_mass(mask))  # noqa: E731  (z, row, col)
    assert centroid(label > 0)[2] < size / 2
    assert centroid(tissue == CODE["aorta"])[2] > centroid(tissue == CODE["ivc"])[2]
    if (tissue == CODE["spleen"]).any():
        assert centroid(tissue == CODE["spleen"])[2] > size / 2
    spine = centroid(tissue == CODE["cortical_bone"])
    assert spine[1] > size / 2 and abs(spine[2] - size / 2) < size / 4


def test_liver_is_in_nearly_every_slice_at_test_sizes():
    fractions = [(canonical(make_phantom(i, **TINY))[1] > 0).any(axis=(1, 2)).mean() for i in range(8)]
    assert np.mean(fractions) >= 0.9


# ----------------------------------------------------------------------------- labels

@pytest.mark.parametrize("index", [0, 2, 5])
def test_labels_match_the_unblurred_tissue(index):
    p = make_phantom(index, **DEMO)
    liver = np.isin(p.tissue, [CODE[n] for n in LIVER_TISSUES])
    assert np.array_equal(p.label == 1, liver)
    assert np.array_equal(p.label == 2, p.tissue == CODE["lesion"])


@pytest.mark.parametrize("index", [2, 10, 17])
def test_tumour_lies_only_where_the_liver_is(monkeypatch, index):
    """Lesions are clipped to the liver: the liver outline (labels 1 and 2 together) is
    exactly the outline of the same case generated without lesions."""
    with_lesions = make_phantom(index, **DEMO)
    monkeypatch.setattr(phantom, "_sample_lesions", lambda *args: [])
    without = make_phantom(index, **DEMO)
    assert (with_lesions.label == 2).any()
    assert not (without.label == 2).any()
    assert np.array_equal(with_lesions.label > 0, without.label > 0)


# ----------------------------------------------------------------------------- intensities

def test_liver_hu_is_portal_venous(demo_cases):
    for p in demo_cases:
        assert 90 <= np.median(p.volume[p.label == 1]) <= 140


def test_spleen_is_nearly_as_dense_as_the_liver(demo_cases):
    for p in demo_cases:
        volume, label, tissue = canonical(p)
        spleen = ndi.binary_erosion(tissue == CODE["spleen"], structure=np.ones((1, 3, 3)))
        if spleen.sum() < 50:
            continue
        assert abs(np.median(volume[spleen]) - np.median(volume[label == 1])) <= 20


def test_air_outside_the_body_is_minus_1000(demo_cases):
    for p in demo_cases:
        assert abs(np.median(p.volume[p.tissue == CODE["air"]]) + 1000) <= 15


def test_bone_is_present_and_dense(demo_cases):
    for p in demo_cases:
        bone = np.isin(p.tissue, [CODE["cortical_bone"], CODE["cancellous_bone"]])
        assert bone.any() and np.percentile(p.volume[bone], 99) > 400


def test_intensity_alone_does_not_find_the_liver(demo_cases):
    """A window on the liver's own interquartile HU range catches plenty of other tissue."""
    for p in demo_cases:
        lo, hi = np.percentile(p.volume[p.label == 1], [25, 75])
        window = (p.volume >= lo) & (p.volume <= hi)
        assert (window & (p.label == 0)).sum() >= 0.1 * window.sum()


def test_noise_in_homogeneous_liver_matches_the_drawn_level(demo_cases):
    for p in demo_cases:
        volume, _, tissue = canonical(p)
        core = ndi.binary_erosion(tissue == CODE["liver"], structure=np.ones((1, 3, 3)), iterations=2)
        core[[0, -1]] = False
        std = volume[core].std()
        assert 8 <= std <= 30
        assert std == pytest.approx(p.noise_sd, rel=0.25)


# ----------------------------------------------------------------------------- lesions

def test_lesion_counts_and_sizes_vary_across_cases():
    cases = [make_phantom(i, seed=0, size=48, slices=(4, 6)) for i in range(24)]
    counts = [p.n_lesions for p in cases]
    diameters = [d for p in cases for d in p.lesion_diameters_mm]
    assert counts.count(0) >= 2, counts
    assert sum(c >= 3 for c in counts) >= 2, counts
    assert min(diameters) < 8 and max(diameters) > 30, diameters
    assert all(3 <= d <= 60 for d in diameters)


def test_lesions_are_visible_at_demo_size():
    """At 128 px most cases with a lesion of 10 mm or more show it, hypodense on average."""
    shown = []
    for i in range(10):
        p = make_phantom(i, seed=0, **DEMO)
        if max(p.lesion_diameters_mm, default=0) >= 10:
            tumour = p.label == 2
            shown.append(tumour.sum() > 0 and np.median(p.volume[tumour]) < np.median(p.volume[p.label == 1]))
    assert len(shown) >= 3 and np.mean(shown) >= 0.6


# ----------------------------------------------------------------------------- files

def test_write_phantoms_writes_loadable_lits_files(tmp_path):
    seen: list[int] = []
    out = tmp_path / "new" / "folder"
    paths = write_phantoms(out, cases=2, seed=3, on_case=seen.append, **TINY)
    assert seen == [0, 1]
    assert [p.name for p in paths] == ["volume-0.nii.gz", "segmentation-0.nii.gz",
                                       "volume-1.nii.gz", "segmentation-1.nii.gz"]
    assert not list(out.glob("*.tmp"))
    for i in range(2):
        expected = make_phantom(i, seed=3, **TINY)
        for name, dtype, array in (("volume", np.int16, expected.volume), ("segmentation", np.uint8, expected.label)):
            image = nib.load(out / f"{name}-{i}.nii.gz")
            assert image.get_data_dtype() == dtype
            data = np.asanyarray(image.dataobj)
            assert data.dtype == dtype and np.array_equal(data, array)
            assert np.allclose(image.affine, expected.affine)
            # gzip header: flags byte without FNAME (0x08), mtime 0: reruns give identical files
            head = (out / f"{name}-{i}.nii.gz").read_bytes()[:10]
            assert head[3] & 0x08 == 0 and head[4:8] == bytes(4), head


def test_a_failed_write_leaves_neither_a_file_nor_a_temporary(tmp_path, monkeypatch):
    def broken(self):
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        write_phantoms(tmp_path, cases=1, **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [dict(size=8), dict(slices=(0, 4)), dict(slices=(9, 4))],
                         ids=["matrix too small", "zero slices", "min above max"])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        make_phantom(0, **{**TINY, **kwargs})
