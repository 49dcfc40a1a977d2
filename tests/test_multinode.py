"""accelerate_configs/multi_node.yaml, proven on one machine: two launchers on localhost
(machine ranks 0 and 1, one CPU process each, gloo) train exactly what one launcher with
two processes trains; and on shards that two ranks cannot share equally, every rank of
either run ends at the same step.

Only train.py's command line is relied on: the flags, the ``last/`` export and the
"rank R/W finished at step S" line every rank prints.
"""

from __future__ import annotations

import os
import re
import multiprocessing
import socket
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from shardgen.build import BuildConfig, build_shards
from shardgen.manifest import read_manifest
from shardgen.phantom import write_phantoms
from shardgen.preprocess import Preprocessing

from conftest import accelerate_launch, start_python

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "accelerate_configs" / "multi_node.yaml"
STEPS = 4
# validation and save_state at step 2 too: both collectives and the shared run folder mid-run;
# a small encoder, as what is checked does not depend on the model's size
TRAIN_FLAGS = ["--encoder", "tu-mobilenetv3_small_050", "--steps", str(STEPS), "--batch-size", "2", "--val-every", "2",
               "--save-every", "2", "--workers", "1", "--seed", "5"]
LAUNCH_TIMEOUT_S = 240  # a launcher waiting for a partner that never comes must not block CI
FINISHED = re.compile(r"rank (\d+)/(\d+) finished at step (\d+)")


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """Cases of different depths: three training shards of 7, 8 and 10 slices and two
    validation shards of 16 and 7. Both totals are odd, so however the shards (or their
    slices) are dealt to two ranks, the ranks hold different sample counts."""
    phantoms = tmp_path_factory.mktemp("phantoms")
    write_phantoms(phantoms, 5, seed=3, size=64, slices=(6, 16))
    out = tmp_path_factory.mktemp("multinode-shards")
    build_shards(BuildConfig(inputs=(phantoms,), out=out, preprocessing=Preprocessing(size=64),
                             fractions=(0.6, 0.4, 0.0)))
    return out


def free_ports(count: int) -> list[int]:
    """Ports free now, all different (each held until all are found)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def machine_flags(machines: int, rank: int, port: int) -> list[str]:
    # --num_processes counts every machine's processes: one each here
    return ["--num_machines", str(machines), "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]


def launch_env() -> dict[str, str]:
    # CPU even where a GPU exists (two "machines" on one GPU would share cuda:0), one
    # thread per process: the same arithmetic in both runs, and 2 cores are not oversubscribed
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def start(machine_flags: list[str], shards: Path, out: Path, log: Path) -> multiprocessing.Process:
    """One `accelerate launch` of launch/train.py, as one machine would run it; its output
    goes to a file, not a pipe (a full pipe would stall the launcher)."""
    command = accelerate_launch("--config_file", CONFIG, *machine_flags, ROOT / "launch" / "train.py",
                                "--shards", shards, "--out", out, *TRAIN_FLAGS)
    return start_python(command, out=log, env=launch_env())


def stop(process: multiprocessing.Process) -> None:
    """Kill a launcher, if still running, and every process it started. torchrun puts
    each worker in a session of its own, so killing a process group would miss them."""
    if process.exitcode is not None:
        return
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for proc in [process, *tree]:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):  # ended meanwhile
            pass
    process.join()


def run_all(launches: list[tuple[list[str], Path, Path]], shards: Path) -> list[str]:
    """Start every launcher at once and wait for all; at the deadline, or as soon as one
    fails (its partner would wait for it until the deadline), kill them all. Returns the
    logs; asserts each launcher exited 0."""
    processes = [start(flags, shards, out, log) for flags, out, log in launches]
    try:
        wait_all(processes, time.monotonic() + LAUNCH_TIMEOUT_S)
    finally:
        for process in processes:
            stop(process)
    logs = [log.read_text(errors="replace") for _, _, log in launches]
    for process, log in zip(processes, logs):
        assert process.exitcode == 0, f"exit {process.exitcode} (negative: killed):\n{log[-3000:]}"
    return logs


def wait_all(processes: list[multiprocessing.Process], deadline: float) -> None:
    while time.monotonic() < deadline:
        codes = [process.exitcode for process in processes]
        if all(code == 0 for code in codes) or any(code not in (None, 0) for code in codes):
            return
        time.sleep(0.5)


def finished(log: str) -> set[tuple[int, int, int]]:
    return {tuple(map(int, m)) for m in FINISHED.findall(log)}


def exported(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "last" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_two_machines_on_localhost_train_what_one_machine_with_two_processes_trains(uneven_shards, tmp_path):
    shards = read_manifest(uneven_shards)["shards"]
    for split in ("train", "val"):
        total = sum(s["targets"] for s in shards if s["split"] == split)
        assert total % 2, f"{split}: an even total could be shared equally"

    port, single_port = free_ports(2)
    # all three launchers at once: on 2 cores the runs' start-ups (imports) then overlap
    logs = run_all([(machine_flags(2, 0, port), tmp_path / "two-machines", tmp_path / "machine-0.log"),
                    (machine_flags(2, 1, port), tmp_path / "two-machines", tmp_path / "machine-1.log"),
                    (machine_flags(1, 0, single_port), tmp_path / "one-machine", tmp_path / "one-machine.log")],
                   uneven_shards)
    # each machine's launcher shows its own rank: machine_rank decided the global rank; the
    # ranks of both runs hold different sample counts yet all end at the same step
    assert [finished(log) for log in logs] == [{(0, 2, STEPS)}, {(1, 2, STEPS)},
                                               {(0, 2, STEPS), (1, 2, STEPS)}], logs

    # Bit-identical, not merely close: the global ranks, world size, seed and hence every
    # rank's data and augmentation are the same; DDP's all-reduce of two ranks adds two
    # numbers, which is exact in either order; every process runs one thread in both runs.
    two, one = exported(tmp_path / "two-machines"), exported(tmp_path / "one-machine")
    assert two.keys() == one.keys()
    differing = [name for name in one if not torch.equal(one[name], two[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
