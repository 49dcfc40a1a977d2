"""Training on CPU at tiny sizes: checkpoints, resume, two processes, W&B offline, divergence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liverseg import train as train_module
from liverseg.config import TrainConfig, load_config
from liverseg.errors import ConfigError
from liverseg.models import load_checkpoint
from liverseg.train import TrainingDiverged, lr_lambda, train
from shardgen.build import BuildConfig, build_shards
from shardgen.manifest import read_manifest
from shardgen.preprocess import Preprocessing

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards


def tiny(shards, out, **changes) -> TrainConfig:
    settings = dict(shards=str(shards), out=str(out), encoder="resnet18", steps=3, batch_size=2,
                    val_every=3, save_every=3, log_every=1, workers=0, shuffle_buffer=8, warmup_steps=2)
    return TrainConfig(**{**settings, **changes})


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["unet", "resunet"])
def test_tiny_training_exports_loadable_checkpoints(shards, tmp_path, arch):
    result = train(tiny(shards, tmp_path, arch=arch))
    assert result.step == 3 and set(result.last_metrics) >= {"val/dice_liver", "val/dice_tumour"}
    for name in ("best", "last"):
        model, config = load_checkpoint(tmp_path / name)
        assert config["model"]["arch"] == arch and config["model"]["in_channels"] == 3
        assert config["preprocessing"] == read_manifest(shards)["preprocessing"]
        assert config["train"]["encoder"] == "resnet18" and "val/dice_mean" in config["metrics"]
        manifest = read_manifest(shards)
        assert config["train_cases"] == sorted(s["case"] for s in manifest["shards"] if s["split"] == "train")
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    steps = [h["step"] for h in history(tmp_path) if "train/loss" in h]
    assert steps == [1, 2, 3]


def test_resume_continues_the_step_count_and_the_schedule(shards, tmp_path):
    train(tiny(shards, tmp_path, steps=2, save_every=2, val_every=2))
    config = tiny(shards, tmp_path, steps=4, save_every=2, val_every=2, resume="auto")
    result = train(config)
    logged = [h for h in history(tmp_path) if "train/lr" in h]
    assert result.step == 4 and [h["step"] for h in logged] == [1, 2, 3, 4]
    assert logged[-1]["train/lr"] == pytest.approx(config.lr * lr_lambda(config)(4))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


@pytest.mark.timeout(400)
def test_two_cpu_processes_on_uneven_shards_end_at_the_same_step(shards, tmp_path):
    sizes = {s["targets"] for s in read_manifest(shards)["shards"] if s["split"] == "train"}
    assert len(sizes) > 1, "the shards should differ in size for this test to mean something"
    command = ["accelerate", "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
               "--num_processes", "2", str(ROOT / "launch" / "train.py"), "--shards", str(shards),
               "--out", str(tmp_path), "--encoder", "resnet18", "--steps", "5", "--batch-size", "3",
               "--val-every", "5", "--save-every", "5", "--workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2 finished at step 5" in done.stdout and "rank 1/2 finished at step 5" in done.stdout


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
    ("missing shards", "out: o\n", "missing required settings ['shards']"),
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
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--shards",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot read manifest" in done.stderr and "liverseg-shards build --input" in done.stderr


def test_cli_reports_an_out_that_is_a_file_in_one_line(shards, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("kept")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--shards", str(shards),
                           "--out", str(taken), "--steps", "1", "--encoder", "resnet18"],
                          capture_output=True, text=True, timeout=300)
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


def test_ema_weights_are_validated_exported_and_resumed(shards, tmp_path):
    from safetensors.torch import load_file

    train(tiny(shards, tmp_path, steps=2, save_every=2, val_every=2, ema=0.9))
    result = train(tiny(shards, tmp_path, steps=4, save_every=2, val_every=2, ema=0.9, resume="auto"))
    assert result.step == 4
    checkpoint = tmp_path / "checkpoints" / "step-000004"
    raw = load_file(checkpoint / "model.safetensors")
    average = load_file(checkpoint / "ema.safetensors")
    assert int(average["n_averaged"]) == 4, "the average must carry on across the resume"
    exported, _ = load_checkpoint(tmp_path / "last")
    exported = exported.state_dict()
    differs = 0
    for name, value in raw.items():
        assert torch.equal(exported[name], average[f"module.{name}"]), name
        differs += not torch.equal(exported[name], value)
    assert differs > 0, "the exported weights should be the average, not the last step's"


def test_the_seed_fixes_the_initial_weights_and_so_the_whole_run(shards, tmp_path):
    from safetensors.torch import load_file

    for name, noise in (("a", 1), ("b", 2)):  # whatever state the global generators are left in
        torch.manual_seed(noise)
        train(tiny(shards, tmp_path / name, seed=3, workers=0))
    a, b = (load_file(tmp_path / name / "last" / "model.safetensors") for name in ("a", "b"))
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
