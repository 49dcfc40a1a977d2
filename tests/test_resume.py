"""Resume is exact: a run killed (SIGKILL) at any step, or in the middle of a save, and
resumed takes the same samples in the same order as a run never stopped, and ends with
bit-identical weights (CPU, same machine). Checkpoints hold nothing that unpickles code."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from liverseg.config import TrainConfig
from liverseg.errors import LiversegError
from liverseg.train import complete_checkpoints, train

from conftest import built_once, run_python

ROOT = Path(__file__).resolve().parents[1]
STEPS = 9
# A small model: each run saves five checkpoints (weights, optimizer, EMA), and resuming
# exactly does not depend on the model's size
ENCODER, DECODER = "tu-mobilenetv3_small_050", (32, 16, 16, 8, 8)

# Runs launch/train.py's command in this process, after arranging a SIGKILL of the whole
# process (its loader workers die with it) at a chosen point: during the forward pass of
# optimizer step K, or inside the save of step K, after Accelerate wrote its files and
# before the checkpoint is complete.
DRIVER = """
import os, signal, sys
import accelerate
from liverseg import train as train_module

where, at = sys.argv[1], int(sys.argv[2])
sys.argv = ["train.py", *sys.argv[3:]]
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "step":
    original = train_module.train_step
    def train_step(loop, batches):
        calls["n"] += 1
        if calls["n"] == at:
            die()
        return original(loop, batches)
    train_module.train_step = train_step
else:
    original = accelerate.Accelerator.save_state
    def save_state(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at:
            die()
    accelerate.Accelerator.save_state = save_state

import runpy
runpy.run_path(SCRIPT, run_name="__main__")
"""


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards


def flags(shards: Path, out: Path, **changes) -> list[str]:
    settings = {"shards": shards, "out": out, "encoder": ENCODER, "steps": STEPS, "batch-size": 2,
                "val-every": 4, "save-every": 2, "workers": 2, "seed": 5, **changes}
    args = [f"--{k}={v}" for k, v in settings.items()]
    config = out.parent / f"{out.name}.yaml"
    config.write_text("shuffle_buffer: 6\nlog_every: 1\ntrace_samples: true\nwarmup_steps: 2\n"
                      f"oversample_tumour: 0.5\nema: 0.9\ndecoder_channels: {list(DECODER)}\n")
    return [*args, f"--config={config}"]


def run_cli(args: list[str], kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    script = str(ROOT / "launch" / "train.py")
    if kill is None:
        command = [script, *args]
    else:
        command = ["-c", DRIVER.replace("SCRIPT", repr(script)), kill[0], str(kill[1]), *args]
    return run_python(command, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})


def weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(run / name / "model.safetensors")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    """The run never stopped, once per test run (the slow tests that use it run first, the
    others later, often in the other xdist worker); tests that change it copy it first."""
    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        done = run_cli(flags(shards, folder / "run"))
        assert done.returncode == 0, done.stderr[-3000:]

    return built_once(tmp_path_factory, "resume-uninterrupted", build) / "run"


def assert_same_run(run: Path, reference: Path) -> None:
    assert lines(run / "samples.jsonl") == lines(reference / "samples.jsonl")
    steps = [h["step"] for h in lines(run / "history.jsonl") if "train/loss" in h]
    assert steps == list(range(1, STEPS + 1)), "each step is logged once"
    for name in ("last", "best"):
        a, b = weights(run, name), weights(reference, name)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


# seeded, so a failure can be rerun; the step differs from checkpoint boundaries on purpose
KILL_STEPS = random.Random(2026).sample(range(2, STEPS + 1), 2)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [("step", k) for k in KILL_STEPS] + [("save", 2)],
                         ids=lambda k: f"{k[0]}-{k[1]}")
def test_killed_run_resumes_exactly(shards, uninterrupted, tmp_path, kill):
    out = tmp_path / "run"
    killed = run_cli(flags(shards, out), kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if kill[0] == "save":
        partial = list((out / "checkpoints").glob(".step-*.partial"))
        assert partial, "the kill should have left a half-written save behind"
    resumed = run_cli(flags(shards, out, resume="auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, uninterrupted)
    assert not list((out / "checkpoints").glob(".*")), "half-written saves are cleared"
    names = [p.name for p in complete_checkpoints(out)]
    assert names == [f"step-{s:06d}" for s in (6, 8, 9)], names  # keep_checkpoints: 3


def test_checkpoint_folders_hold_no_pickle_of_ours(uninterrupted):
    folder = complete_checkpoints(uninterrupted)[-1]
    files = sorted(p.name for p in folder.iterdir())
    assert not [f for f in files if f.startswith("custom_checkpoint")], files
    assert {"train_state.json", "data_position_0.json", "rank_state_0.safetensors",
            "ema.safetensors", "model.safetensors"} <= set(files)
    position = json.loads((folder / "data_position_0.json").read_text())
    assert position["consumed"] == STEPS and len(position["cursors"]) == 2


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/liverseg-resume-pwned")


@pytest.mark.parametrize("victim", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_pickle_payload_in_a_checkpoint_never_runs(shards, uninterrupted, tmp_path, victim):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    folder = complete_checkpoints(run)[-1]
    MARKER.unlink(missing_ok=True)
    with open(folder / victim, "wb") as f:
        torch.save({"state": Payload()}, f) if victim != "random_states_0.pkl" else pickle.dump(Payload(), f)
    config = TrainConfig(shards=str(shards), out=str(run), encoder=ENCODER, decoder_channels=DECODER,
                         steps=STEPS + 1, batch_size=2, workers=0, resume="auto", seed=5)
    with pytest.raises(LiversegError, match=f"{folder.name}: cannot resume from this checkpoint"):
        train(config)
    assert not MARKER.exists(), "the payload ran"


def test_a_folder_without_its_state_is_not_resumed_from(shards, tmp_path):
    broken = tmp_path / "checkpoints" / "step-000004"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"half")
    config = TrainConfig(shards=str(shards), out=str(tmp_path), encoder=ENCODER, decoder_channels=DECODER,
                         steps=1, batch_size=2, workers=0, resume=str(broken))
    with pytest.raises(LiversegError, match="not a complete liverseg checkpoint"):
        train(config)
    assert complete_checkpoints(tmp_path) == []


@pytest.mark.parametrize("text", ['{"consumed": "9"}', '[1, 2]', '{"consumed": 9, "cursors": [[0, 1]], "skipped": [0]}'])
def test_a_malformed_data_position_is_one_line_naming_the_file(shards, uninterrupted, tmp_path, text):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    folder = complete_checkpoints(run)[-1]
    (folder / "data_position_0.json").write_text(text)
    config = TrainConfig(shards=str(shards), out=str(run), encoder=ENCODER, decoder_channels=DECODER,
                         steps=STEPS + 1, batch_size=2, workers=0, resume="auto", seed=5)
    with pytest.raises(LiversegError, match="data_position_0.json: not a data position written by liverseg"):
        train(config)
