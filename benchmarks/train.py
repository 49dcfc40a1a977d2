"""Training: throughput on a GPU, seconds per step on a CPU, batch augmentation with
windows, the start-up and exit of a fresh training process (docs/PERFORMANCE.md).

    python -m benchmarks.train gpu [--batch-size 32] [--workers 8]
    python -m benchmarks.train gpu --device cpu --encoder resnet18 --batch-size 2 --steps 1 --warmup 1 --workers 1
    python -m benchmarks.train cpu-step --encoder resnet18 --encoder tu-regnetx_002
    python -m benchmarks.train cpu-step --encoder tu-regnetx_002 --arch unet --compile
    python -m benchmarks.train augment                  # 256->128, 512->256, 512->384 windows
    python -m benchmarks.train startup                  # a fresh process's import, run and exit
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import click
import numpy as np

from .common import benchmark_shards, machine, phantom_options, timed, work_folder


@click.group()
def main() -> None:
    """Training throughput, CPU step time and augmentation (see docs/PERFORMANCE.md)."""


def train_rate(model, optimizer, loss_fn, batches, steps: int, device, augment=None,
               warmup: int = 5) -> float:
    """Training images/s over ``steps`` steps of ``batches`` (after ``warmup`` steps)."""
    import torch

    from liverseg.train import to_model_input

    def step(images, masks):
        x, y = to_model_input(images, masks, device, channels_last=True)
        if augment is not None:
            x, y = augment(x, y)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return len(x)

    for _ in range(warmup):
        step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        n += step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


@main.command()
@phantom_options
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=50, show_default=True)
@click.option("--workers", default=min(8, os.cpu_count() or 1), show_default=True)
@click.option("--warmup", default=5, show_default=True, help="Untimed steps before each measurement.")
@click.option("--encoder", default="resnet34", show_default=True)
@click.option("--device", default="cuda", show_default=True, help="cpu only to check the script itself.")
def gpu(cases: int, slices: int, size: int, work: Path | None, batch_size: int, steps: int, workers: int,
        warmup: int, encoder: str, device: str) -> None:
    """Training throughput with the real loader vs. the same model on synthetic tensors
    already on the GPU (Unet, SIZExSIZEx3, bf16 autocast, channels_last, AdamW), in one run.

    Check the script on a CPU with e.g. --device cpu --encoder resnet18 --batch-size 2
    --steps 1 --warmup 1 (the rates then mean nothing)."""
    import itertools

    import torch

    from liverseg.augment import BatchAugment
    from liverseg.data import LoaderSettings, open_shards, train_loader
    from liverseg.losses import DiceCELoss
    from liverseg.models import create_model

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device here (use --device cpu only to test the script)")
    source = open_shards(benchmark_shards(work_folder(work), 1, cases, slices, size))
    model = create_model("unet", encoder, 3, 3).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = DiceCELoss()
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, 3, (batch_size, size, size), dtype=torch.uint8)
    x, y = x.to(device), y.to(device)  # already on the device: to_model_input only converts
    synthetic = train_rate(model, optimizer, loss_fn, itertools.repeat((x, y)), steps, device,
                           warmup=warmup)
    settings = LoaderSettings(batch_size=batch_size, workers=workers, shuffle_buffer=1000)
    real = train_rate(model, optimizer, loss_fn, iter(train_loader(source, 1, settings)), steps,
                      device, BatchAugment(), warmup=warmup)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# gpu, {date.today()}, {name}, torch {torch.__version__}, unet {encoder}, "
          f"batch {batch_size}, {workers} loader workers")
    print(f"synthetic tensors on the device: {synthetic:.3g} img/s; real loader + augmentation: "
          f"{real:.3g} img/s ({100 * real / synthetic:.0f} %)")


@main.command("cpu-step")
@click.option("--arch", "archs", multiple=True, default=("unet", "resunet"), show_default=True)
@click.option("--encoder", "encoders", multiple=True, default=("resnet18", "tu-regnetx_002"), show_default=True)
@click.option("--decoder-channels", default="64,32,16,16,16", show_default=True, help="'' for the default.")
@click.option("--size", default=128, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--steps", default=6, show_default=True, help="Timed steps (after 2 untimed).")
@click.option("--threads", default=1, show_default=True)
@click.option("--compile", "compiled", is_flag=True,
              help="torch.compile the model (inductor); the first step's time, compilation included, is printed.")
def cpu_step(archs: tuple[str, ...], encoders: tuple[str, ...], decoder_channels: str, size: int,
             batch_size: int, steps: int, threads: int, compiled: bool) -> None:
    """Seconds per training step on a CPU (forward, Dice + CE loss, backward, AdamW; float32,
    synthetic tensors), median of --steps: how the CPU demo recipe picks its encoder. The
    demo trains its two models side by side, one thread each, hence --threads 1."""
    import torch

    from liverseg.losses import DiceCELoss
    from liverseg.models import create_model

    torch.set_num_threads(threads)
    decoder = tuple(int(c) for c in decoder_channels.split(",")) if decoder_channels else None
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, size, size, generator=generator)
    y = torch.randint(0, 3, (batch_size, size, size), generator=generator)
    print(f"# cpu-step, {date.today()}, {machine()}, torch {torch.__version__}, {threads} thread(s), "
          f"{size}x{size}x3, batch {batch_size}, decoder {decoder or 'default'}"
          + (", torch.compile" if compiled else ""))
    for encoder in encoders:
        for arch in archs:
            torch.manual_seed(0)
            model = create_model(arch, encoder, 3, 3, decoder_channels=decoder).train()
            optimizer, loss_fn = torch.optim.AdamW(model.parameters(), lr=1e-3), DiceCELoss()
            run = torch.compile(model) if compiled else model
            times = []
            for _ in range(steps + 2):
                start = time.perf_counter()
                loss_fn(run(x), y).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            first = f"  first step {times[0]:.1f} s" if compiled else ""
            print(f"{arch:<8} {encoder:<26} {float(np.median(times[2:])):6.3f} s/step  {params:5.1f} M parameters{first}",
                  flush=True)


@main.command()
@click.option("--case", "cases", multiple=True, default=("256,128,16", "512,256,8", "512,384,8"), show_default=True,
              help="SLICE,WINDOW,BATCH; repeat for several.")
@click.option("--repeat", default=10, show_default=True, help="Timed batches (median), after 2 untimed.")
@click.option("--threads", default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def augment(cases: tuple[str, ...], repeat: int, threads: int, device: str) -> None:
    """Milliseconds per batch of BatchAugment with a window (default transforms, `crop` set):
    the window resampled alone, against the whole slice warped and the window cut out after."""
    import dataclasses

    import torch

    from liverseg.augment import AugmentConfig, BatchAugment, random_crop

    torch.set_num_threads(threads)
    print(f"# augment, {date.today()}, {machine() if device == 'cpu' else torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, {threads} thread(s), median of {repeat}")
    for case in cases:
        size, crop, batch = (int(v) for v in case.split(","))
        generator = torch.Generator(device=device).manual_seed(0)
        image = torch.rand(batch, 3, size, size, generator=generator, device=device)
        image = image.contiguous(memory_format=torch.channels_last)
        mask = torch.randint(0, 3, (batch, size, size), generator=generator, device=device)
        window = BatchAugment(AugmentConfig(crop=crop))
        whole = BatchAugment(dataclasses.replace(window.config, crop=0))

        def run(fn):
            def call():
                out = fn()
                if device != "cpu":
                    torch.cuda.synchronize()
                return out
            call(), call()
            return timed(call, repeat)[0]

        windowed = run(lambda: window(image, mask, generator))
        cut_after = run(lambda: random_crop(crop, *whole(image, mask, generator), generator))
        print(f"{size}² slices → {crop}² windows, batch {batch}: whole slice warped then cut {cut_after:6.1f} ms, "
              f"window warped {windowed:6.1f} ms ({cut_after / windowed:.1f}x)", flush=True)

# Run as `python -c`: CPU seconds of the import on stderr, then the time the interpreter
# begins to exit (atexit runs its handlers last-registered first, so this one runs last).
IMPORT_ONLY = """import atexit, sys, time
atexit.register(lambda: print(time.time(), file=sys.stderr))
start = time.process_time()
{imports}
print(time.process_time() - start, file=sys.stderr)
"""
IMPORTS = {
    "plain import": "import {module}",
    "heavy_imports()": "from shardgen.clihelp import heavy_imports\nwith heavy_imports():\n    import {module}",
}


def dotted(name: str) -> str:
    """``name`` if it is a dotted module name: it is pasted into the code the processes run."""
    if not all(part.isidentifier() for part in name.split(".")):
        raise click.BadParameter(f"{name!r} is not a dotted module name")
    return name


def children_cpu() -> float:
    """CPU seconds of this process's ended children so far (their own children included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@main.command()
