"""Training on CPU at tiny sizes: checkpoints, resume, two processes, W&B offline, divergence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liverseg import train as train_module
from liverseg.config import AugmentConfig, TrainConfig, load_config
from liverseg.errors import ConfigError
from liverseg.checkpoint import load_checkpoint
from liverseg.train import TrainingDiverged, lr_lambda, train
from shardgen.build import BuildConfig, build_shards
from shardgen.manifest import read_manifest
from shardgen.preprocess import Preprocessing

from conftest import TINY_TRAINING, run_python

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards


def tiny(shards, out, **changes) -> TrainConfig:
    return TrainConfig(**{"shards": str(shards), "out": str(out), **TINY_TRAINING, **changes})


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["unet", "resunet"])
def test_tiny_training_exports_loadable_checkpoints(shards, trained, arch):
    run, result = trained[arch]  # TINY_TRAINING
    assert result.step == 3 and set(result.last_metrics) >= {"val/dice_liver", "val/dice_tumour"}
    for name in ("best", "last"):
        model, config = load_checkpoint(run / name)
        assert config["model"]["arch"] == arch and config["model"]["in_channels"] == 3
        assert config["preprocessing"] == read_manifest(shards)["preprocessing"]
        assert config["train"]["encoder"] == TINY_TRAINING["encoder"] and "val/dice_mean" in config["metrics"]
        manifest = read_manifest(shards)
        assert config["train_cases"] == sorted(s["case"] for s in manifest["shards"] if s["split"] == "train")
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    steps = [h["step"] for h in history(run) if "train/loss" in h]
    assert steps == [1, 2, 3]


@pytest.fixture(scope="module")
def resumed(shards, tmp_path_factory) -> tuple[Path, TrainConfig, object]:
    """A run with EMA weights stopped after 2 of 4 steps and resumed: (run, config, result)."""
    run = tmp_path_factory.mktemp("resumed")
    train(tiny(shards, run, steps=2, save_every=2, val_every=2, ema=0.9))
    config = tiny(shards, run, steps=4, save_every=2, val_every=2, ema=0.9, resume="auto")
    return run, config, train(config)


def test_resume_continues_the_step_count_and_the_schedule(resumed):
    run, config, result = resumed
    logged = [h for h in history(run) if "train/lr" in h]
    assert result.step == 4 and [h["step"] for h in logged] == [1, 2, 3, 4]
    assert logged[-1]["train/lr"] == pytest.approx(config.lr * lr_lambda(config)(4))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_wandb_without_a_key_runs_offline_and_records_metrics(shards, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    train(tiny(shards, tmp_path / "run", steps=2, val_every=2, save_every=2, report_to="wandb"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "no offline W&B run was written"
    # the run file holds each history item as its key and JSON value: look for ours
    raw = runs[0].read_bytes()
    logged = {k: v for h in history(tmp_path / "run") for k, v in h.items() if k != "step"}
    for key in ("val/dice_liver", "val/dice_tumour", "train/loss", "train/lr"):
        assert key.encode() in raw and json.dumps(logged[key]).encode() in raw, key
    assert list(runs[0].parent.glob("files/media/images/val/overlays_*.png"))


class NaNLoss(torch.nn.Module):
    def forward(self, logits, target):
        return logits.sum() * float("nan")


def test_non_finite_steps_are_skipped_then_abort(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "build_loss", lambda config: NaNLoss())
    with pytest.raises(TrainingDiverged, match="2 steps in a row had non-finite"):
        train(tiny(shards, tmp_path, steps=5, max_nonfinite=2))


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shards: s\nout: o\narch: resunet\nsteps: 50\naugment: {flip_lr: 0.0}\n"
                    "class_weights: [1, 1, 4]\ndecoder_channels: [64, 32, 16, 16, 16]\n")
    config = load_config(path, steps=70, lr=None)
    assert (config.arch, config.steps, config.augment.flip_lr) == ("resunet", 70, 0.0)
    assert config.class_weights == (1, 1, 4) and config.decoder_channels == (64, 32, 16, 16, 16)


@pytest.mark.parametrize("name, text, message", [
    ("unknown setting", "shards: s\nout: o\nepochs: 3\n", "unknown training settings ['epochs']"),
    ("missing shards", "out: o\n", "missing required training settings ['shards']"),
    ("bad precision", "shards: s\nout: o\nprecision: fp8\n", "precision must be one of"),
    ("not a mapping", "- a\n- b\n", "must be a mapping"),
    ("two class weights", "shards: s\nout: o\nclass_weights: [1, 4]\n", "class_weights must be 3 positive"),
])
def test_bad_config_is_one_line(tmp_path, name, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_cli_reports_a_missing_shard_folder_in_one_line(tmp_path):
    done = run_python([ROOT / "launch" / "train.py", "--shards", tmp_path / "nowhere", "--out", tmp_path / "o"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot read manifest" in done.stderr and "liverseg-shards build --input" in done.stderr


def test_cli_reports_an_out_that_is_a_file_in_one_line(shards, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("kept")
    done = run_python([ROOT / "launch" / "train.py", "--shards", shards, "--out", taken, "--steps", "1",
                       "--encoder", "resnet18"])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"Error: {taken}: is a file, not a folder" in done.stderr and taken.read_text() == "kept"


def test_ema_update_follows_its_rule_and_copies_integer_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    average = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=train_module.ema_update(0.5), use_buffers=True)
    expected = None
    for n, value in enumerate([1.0, 3.0, 7.0, 15.0]):  # n: updates so far
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(value)
        net[1].num_batches_tracked.fill_(n + 10)
        average.update_parameters(net)
        d = min(0.5, (1 + n) / (10 + n))  # the first update copies
        expected = value if expected is None else d * expected + (1 - d) * value
        for p in average.module.parameters():
            assert torch.allclose(p, torch.full_like(p, expected)), (n, p, expected)
        assert int(average.module[1].num_batches_tracked) == n + 10
    assert expected == pytest.approx(12.2028, abs=1e-4)  # 1 → 2/11 … → 4/13: worked by hand


def test_ema_weights_are_validated_exported_and_resumed(resumed):
    from safetensors.torch import load_file

    run, _, result = resumed
    assert result.step == 4
    checkpoint = run / "checkpoints" / "step-000004"
    raw = load_file(checkpoint / "model.safetensors")
    average = load_file(checkpoint / "ema.safetensors")
    assert int(average["n_averaged"]) == 4, "the average must carry on across the resume"
    exported, _ = load_checkpoint(run / "last")
    exported = exported.state_dict()
    differs = 0
    for name, value in raw.items():
        assert torch.equal(exported[name], average[f"module.{name}"]), name
        differs += not torch.equal(exported[name], value)
    assert differs > 0, "the exported weights should be the average, not the last step's"


def test_the_seed_fixes_the_initial_weights_and_so_the_whole_run(shards, trained, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(2)  # whatever state the global generators are left in: another than before
    train(tiny(shards, tmp_path, arch="resunet", augment=AugmentConfig(flip_lr=0.0)))  # trained["resunet"]
    a, b = (load_file(run / "last" / "model.safetensors") for run in (trained["resunet"][0], tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_help_and_config_checks_need_no_torch():
    script = ROOT / "launch" / "train.py"
    code = ("import runpy, sys\n"
            f"sys.argv = [{str(script)!r}, '--help']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "from liverseg.config import AugmentConfig, TrainConfig\n"
            "TrainConfig(shards='s', out='o', augment=AugmentConfig(crop=64))\n"
            "print('TORCH', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--config" in done.stdout and "TORCH False" in done.stdout, done.stdout + done.stderr


def test_without_validation_shards_training_warns_and_exports_no_best(phantom_dir, tmp_path, capsys):
    shards = tmp_path / "shards"
    build_shards(BuildConfig(inputs=(phantom_dir,), out=shards, preprocessing=Preprocessing(size=64),
                             fractions=(1.0, 0.0, 0.0)))
    result = train(tiny(shards, tmp_path / "run", steps=1, val_every=1, save_every=1))
    assert "has no validation shards: validation is skipped" in capsys.readouterr().out
    assert result.best == {} and result.last_metrics == {}
    assert (tmp_path / "run" / "last").is_dir() and not (tmp_path / "run" / "best").exists()
    assert not [h for h in history(tmp_path / "run") if "val/dice_mean" in h]


def test_the_trackers_training_uses_load_no_matplotlib():
    # matplotlib (0.5-0.7 s per process) is evaluation's: every training rank would pay it
    code = "import sys, liverseg.tracking; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
