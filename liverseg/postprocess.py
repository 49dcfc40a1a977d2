"""3D postprocessing of predicted liver/tumour label volumes: small callables (parameters in
``__init__``, the labels in ``__call__``) and a chain of them that reads and writes JSON.

Pure numpy/scipy/cc3d (no torch). Parameters are in mm and become voxels per axis from the
spacing; structuring elements are ellipsoids in voxels (at least the centre voxel). Every
step works inside the bounding box of label >= 1 (ANCHORS.md: cropping first is what makes
a 512×512×400 volume take well under a second). docs/METRICS.md explains the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cc3d
import numpy as np

from .errors import ConfigError
from shardgen.labels import LIVER, TUMOUR
from shardgen.settings import from_dict

from .morphology import (Box, bounding_box, dilate, ellipsoid, erode, fill_holes, padded, separate_boxes,
                         unpad)

Spacing = Sequence[float]


# --------------------------------------------------------------------------- steps

class Step:
    """A postprocessing step: ``step(labels, spacing)`` returns a new uint8 label volume.
    A step with ``needs_probability`` also reads the ensemble's tumour probability, a uint8
    volume of the labels' shape where ``PROBABILITY_MAX`` is probability 1
    (``step(labels, spacing, tumour_probability)``)."""

    name: ClassVar[str]
    needs_probability: ClassVar[bool] = False

    def __call__(self, labels: np.ndarray, spacing: Spacing, tumour_probability: np.ndarray | None = None
                 ) -> np.ndarray:
        out = np.array(labels, dtype=np.uint8, copy=True)
        self.run_(out, _spacing(spacing), _checked_probability(tumour_probability, out.shape))
        return out

    def run_(self, labels: np.ndarray, spacing: tuple[float, float, float], probability: np.ndarray | None
             ) -> None:
        """``apply_``, given the probability (a view of the same voxels) when the step needs it."""
        if not self.needs_probability:
            self.apply_(labels, spacing)
        elif probability is None:
            raise ConfigError(f"postprocessing step {self.name!r} needs the ensemble's tumour probabilities, "
                              "which only liverseg-eval run, predict and tune have: it cannot run on label "
                              "maps alone")
        else:
            self.apply_(labels, spacing, probability)

    def apply_(self, labels: np.ndarray, spacing: tuple[float, float, float], *probability: np.ndarray) -> None:
        """Change ``labels`` in place (a view is fine: faces zero or the array border)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def _spacing(spacing: Spacing) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(s > 0 for s in sp):
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing}")
    return sp


# the ensemble's tumour probability reaches the postprocessing as uint8: this value is 1
PROBABILITY_MAX = 255