@click.option("--repeat", default=5, show_default=True, help="Runs of each (medians).")
@click.option("--module", default="liverseg.train", show_default=True, callback=lambda ctx, param, value: dotted(value),
              help="What the bare processes import.")
@click.option("--train-run/--no-train-run", default=True, show_default=True, help="Also time launch/train.py.")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Where the tiny shards are cached [default: a temp folder].")
def startup(repeat: int, module: str, train_run: bool, work: Path | None) -> None:
    """What a fresh process pays around the work, as every Accelerate rank does: (1) a bare
    `import liverseg.train` (--module) and the interpreter's exit, plain and inside
    shardgen.clihelp.heavy_imports (the collector paused, then frozen); (2) a whole 4-step
    `launch/train.py` run on 64² shards of 5 cases (mobilenetv3_small_050, one thread, one
    loader worker, validation and checkpoints at steps 2 and 4), as a rank of the tests
    runs it, and its exit: from the "finished at step" line to the process's end."""
    print(f"# startup, {date.today()}, {machine()}, medians of {repeat} runs")
    for name, imports in IMPORTS.items():
        code = IMPORT_ONLY.format(imports=imports.format(module=module))
        cpus, import_cpus, exits = [], [], []
        for _ in range(repeat):
            before = children_cpu()
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            end = time.time()
            cpus.append(children_cpu() - before)
            import_cpu, exit_start = map(float, done.stderr.split()[-2:])
            import_cpus.append(import_cpu)
            exits.append(end - exit_start)
        print(f"{name:<18} process {np.median(cpus):5.2f} s CPU, import {np.median(import_cpus):5.2f} s CPU, "
              f"exit {np.median(exits):4.2f} s", flush=True)
    if not train_run:
        return
    shards = benchmark_shards(work_folder(work), context=1, cases=5, slices=16, size=64, fractions=(0.6, 0.4, 0.0))
    out = Path(work_folder(work)) / "startup-run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    root = Path(__file__).resolve().parents[1]
    walls, cpus, exits = [], [], []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        argv = [str(root / "launch" / "train.py"), "--shards", str(shards), "--out", str(out),
                "--encoder", "tu-mobilenetv3_small_050", "--steps", "4", "--batch-size", "2", "--val-every", "2",
                "--save-every", "2", "--workers", "1", "--seed", "5"]
        before, start = children_cpu(), time.time()
        with subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=env) as proc:
            finished = next((time.time() for line in proc.stdout if "finished at step" in line), math.nan)
            proc.stdout.read()
        end = time.time()
        if proc.returncode:
            raise click.ClickException(f"launch/train.py failed (exit {proc.returncode})")
        walls.append(end - start)
        cpus.append(children_cpu() - before)
        exits.append(end - finished)
    print(f"{'launch/train.py':<18} process {np.median(cpus):5.2f} s CPU, wall {np.median(walls):5.2f} s, "
          f"exit {np.median(exits):4.2f} s", flush=True)


if __name__ == "__main__":
    main()
