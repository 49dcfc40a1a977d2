"""A checkpoint's config.json is user input: absurd values are refused in one line that
names the file and the field, before any model is built or memory allocated."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from liverseg import models
from liverseg.errors import CheckpointError
from liverseg.inference import load_members
from liverseg.checkpoint import CONFIG_FILE, MODEL_FILE, ModelSpec, export_checkpoint, load_checkpoint
from liverseg.models import create_model
from shardgen.preprocess import Preprocessing

from conftest import console_script, run_python, write_blob_case

CHECK_SECONDS = 0.25  # the checks read a few kB of JSON (about a millisecond); no model is built
GOOD_EXTRA = {"preprocessing": Preprocessing(size=64, context=1).to_dict(),
              "classes": ["background", "liver", "tumour"], "train": {"augment": {"flip_lr": 0.0}}, "step": 3}


def model_field(name, value):
    return lambda c: c["model"].__setitem__(name, value)


def preprocessing_field(name, value):
    return lambda c: c["preprocessing"].__setitem__(name, value)


def top_field(name, value):
    return lambda c: c.__setitem__(name, value)


def raw_model_field(name, text):
    """A value Python's json cannot write (it refuses integers of over 4300 digits)."""
    return lambda c: json.dumps({**c, "model": {**c["model"], name: "RAW"}}).replace('"RAW"', text)


def without(name):
    return lambda c: c.__delitem__(name)


def augment_field(name, value):
    return lambda c: c["train"]["augment"].__setitem__(name, value)


# name: (change to the good config, what the one-line message must contain)
ANY_USE = {
    "classes 1e9": (model_field("classes", 1e9), "model.classes"),
    "classes 10^9": (model_field("classes", 10**9), "model.classes"),
    "classes 17": (model_field("classes", 17), "model.classes"),
    "classes 0": (model_field("classes", 0), "model.classes"),
    "classes -3": (model_field("classes", -3), "model.classes"),
    "classes true": (model_field("classes", True), "model.classes"),
    "classes '3'": (model_field("classes", "3"), "model.classes"),
    "in_channels 10^9": (model_field("in_channels", 10**9), "model.in_channels"),
    "in_channels 65": (model_field("in_channels", 65), "model.in_channels"),
    "in_channels 0": (model_field("in_channels", 0), "model.in_channels"),
    "in_channels 3.0": (model_field("in_channels", 3.0), "model.in_channels"),
    "in_channels true": (model_field("in_channels", True), "model.in_channels"),
    "in_channels 1, preprocessing makes 3": (model_field("in_channels", 1), "model.in_channels"),
    "in_channels 5, preprocessing makes 3": (model_field("in_channels", 5), "model.in_channels"),
    "decoder_channels 1e6": (model_field("decoder_channels", [1e6] * 5), "model.decoder_channels"),
    "decoder_channels 10^6": (model_field("decoder_channels", [10**6] * 5), "model.decoder_channels"),
    "decoder_channels 4097": (model_field("decoder_channels", [4097, 128, 64, 32, 16]), "model.decoder_channels"),
    "decoder_channels 0": (model_field("decoder_channels", [256, 128, 0, 32, 16]), "model.decoder_channels"),
    "decoder_channels -16": (model_field("decoder_channels", [256, 128, 64, 32, -16]), "model.decoder_channels"),
    "decoder_channels true": (model_field("decoder_channels", [True] * 5), "model.decoder_channels"),
    "decoder_channels empty": (model_field("decoder_channels", []), "model.decoder_channels"),
    "decoder_channels 1000 stages": (model_field("decoder_channels", [16] * 1000), "model.decoder_channels"),
    "decoder_channels a number": (model_field("decoder_channels", 256), "model.decoder_channels"),
    "decoder_channels nested": (model_field("decoder_channels", [[256]] * 5), "model.decoder_channels"),
    "decoder_channels an object": (model_field("decoder_channels", {"a": 1}), "model.decoder_channels"),
    "arch a list": (model_field("arch", ["unet"]), "model.arch"),
    "arch a megabyte": (model_field("arch", "u" * 900_000), "model.arch"),
    "attention a number": (model_field("attention", 3), "model.attention"),
    "model with 10^4 unknown settings": (
        lambda c: c["model"].update({f"junk{i}": i for i in range(10_000)}), "unknown model settings"),
    "size 1e6": (preprocessing_field("size", 1e6), "preprocessing.size"),
    "size 10^6": (preprocessing_field("size", 10**6), "preprocessing.size"),
    "size 4097": (preprocessing_field("size", 4097), "preprocessing.size"),
    "size 0": (preprocessing_field("size", 0), "preprocessing.size"),
    "size -64": (preprocessing_field("size", -64), "preprocessing.size"),
    "size 64.0": (preprocessing_field("size", 64.0), "preprocessing.size"),
    "size true": (preprocessing_field("size", True), "preprocessing.size"),
    "size '64'": (preprocessing_field("size", "64"), "preprocessing.size"),
    "size nested": (preprocessing_field("size", {"a": {"b": [64]}}), "preprocessing.size"),
    "context 17": (preprocessing_field("context", 17), "preprocessing.context"),
    "context -1": (preprocessing_field("context", -1), "preprocessing.context"),
    "context true": (preprocessing_field("context", True), "preprocessing.context"),
    "context 1.0": (preprocessing_field("context", 1.0), "preprocessing.context"),
    "window NaN": (preprocessing_field("window", [float("nan"), 400]), "preprocessing.window"),
    "window infinite": (preprocessing_field("window", [float("-inf"), float("inf")]), "preprocessing.window"),
    "window 1e300": (preprocessing_field("window", [-1e300, 1e300]), "preprocessing.window"),
    "window reversed": (preprocessing_field("window", [400, -100]), "preprocessing.window"),
    "window of three": (preprocessing_field("window", [-100, 200, 400]), "preprocessing.window"),
    "window of lists": (preprocessing_field("window", [[-100], [400]]), "preprocessing.window"),
    "window true": (preprocessing_field("window", [True, 400]), "preprocessing.window"),
    "orientation a number": (preprocessing_field("orientation", 5), "preprocessing.orientation"),
    "preprocessing a string": (top_field("preprocessing", "junk"), "preprocessing"),
    "preprocessing unknown setting": (preprocessing_field("spacing", 1.0), "'spacing'"),
    "class names a number": (top_field("classes", 3), "invalid classes"),
    "class names too many": (top_field("classes", ["x"] * 100), "invalid classes"),
    "an integer of 5000 digits": (raw_model_field("classes", "9" * 5000), "invalid JSON"),
    "nested 10^5 deep": (lambda c: "[" * 100_000 + "]" * 100_000, "invalid JSON"),
    "2 MB": (top_field("padding", "x" * 2_000_000), "bytes"),
}