def _checked_probability(probability: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if probability is not None and (probability.dtype != np.uint8 or probability.shape != shape):
        raise ValueError(f"the tumour probability must be uint8 of the labels' shape {shape}, "
                         f"got {probability.dtype} {probability.shape}")
    return probability


def _check_nonnegative(step: Step, field: str) -> None:
    value = getattr(step, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{step.name}: {field} must be a number >= 0, got {value!r}")


def _liver_box(labels: np.ndarray) -> Box | None:
    return bounding_box(labels, 1)  # labels are 0, 1, 2: nonzero is label >= 1


def _liver_crop(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The view of ``labels`` inside the liver's box and its liver mask (label >= 1);
    None without liver."""
    box = _liver_box(labels)
    if box is None:
        return None
    crop = labels[box]
    return crop, crop >= LIVER


@dataclass(frozen=True)
class LargestLiverComponent(Step):
    """Keep the largest 26-connected component of liver (label >= 1, tumour included);
    every voxel outside it becomes 0.

    >>> labels = np.array([[[1, 2, 1, 0, 1]]], np.uint8)
    >>> LargestLiverComponent()(labels, (1, 1, 1))
    array([[[1, 2, 1, 0, 0]]], dtype=uint8)
    """

    name: ClassVar[str] = "largest_liver_component"

    def apply_(self, labels: np.ndarray, spacing: tuple[float, float, float]) -> None:
        boxes = separate_boxes(labels)
        counts = [np.count_nonzero(labels[box]) for box in boxes]
        best, best_size = None, 0
        for i in np.argsort(counts)[::-1]:
            if counts[i] <= best_size:
                break  # no component of this box or the smaller ones can be larger
            components = cc3d.connected_components(labels[boxes[i]], connectivity=26, binary_image=True)
            sizes = np.bincount(components.ravel())
            if sizes[1:].max() > best_size:
                best, best_size = (i, components, np.argmax(sizes[1:]) + 1), sizes[1:].max()
        for i, box in enumerate(boxes):
            if best is not None and i == best[0]:
                np.multiply(labels[box], best[1] == best[2], out=labels[box])
            else:
                labels[box] = 0


@dataclass(frozen=True)
class FillLiverHoles(Step):
    """Fill the 3D holes of liver (label >= 1): background voxels that no 6-connected path
    joins to the array border become liver (1); tumour labels stay.

    >>> labels = np.ones((3, 3, 3), np.uint8); labels[1, 1, 1] = 0
    >>> int(FillLiverHoles()(np.pad(labels, 1), (1, 1, 1))[2, 2, 2])
    1
    """

    name: ClassVar[str] = "fill_liver_holes"

    def apply_(self, labels: np.ndarray, spacing: tuple[float, float, float]) -> None:
        if (found := _liver_crop(labels)) is not None:
            crop, liver = found
            crop[fill_holes(liver) & ~liver] = LIVER


@dataclass(frozen=True)
class _Morphology(Step):
    radius_mm: float = 2.0

    def __post_init__(self) -> None:
        _check_nonnegative(self, "radius_mm")

    def _morph(self, liver: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply_(self, labels: np.ndarray, spacing: tuple[float, float, float]) -> None:
        if (found := _liver_crop(labels)) is None:
            return
        crop, liver = found
        offsets = ellipsoid(self.radius_mm, spacing)
        reach = 2 * np.abs(offsets).max(axis=0) + 1  # room for both passes of opening/closing
        result = unpad(self._morph(padded(liver, reach), offsets), reach)
        crop[liver & ~result] = 0
        crop[result & ~liver] = LIVER


@dataclass(frozen=True)
class LiverOpening(_Morphology):
    """Opening of liver (label >= 1) by an ellipsoid of ``radius_mm``: voxels it removes
    (tumour too) become 0. Removes bridges and protrusions thinner than the ball.

    >>> labels = np.zeros((1, 5, 9), np.uint8); labels[0, 1:4, 1:4] = 1; labels[0, 2, 4:8] = 1
    >>> LiverOpening(radius_mm=1)(labels, (1, 1, 1))[0]
    array([[0, 0, 0, 0, 0, 0, 0, 0, 0],
           [0, 0, 1, 1, 0, 0, 0, 0, 0],
           [0, 1, 1, 1, 1, 0, 0, 0, 0],
           [0, 0, 1, 1, 0, 0, 0, 0, 0],
           [0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=uint8)
    """

    name: ClassVar[str] = "liver_opening"

    def _morph(self, liver: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return dilate(erode(liver, offsets), offsets)


@dataclass(frozen=True)
class LiverClosing(_Morphology):
    """Closing of liver (label >= 1) by an ellipsoid of ``radius_mm``: voxels it adds
    become liver (1). Closes notches and gaps narrower than the ball.

    >>> labels = np.zeros((1, 3, 7), np.uint8); labels[0, :, 1:3] = 1; labels[0, :, 4:6] = 1
    >>> LiverClosing(radius_mm=1)(labels, (1, 1, 1))[0]
    array([[0, 1, 1, 1, 1, 1, 0],
           [0, 1, 1, 1, 1, 1, 0],
           [0, 1, 1, 1, 1, 1, 0]], dtype=uint8)
    """

    name: ClassVar[str] = "liver_closing"

    def _morph(self, liver: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return erode(dilate(liver, offsets), offsets)


@dataclass(frozen=True)
class TumourInsideLiver(Step):
    """Tumour voxels farther than ``dilate_mm`` from the liver become 0. The liver here is
    the parenchyma (label 1) with its 3D holes filled, so that lesions it encloses are
    inside; parts of a lesion bulging out of the liver by more than dilate_mm are cut.

    >>> labels = np.array([[[1, 1, 2, 2, 0, 2]]], np.uint8)
    >>> TumourInsideLiver(dilate_mm=1)(labels, (1, 1, 1))
    array([[[1, 1, 2, 0, 0, 0]]], dtype=uint8)
    """

    name: ClassVar[str] = "tumour_inside_liver"
    dilate_mm: float = 2.0

    def __post_init__(self) -> None:
        _check_nonnegative(self, "dilate_mm")

    def apply_(self, labels: np.ndarray, spacing: tuple[float, float, float]) -> None:
        box = _liver_box(labels)
        if box is None:
            return
        crop = labels[box]
        tumour = crop == TUMOUR
        tbox = bounding_box(tumour)
        if tbox is None:
            return
        offsets = ellipsoid(self.dilate_mm, spacing)
        reach = np.abs(offsets).max(axis=0) + 1
        # the parenchyma's holes need the whole box, its dilation only the tumour's box + reach
        inside = fill_holes(crop == LIVER)
        near = tuple(slice(max(s.start - r, 0), min(s.stop + r, n))
                     for s, r, n in zip(tbox, reach, crop.shape))
        region = padded(inside[near], reach)
        near_liver = unpad(dilate(region, offsets), reach)
        local = crop[near]
        local[(local == TUMOUR) & ~near_liver] = 0


@dataclass(frozen=True)
class RemoveSmallLesions(Step):
    """Tumour components (26-connected) smaller than ``min_volume_mm3`` stop being tumour:
    they become liver (1) when they touch liver parenchyma (a 26-neighbour labelled 1),
    else background (0).

    >>> labels = np.array([[[1, 2, 1, 0, 2, 0, 1, 2, 2, 2]]], np.uint8)
    >>> RemoveSmallLesions(min_volume_mm3=2)(labels, (1, 1, 1))
    array([[[1, 1, 1, 0, 0, 0, 1, 2, 2, 2]]], dtype=uint8)
    """

    name: ClassVar[str] = "remove_small_lesions"
    min_volume_mm3: float = 10.0

    def __post_init__(self) -> None:
        _check_nonnegative(self, "min_volume_mm3")

    def apply_(self, labels: np.ndarray, spacing: tuple[float, float, float]) -> None:
        if (found := _lesions(labels)) is not None:
            box, components, n = found
            sizes = np.bincount(components.ravel(), minlength=n + 1) * math.prod(spacing)
            _demote(labels[box], components, n, sizes < self.min_volume_mm3)


@dataclass(frozen=True)
class RemoveUnsureLesions(Step):
    """Tumour components (26-connected) whose mean ensemble tumour probability is under
    ``min_mean_probability`` stop being tumour, as in `RemoveSmallLesions`: liver (1) when
    they touch liver parenchyma, else background (0). A component is tumour because the
    ensemble's tumour probability is the largest of the three at each of its voxels (at
    least 1/3); this keeps the components the models agree on throughout.

    >>> labels = np.array([[[1, 2, 2, 1, 2, 2]]], np.uint8)
    >>> probability = np.array([[[0, 200, 220, 0, 120, 250]]], np.uint8)  # 255 = 1
    >>> RemoveUnsureLesions(min_mean_probability=0.8)(labels, (1, 1, 1), probability)
    array([[[1, 2, 2, 1, 1, 1]]], dtype=uint8)
    """

    name: ClassVar[str] = "remove_unsure_lesions"
    needs_probability: ClassVar[bool] = True
    min_mean_probability: float = 0.5

    def __post_init__(self) -> None:
        _check_nonnegative(self, "min_mean_probability")
        if self.min_mean_probability > 1:
            raise ValueError(f"{self.name}: min_mean_probability must be at most 1, got {self.min_mean_probability!r}")

    def apply_(self, labels: np.ndarray, spacing: tuple[float, float, float], *probability: np.ndarray) -> None:
        if (found := _lesions(labels)) is not None:
            box, components, n = found
            total = np.bincount(components.ravel(), weights=probability[0][box].ravel(), minlength=n + 1)
            sizes = np.bincount(components.ravel(), minlength=n + 1)
            mean = total / np.maximum(sizes, 1) / PROBABILITY_MAX
            _demote(labels[box], components, n, mean < self.min_mean_probability)


def _lesions(labels: np.ndarray) -> tuple[Box, np.ndarray, int] | None:
    """The tumour's box in ``labels`` (+1 voxel) and the 26-connected tumour components
    inside it; None without tumour."""
    box = bounding_box(labels == TUMOUR, 1)
    if box is None:
        return None
    components, n = cc3d.connected_components(labels[box] == TUMOUR, connectivity=26, return_N=True)
    return box, components, int(n)


def _demote(crop: np.ndarray, components: np.ndarray, n: int, drop: np.ndarray) -> None:
    """Components 1..n of ``crop`` where ``drop`` (indexed by component, 0 ignored) become
    liver when they touch liver parenchyma, else background."""
    drop = np.asarray(drop, bool).copy()
    drop[0] = False
    if not drop.any():
        return
    voxels = np.nonzero(drop[components])
    owner = components[voxels]
    crop[voxels] = np.where(_touching_liver(crop, voxels, owner, n), LIVER, 0)[owner]


def _touching_liver(crop: np.ndarray, voxels: tuple[np.ndarray, ...], owner: np.ndarray, n: int
                    ) -> np.ndarray:
    """For components 0..n: whether one of their ``voxels`` (owned by ``owner``) has a
    26-neighbour labelled liver (1)."""
    padded = np.pad(crop, 1)
    flat = padded.ravel()
    index = np.ravel_multi_index(tuple(v + 1 for v in voxels), padded.shape)
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1])
    touching = np.zeros(n + 1, bool)
    for offset in np.ndindex(3, 3, 3):
        step = int(np.dot(np.subtract(offset, 1), strides))
        if step:
            touching[owner[flat[index + step] == LIVER]] = True
    return touching


# --------------------------------------------------------------------------- chains

STEPS: dict[str, type[Step]] = {cls.name: cls for cls in (
    LargestLiverComponent, FillLiverHoles, LiverOpening, LiverClosing, TumourInsideLiver,
    RemoveSmallLesions, RemoveUnsureLesions)}


def create_step(spec: dict[str, Any], source: str = "postprocess config") -> Step:
    """A step from {"name": ..., **parameters}; a wrong name or parameter raises ConfigError."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{source}: each step must be an object with a \"name\", got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    cls = STEPS.get(spec["name"])
    if cls is None:
        raise ConfigError(f"{source}: unknown postprocessing step {spec['name']!r}; "
                          f"valid names: {', '.join(STEPS)}")
    try:
        return from_dict(cls, params, f"parameters of step {cls.name!r}", ConfigError, source=source)
    except ValueError as err:  # a parameter's own check
        raise ConfigError(f"{source}: {err}") from None


class Postprocess:
    """Steps applied in order; an empty chain (``"none"``) returns a copy of the labels.

    The chain crops once to the bounding box of label >= 1 (+1 voxel) and runs each step
    on that view: no step adds a voxel outside the box, so this equals running them on
    the whole volume.
    """

    def __init__(self, steps: Sequence[Step] = ()) -> None:
        self.steps = tuple(steps)

    def __call__(self, labels: np.ndarray, spacing: Spacing, tumour_probability: np.ndarray | None = None
                 ) -> np.ndarray:
        """The labels after every step; ``tumour_probability`` as for `Step`, needed only
        by steps that read it (``needs_probability``)."""
        if labels.ndim != 3:
            raise ValueError(f"labels must be a 3D (z, y, x) volume, got shape {labels.shape}")
        probability = _checked_probability(tumour_probability, labels.shape)
        box = _liver_box(labels) if self.steps else None
        if box is None:
            return np.array(labels, dtype=np.uint8, copy=True)
        # fresh zeros are written only inside the box: a full copy costs ~0.1 s more in page faults
        out = np.zeros(labels.shape, np.uint8)
        view, sp = out[box], _spacing(spacing)
        view[...] = labels[box]
        for step in self.steps:
            step.run_(view, sp, None if probability is None else probability[box])
        return out

    @property
    def needs_probability(self) -> bool:
        return any(step.needs_probability for step in self.steps)

    def __repr__(self) -> str:
        return f"Postprocess({list(self.steps)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Postprocess) and self.steps == other.steps

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [step.to_dict() for step in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "postprocess config") -> Postprocess:
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or set(data) - {"steps"}:
            raise ConfigError(f"{source}: expected {{\"steps\": [{{\"name\": ...}}, ...]}}; "
                              f"valid step names: {', '.join(STEPS)}")
        return cls([create_step(spec, source) for spec in data["steps"]])

    @classmethod
    def from_json(cls, path: str | Path) -> Postprocess:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the postprocessing config ({err.strerror})") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        return cls.from_dict(data, str(path))


# min_volume_mm3 values `liverseg-eval tune` tries: balls of about 2.7, 4.6, 5.8, 7.3, 9.8,
# 12.4 and 15.6 mm across
MIN_LESION_CANDIDATES_MM3 = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
# min_mean_probability values it tries; 0 is no remove_unsure_lesions step
MIN_PROBABILITY_CANDIDATES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)


def with_lesion_filters(chain: Postprocess, min_volume_mm3: float, min_mean_probability: float = 0.0
                        ) -> Postprocess:
    """``chain`` with every `RemoveSmallLesions` set to ``min_volume_mm3`` (a chain without
    one gets it appended) and, when ``min_mean_probability`` > 0, a `RemoveUnsureLesions`
    with it right after; the chain's own `RemoveUnsureLesions` steps are dropped."""
    small = RemoveSmallLesions(min_volume_mm3=float(min_volume_mm3))
    steps = [small if isinstance(s, RemoveSmallLesions) else s for s in chain.steps
             if not isinstance(s, RemoveUnsureLesions)]
    if small not in steps:
        steps.append(small)
    if min_mean_probability > 0:
        last = len(steps) - steps[::-1].index(small)
        steps.insert(last, RemoveUnsureLesions(min_mean_probability=float(min_mean_probability)))
    return Postprocess(steps)


def default_postprocess() -> Postprocess:
    """Largest liver component, 3D hole filling, tumour components under 10 mm³ removed
    (docs/METRICS.md says why these and not the others)."""
    return Postprocess([LargestLiverComponent(), FillLiverHoles(), RemoveSmallLesions(min_volume_mm3=10.0)])
