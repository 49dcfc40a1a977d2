"""Model registry, ResUNet structure, error messages and the safetensors checkpoint folder."""

from __future__ import annotations

import json
import pickle
import shutil
import urllib.error
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn

from liverseg import models, resunet
from liverseg.checkpoint import CONFIG_FILE, MODEL_FILE, ModelSpec, export_checkpoint, load_checkpoint
from liverseg.errors import CheckpointError, ConfigError, LiversegError
from liverseg.models import ARCHITECTURES, create_model
from liverseg.resunet import DecoderStage, ResidualUnit, ResUNet

ENCODER = "resnet18"
# where the encoder does not matter: 4 MB of weights to write and read back instead of 45
SMALL = "tu-mobilenetv3_small_050"
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(in_channels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, in_channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- every architecture

# (arch, attention, in_channels, encoder, parameters smp leaves without gradient): those
# need find_unused_parameters=True under DDP. smp's Unet gives its last block (which has no
# skip) an unused scSE; PSPNet uses depth 3 but keeps the encoder's deeper stages (resnet18's
# layer3/layer4, mobilenetv3's blocks 2-). The small encoder where the encoder does not
# matter: a third of resnet18's time per case.
# pan is left out: its pyramid pools the stride-32 map below 1 px unless inputs are >= 128 px.
BASE_CASES = [
    *[(arch, attention, c, SMALL, ()) for arch, attention in
      (("unet", None), ("resunet", None), ("resunet", "scse"), ("unetplusplus", None), ("fpn", None))
      for c in (1, 3)],
    ("unet", "scse", 1, SMALL, ("decoder.blocks.4.attention1.",)),
    ("pspnet", None, 1, ENCODER, ("encoder.layer3.", "encoder.layer4.")),
    ("pspnet", None, 1, SMALL, tuple(f"encoder.model.blocks.{i}." for i in range(2, 6))),
    ("linknet", None, 1, SMALL, ()), ("manet", None, 1, SMALL, ()), ("deeplabv3plus", None, 1, SMALL, ()),
    ("upernet", None, 1, SMALL, ()), ("segformer", None, 1, SMALL, ()),
]


@pytest.mark.parametrize("arch, attention, in_channels, encoder, unused", BASE_CASES,
                         ids=[f"{a}-{att or 'plain'}-in{c}-{e}" for a, att, c, e, _ in BASE_CASES])
def test_architecture(arch, attention, in_channels, encoder, unused):
    torch.manual_seed(0)
    model = create_model(arch, encoder, in_channels=in_channels, classes=3, attention=attention)
    x = batch(in_channels)

    out = model.train()(x)
    assert out.shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(out).all()

    (out * torch.randn_like(out)).sum().backward()
    no_grad = sorted(name for name, p in model.named_parameters() if p.grad is None)
    assert no_grad == sorted(name for name, _ in model.named_parameters() if name.startswith(unused))
    for part in (model.encoder, model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())

    # float64, so the tolerance measures layout bugs rather than float32 summation order; one
    # sample (in eval mode the samples do not interact), as float64 convolutions are slow
    model, x = model.eval().double(), x[:1].double()
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_registry_holds_resunet_and_every_smp_architecture():
    assert set(smp.MODEL_ARCHITECTURES_MAPPING) <= set(ARCHITECTURES)
    assert ARCHITECTURES["unet"] is smp.Unet
    assert ARCHITECTURES["resunet"] is ResUNet


def test_resunet_compiles_as_one_graph():
    # fullgraph=True fails on any graph break; the eager backend keeps it fast on CPU
    model = create_model("resunet", ENCODER, attention="scse").eval()
    x = batch(3)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_resunet_refuses_sizes_not_divisible_by_32():
    with pytest.raises(ValueError, match="divisible by 32"):
        create_model("resunet", ENCODER)(torch.zeros(1, 3, 48, 64))


# --------------------------------------------------------------------------- ResUNet structure

STRUCTURE_CASES = {
    # decoder channels: which stages (0 = deepest) have an identity shortcut, for resnet18
    "default channels: all projections": ((256, 128, 64, 32, 16), []),
    "equal last stage: identity there": ((256, 128, 64, 32, 32), [4]),
}


@pytest.mark.parametrize("decoder_channels, identity_stages", STRUCTURE_CASES.values(),
                         ids=STRUCTURE_CASES.keys())
def test_every_stage_has_a_residual_unit_with_the_right_shortcut(decoder_channels, identity_stages):
    model = ResUNet(ENCODER, decoder_channels=decoder_channels)
    stages = model.decoder.stages
    assert len(stages) == 5
    for index, stage in enumerate(stages):
        unit = stage.unit
        assert isinstance(unit, ResidualUnit)
        in_channels, out_channels = unit.residual[0].in_channels, unit.residual[-1].num_features
        assert out_channels == decoder_channels[index]
        if index in identity_stages:
            assert in_channels == out_channels and isinstance(unit.shortcut, nn.Identity)
        else:
            conv = unit.shortcut[0]
            assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
            assert (conv.in_channels, conv.out_channels) == (in_channels, out_channels)


def test_scse_follows_every_stage_only_when_asked():
    plain = create_model("resunet", ENCODER)
    attended = create_model("resunet", ENCODER, attention="scse")
    assert all(isinstance(s.attention, nn.Identity) for s in plain.decoder.stages)
    assert all(isinstance(s.attention, resunet.SCSE) for s in attended.decoder.stages)


SHORTCUT_CASES = {
    "projection (skip concatenated)": (8, 4, 6),
    "identity (no skip)": (8, 0, 8),
}


@pytest.mark.parametrize("in_channels, skip_channels, out_channels", SHORTCUT_CASES.values(),
                         ids=SHORTCUT_CASES.keys())
def test_stage_adds_the_shortcut(in_channels, skip_channels, out_channels):
    torch.manual_seed(0)
    stage = DecoderStage(in_channels, skip_channels, out_channels).eval()
    x = torch.randn(2, in_channels, 8, 8)
    skip = torch.randn(2, skip_channels, 16, 16) if skip_channels else None
    joined = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    if skip is not None:
        joined = torch.cat([joined, skip], dim=1)
    with torch.no_grad():
        shortcut_only = torch.relu(stage.unit.shortcut(joined))
        assert shortcut_only.abs().sum() > 0
        assert not torch.allclose(stage(x, skip), shortcut_only)  # the residual branch counts...
        last_bn = stage.unit.residual[-1]
        last_bn.weight.zero_()
        last_bn.bias.zero_()
        torch.testing.assert_close(stage(x, skip), shortcut_only)  # ...and the shortcut is added


# --------------------------------------------------------------------------- errors a user can make

ERROR_CASES = {
    "unknown arch lists the valid ones": (
        dict(arch="unett"), ["unknown architecture 'unett'", "did you mean 'unet'", "resunet", "fpn"]),
    "unknown encoder points to smp's list": (
        dict(arch="unet", encoder="resnet35"),
        ["unknown encoder 'resnet35'", "resnet34", "tu-<name>", "get_encoder_names()"]),
    "unknown attention": (
        dict(arch="unet", encoder=ENCODER, attention="cbam"), ["unknown attention 'cbam'", "scse"]),
    "attention the architecture lacks": (
        dict(arch="fpn", encoder=ENCODER, attention="scse"),
        ["fpn has no decoder attention", "resunet", "unet"]),
    "weights the encoder lacks": (
        dict(arch="unet", encoder=ENCODER, encoder_weights="instagram"),
        ["resnet18 has no 'instagram' weights", "imagenet"]),
    "arch refusing the encoder": (
        dict(arch="dpt", encoder=ENCODER), ["dpt cannot be built with encoder resnet18"]),
}


@pytest.mark.parametrize("kwargs, fragments", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_config_errors_explain_themselves_in_one_line(kwargs, fragments):
    with pytest.raises(ConfigError) as caught:
        create_model(**kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("encoder", models.EXAMPLE_ENCODERS)
def test_encoders_offered_as_examples_exist(encoder):
    models._check_encoder(encoder)


OFFLINE_ERRORS = {
    "urllib": urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
    "huggingface offline": LocalEntryNotFoundError("cannot reach the Hub"),
}


@pytest.mark.parametrize("arch", ["unet", "resunet"])
@pytest.mark.parametrize("error", OFFLINE_ERRORS.values(), ids=OFFLINE_ERRORS.keys())
def test_imagenet_without_network_says_what_to_do(monkeypatch, arch, error):
    calls = []

    def unreachable(*args, **kwargs):
        calls.append(args)
        raise error

    monkeypatch.setattr(smp.encoders, "hf_hub_download", unreachable)
    with pytest.raises(ConfigError) as caught:
        create_model(arch, ENCODER, encoder_weights="imagenet")
    assert calls, "the download function was not the one patched"
    assert str(caught.value) == ("could not fetch imagenet weights for resnet18 (no network?); "
                                 "use encoder weights none")


def test_our_errors_share_one_base():
    assert issubclass(ConfigError, LiversegError) and issubclass(CheckpointError, LiversegError)


# --------------------------------------------------------------------------- checkpoints

def extra(in_channels: int = 3) -> dict:
    """What train.py records beside the spec; the preprocessing makes ``in_channels`` channels
    (export and load refuse a checkpoint whose model and preprocessing disagree)."""
    return {"preprocessing": {"window": [-100, 240], "size": 64, "context": (in_channels - 1) // 2}, "step": 7,
            "train": {"lr": 0.001}, "metrics": {"dice_liver": 0.91, "dice_tumour": None}}


def trained_model(spec: ModelSpec) -> nn.Module:
    """A model whose BatchNorm running statistics differ from their initial values."""
    torch.manual_seed(1)
    model = create_model(**spec.to_dict())
    with torch.no_grad():
        model.train()(batch(spec.in_channels, seed=1) + 0.5)
    return model.eval()


ROUND_TRIP_SPECS = {
    "resunet scse, 1 channel": ModelSpec("resunet", ENCODER, in_channels=1, classes=3, attention="scse"),
    "unet, 3 channels": ModelSpec("unet", ENCODER, in_channels=3, classes=3),
    # the CPU demo's models: a timm encoder through smp's tu- prefix, a narrow decoder
    **{f"{arch}, tu-regnetx_002, narrow": ModelSpec(arch, "tu-regnetx_002", in_channels=3, classes=3,
                                                    decoder_channels=(64, 32, 16, 16, 16))
       for arch in ("unet", "resunet")},
}


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS.values(), ids=ROUND_TRIP_SPECS.keys())
def test_round_trip_gives_identical_logits_and_config(tmp_path, spec):
    model = trained_model(spec)
    x = batch(spec.in_channels, seed=2)
    with torch.no_grad():
        expected = model(x)
    assert export_checkpoint(model, spec, tmp_path / "ckpt", extra(spec.in_channels)) == tmp_path / "ckpt"
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    written = {"model": spec.to_dict(), **extra(spec.in_channels)}
    assert config == json.loads(json.dumps(written))  # tuples come back as lists
    assert ModelSpec.from_dict(config["model"]) == spec
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_FILE, MODEL_FILE]


def test_export_over_an_old_checkpoint_replaces_both_files(tmp_path):
    spec = ModelSpec("resunet", SMALL)
    export_checkpoint(trained_model(spec), spec, tmp_path, {"step": 1})
    newer = create_model(**spec.to_dict())
    export_checkpoint(newer, spec, tmp_path, {"step": 2})
    loaded, config = load_checkpoint(tmp_path)
    assert config["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                  newer.state_dict().values()))
    assert not list(tmp_path.glob("*.tmp"))


WRAPPERS = {
    "DataParallel (like DDP)": nn.DataParallel,
    "torch.compile": torch.compile,
    "compiled DataParallel": lambda m: torch.compile(nn.DataParallel(m)),
}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
def test_export_unwraps_wrappers(tmp_path, wrap):
    spec = ModelSpec("resunet", SMALL)
    model = trained_model(spec)
    export_checkpoint(wrap(model), spec, tmp_path, {})
    keys = load_file(str(tmp_path / MODEL_FILE)).keys()
    assert set(keys) == set(model.state_dict())
    load_checkpoint(tmp_path)


def test_export_saves_shared_tensors_under_every_name(tmp_path):
    spec = ModelSpec("resunet", SMALL)
    model = trained_model(spec)
    unit = model.decoder.stages[3].unit  # two 32-channel BatchNorms: tie their weights
    unit.residual[4].weight = unit.residual[1].weight
    x = batch(3, seed=3)
    with torch.no_grad():
        expected = model(x)
    export_checkpoint(model, spec, tmp_path, {})
    loaded, _ = load_checkpoint(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


EXPORT_REFUSALS = {
    "spec that does not describe the model": (ModelSpec("resunet", SMALL, classes=2), {}, "shape-mismatched"),
    "extra that would hide the spec": (ModelSpec("resunet", SMALL), {"model": "x"}, "'model' key"),
}


@pytest.mark.parametrize("spec, extra, fragment", EXPORT_REFUSALS.values(), ids=EXPORT_REFUSALS.keys())
def test_export_refuses_before_writing(tmp_path, spec, extra, fragment):
    with pytest.raises(ValueError, match=fragment):
        export_checkpoint(create_model("resunet", SMALL), spec, tmp_path / "ckpt", extra)
    assert not (tmp_path / "ckpt").exists()


def test_load_never_unpickles(tmp_path, monkeypatch):
    spec = ModelSpec("resunet", SMALL)
    export_checkpoint(trained_model(spec), spec, tmp_path, extra())

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    for module, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"),
                         (pickle, "loads")):
        monkeypatch.setattr(module, name, forbidden)
    load_checkpoint(tmp_path)


# --- damaged checkpoints: each row damages a good folder and names the file the error must name

def _rewrite_config(folder: Path, change) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    change(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / MODEL_FILE))
    change(tensors)
    save_file(tensors, str(folder / MODEL_FILE))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "folder missing": (lambda f: shutil.rmtree(f), "", "checkpoint folder not found"),
    "config missing": (lambda f: (f / CONFIG_FILE).unlink(), CONFIG_FILE, "not found"),
    "config not JSON": (lambda f: (f / CONFIG_FILE).write_text("{step: 1"), CONFIG_FILE, "invalid JSON"),
    "config without model": (
        lambda f: _rewrite_config(f, lambda c: c.pop("model")), CONFIG_FILE, '"model"'),
    "config naming an unknown arch": (
        lambda f: _rewrite_config(f, lambda c: c["model"].update(arch="vnet")), CONFIG_FILE,
        "unknown architecture 'vnet'"),
    "config with an unknown setting": (
        lambda f: _rewrite_config(f, lambda c: c["model"].update(depth=5)), CONFIG_FILE,
        "unknown model settings ['depth']"),
    "config with a mistyped setting": (
        lambda f: _rewrite_config(f, lambda c: c["model"].update(classes="3")), CONFIG_FILE,
        "invalid model.classes"),
    "weights missing": (lambda f: (f / MODEL_FILE).unlink(), MODEL_FILE, "not found"),
    "weights truncated": (lambda f: _truncate(f / MODEL_FILE), MODEL_FILE, "not a readable safetensors"),
    "weights not safetensors": (
        lambda f: (f / MODEL_FILE).write_bytes(b"\x80\x04 a pickle, say"), MODEL_FILE,
        "not a readable safetensors"),
    "weights for another class count": (
        lambda f: _rewrite_config(f, lambda c: c["model"].update(classes=2)), MODEL_FILE,
        "shape-mismatched 2 keys ['segmentation_head.bias', 'segmentation_head.weight']"),
    "weights lacking a key": (
        lambda f: _rewrite_weights(f, lambda t: t.pop("segmentation_head.bias")), MODEL_FILE,
        "missing 1 keys ['segmentation_head.bias']"),
    "weights with an extra key": (
        lambda f: _rewrite_weights(f, lambda t: t.update(stray=torch.zeros(1))), MODEL_FILE,
        "unexpected 1 keys ['stray']"),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    # a small timm encoder keeps the thirteen copies of the folder cheap
    spec = ModelSpec("resunet", "tu-mobilenetv3_small_050", in_channels=1)
    folder = tmp_path_factory.mktemp("good") / "ckpt"
    export_checkpoint(create_model(**spec.to_dict()), spec, folder, extra(spec.in_channels))
    return folder


@pytest.mark.parametrize("damage, file_name, fragment", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_checkpoint_raises_naming_the_file(tmp_path, good_checkpoint, damage, file_name,
                                                   fragment):
    folder = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, folder)
    load_checkpoint(folder)  # the copy is good before the damage
    damage(folder)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(folder / file_name) if file_name else str(folder))
    assert fragment in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoint_loads_onto_the_gpu(good_checkpoint):
    model, _ = load_checkpoint(good_checkpoint, map_location="cuda")
    assert all(p.is_cuda for p in model.parameters())
    assert model(torch.zeros(2, 1, SIZE, SIZE, device="cuda")).shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("arch", ["unet", "resunet"])
def test_decoder_channels_narrow_the_decoder_and_survive_a_checkpoint(tmp_path, arch):
    narrow = create_model(arch, SMALL, 3, 3, decoder_channels=(64, 32, 16, 16, 16))
    wide = create_model(arch, SMALL, 3, 3)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(narrow) < count(wide)
    spec = ModelSpec(arch, SMALL, 3, 3, decoder_channels=(64, 32, 16, 16, 16))
    export_checkpoint(narrow, spec, tmp_path, {})
    model, config = load_checkpoint(tmp_path)
    assert config["model"]["decoder_channels"] == [64, 32, 16, 16, 16]
    x = torch.zeros(1, 3, 64, 64)
    assert torch.equal(model(x), narrow.eval()(x))


@pytest.mark.parametrize("arch, fragment", [("fpn", "no decoder_channels"), ("deeplabv3", "one decoder width"),
                                             ("upernet", "one decoder width")])
def test_decoder_channels_on_an_architecture_without_them_is_a_config_error(arch, fragment):
    with pytest.raises(ConfigError, match=fragment):
        create_model(arch, "resnet18", 3, 3, decoder_channels=(64, 32, 16, 16, 16))