# usable as a model, not by evaluation (liver = label 1, tumour = label 2, averaged probabilities)
EVALUATION_ONLY = {
    "classes 2": (model_field("classes", 2), "model.classes"),
    "classes 16": (model_field("classes", 16), "model.classes"),
    "no preprocessing": (without("preprocessing"), "preprocessing"),
    "class names in another order": (top_field("classes", ["background", "tumour", "liver"]), "invalid classes"),
    "flip_lr a word": (augment_field("flip_lr", "often"), "train.augment.flip_lr"),
    "flip_ud true": (augment_field("flip_ud", True), "train.augment.flip_ud"),
    "flip_lr 5": (augment_field("flip_lr", 5), "train.augment.flip_lr"),
    "augment a list": (lambda c: c["train"].__setitem__("augment", [1]), "train.augment"),
    "train a string": (top_field("train", "fast"), "invalid train"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    spec = ModelSpec("unet", "tu-mobilenetv3_small_050", in_channels=3, classes=3)
    folder = tmp_path_factory.mktemp("good") / "ckpt"
    export_checkpoint(create_model(**spec.to_dict()), spec, folder, GOOD_EXTRA)
    load_members([folder], torch.device("cpu"))  # unchanged, it is usable: only a change can make it fail
    return folder


def hostile_copy(good: Path, folder: Path, change) -> Path:
    """``good`` with its config.json changed (``change`` edits the dict in place, or
    returns the text to write instead); the weights are the good ones."""
    folder.mkdir(parents=True)
    shutil.copy(good / MODEL_FILE, folder / MODEL_FILE)
    config = json.loads((good / CONFIG_FILE).read_text())
    replaced = change(config)
    text = replaced if isinstance(replaced, str) else json.dumps(config)
    (folder / CONFIG_FILE).write_text(text)
    return folder


@pytest.fixture
def nothing_built(monkeypatch):
    """Building a model (even on the meta device) fails the test: every check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was refused")

    monkeypatch.setattr(models, "create_model", refuse)


def refused(load, folder: Path) -> str:
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as caught:
        load(folder)
    seconds = time.perf_counter() - start
    message = str(caught.value)
    assert seconds < CHECK_SECONDS, f"took {seconds:.2f} s"
    assert "\n" not in message and len(message) < 500, message[:1000]
    assert message.startswith(f"{folder / CONFIG_FILE}: "), message
    return message


@pytest.mark.parametrize("change, field", ANY_USE.values(), ids=ANY_USE.keys())
def test_load_checkpoint_refuses_absurd_settings_before_building(good, tmp_path, nothing_built, change, field):
    folder = hostile_copy(good, tmp_path / "ckpt", change)
    assert field in refused(load_checkpoint, folder)


@pytest.mark.parametrize("change, field", {**ANY_USE, **EVALUATION_ONLY}.values(),
                         ids={**ANY_USE, **EVALUATION_ONLY}.keys())
def test_evaluation_refuses_checkpoints_it_cannot_use_before_building(good, tmp_path, nothing_built, change,
                                                                      field):
    folder = hostile_copy(good, tmp_path / "ckpt", change)
    assert field in refused(lambda f: load_members([f], torch.device("cpu")), folder)


def test_export_refuses_settings_that_would_not_load(tmp_path):
    spec = ModelSpec("unet", "tu-mobilenetv3_small_050", in_channels=1)  # the preprocessing makes 3 channels
    with pytest.raises(ValueError, match="would not load: .*model.in_channels"):
        export_checkpoint(create_model(**spec.to_dict()), spec, tmp_path / "ckpt", GOOD_EXTRA)
    assert not (tmp_path / "ckpt").exists()


# --------------------------------------------------------------------------- the CLI

ADDRESS_SPACE = 4 << 30  # torch and the rest need about 3 GB of it; 10^8 classes alone would need 6 GB


def run_eval(command: str, checkpoint: Path, data: Path, out: Path) -> tuple[int, str, float]:
    """`liverseg-eval COMMAND` on CPU with a capped address space, in a process of its own:
    exit code, stderr and that process's peak resident memory in MB."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CUDA would reserve more address space than the cap
    done = run_python([*console_script("liverseg-eval"), command, "--checkpoint", checkpoint, "--data", data,
                       "--out", out], env=env, address_space=ADDRESS_SPACE)
    return done.returncode, done.stderr, done.peak_mb


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lits")
    write_blob_case(folder, 0)
    return folder


@pytest.fixture(scope="module")
def baseline_mb(data, tmp_path_factory) -> float:
    """The CLI's peak memory when it stops at a missing checkpoint: the libraries loaded
    (run_python's processes start with the model stack imported), nothing allocated."""
    code, _, peak = run_eval("run", Path("/nonexistent/checkpoint"), data, tmp_path_factory.mktemp("base") / "out")
    assert code == 1
    return peak


CLI_CASES = {
    "run, 10^8 classes": ("run", model_field("classes", 10**8), "model.classes"),
    "predict, 10^6 px slices": ("predict", preprocessing_field("size", 10**6), "preprocessing.size"),
}


@pytest.mark.parametrize("command, change, field", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_refuses_in_one_line_without_allocating(good, data, baseline_mb, tmp_path, command, change, field):
    folder = hostile_copy(good, tmp_path / "ckpt", change)
    code, stderr, peak_mb = run_eval(command, folder, data, tmp_path / "out")
    assert code == 1 and "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and f"{folder / CONFIG_FILE}: " in errors[0] and field in errors[0], stderr[-2000:]
    assert peak_mb < baseline_mb + 64, f"peak {peak_mb:.0f} MB, imports alone {baseline_mb:.0f} MB"
