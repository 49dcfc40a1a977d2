"""The end-to-end demo behind ``bash launch/demo.sh``: CT phantoms → shards → a U-Net and a
ResUNet → each and their ensemble evaluated on held-out phantom cases, postprocessed.

    python launch/demo.py [--out demo-out] [--cases N] [--quick] [--device auto|cpu|cuda] [--seed S]

A second run reuses what is already built (phantoms, shards, finished training runs, and the
tuning and evaluation when nothing they depend on changed) and shows the results again.
On a CPU it uses a small recipe (256² slices trained as 128² windows, regnetx_002 with a
narrow decoder) sized to finish in under 10 minutes on 2 cores; with a GPU, the full-size
recipe (512², resnet34, bf16). Before the test cases are scored, the postprocessing's
lesion filters are chosen on the validation cases (liverseg-eval tune).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from shardgen.clihelp import CONTEXT_SETTINGS, friendly_errors, heavy_imports


@dataclass(frozen=True)
class Recipe:
    """Everything the demo's result depends on; changing it rebuilds what it affects."""

    name: str
    cases: int
    size: int
    slices: tuple[int, int]
    encoder: str
    decoder_channels: tuple[int, ...] | None
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    val_every: int
    oversample_tumour: float
    minutes: float  # rough duration, said at the start
    class_weights: tuple[float, float, float] | None = (1.0, 1.0, 4.0)
    workers: int = 1
    crop: int = 0  # train on random crop x crop windows of the size x size slices (0: whole slices)
    augment: float = 1.0  # chance that a sample is rotated, zoomed and brightness/noise-jittered (augment.p)
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0

    def phantom_stamp(self) -> dict:
        return {"cases": self.cases, "size": self.size, "slices": list(self.slices), "seed": self.seed}


def cpu_recipe(quick: bool) -> Recipe:
    if quick:
        # the CPU recipe's encoder: as good as resnet18 here (held-out liver Dice 0.850 / 0.845
        # / 0.884 for seeds 0-2, resnet18 0.847 / 0.895 for seeds 0-1) in 50 s rather than 80
        return Recipe("cpu-quick", cases=8, size=64, slices=(24, 32), encoder="tu-regnetx_002",
                      decoder_channels=(64, 32, 16, 16, 16), steps=60, batch_size=16, lr=3e-3,
                      warmup_steps=10, val_every=30, oversample_tumour=1.0, minutes=1,
                      fractions=(0.625, 0.125, 0.25))
    # 256² slices trained as random 128² windows: twice the pixels per lesion of a 128²
    # recipe at the same cost per step; regnetx_002 trains 2.2x faster than resnet18 on a
    # CPU, so twice the steps fit (docs/PERFORMANCE.md); validation and evaluation see
    # whole 256² slices. 100 cases rather than 60 or 40: more lesions to learn from (on 36
    # fresh phantoms, per-case tumour Dice 0.50 / 0.40 over two seeds against 0.42 / 0.34
    # with 60 cases) and 20 test cases, whose mean varies less than that of 12. One
    # validation, at the end: each costs as much as ~25 steps, and the validation Dice still
    # rises at the last step, so the 57 s three more of them took now train 80 more steps.
    # Random windows but no other augmentation: 460 steps show each slice about 4 times, too
    # few to overfit, and without the jitter both seeds scored higher on every measure
    # (fresh phantoms 0.50 / 0.48 per case against 0.48 / 0.46; docs/experiments/)
    return Recipe("cpu", cases=100, size=256, slices=(20, 32), encoder="tu-regnetx_002",
                  decoder_channels=(64, 32, 16, 16, 16), steps=460, batch_size=16, lr=2e-3,
                  warmup_steps=40, val_every=460, oversample_tumour=2.0, minutes=10, crop=128, augment=0.0)


def gpu_recipe(quick: bool) -> Recipe:
    if quick:
        return Recipe("gpu-quick", cases=12, size=256, slices=(60, 100), encoder="resnet34",
                      decoder_channels=None, steps=300, batch_size=32, lr=2e-3, warmup_steps=30,
                      val_every=100, oversample_tumour=1.0, minutes=2, workers=4)
    # 512² slices trained as random 384² windows (0.56x the pixels: twice the steps of the
    # first whole-slice recipe, whose validation tumour Dice still rose at its last step);
    # tumour slices drawn 3x as often and 60 cases (12 test cases), from the CPU recipe of then
    return Recipe("gpu", cases=60, size=512, slices=(60, 120), encoder="resnet34",
                  decoder_channels=None, steps=3000, batch_size=32, lr=2e-3, warmup_steps=150,
                  val_every=500, oversample_tumour=2.0, minutes=7, workers=8, crop=384)  # 6.3 min on an H200


def stage(title: str, start: float) -> None:
    click.secho(f"==> [{(time.perf_counter() - start) / 60:4.1f} min] {title}", bold=True)


def make_phantoms(recipe: Recipe, folder: Path) -> None:
    from shardgen.phantom import write_phantoms
    from tqdm.auto import tqdm

    stamp = folder / "phantoms.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe.phantom_stamp():
        click.echo(f"    reusing {folder}")
        return
    with tqdm(total=recipe.cases, desc="phantoms", unit="case") as bar:
        write_phantoms(folder, recipe.cases, seed=recipe.seed, size=recipe.size, slices=recipe.slices,
                       on_case=lambda i: bar.update(), workers=min(recipe.workers * 2, os.cpu_count() or 1))
    stamp.write_text(json.dumps(recipe.phantom_stamp()))


def make_shards(recipe: Recipe, phantoms: Path, shards: Path) -> None:
    from shardgen.build import BuildConfig, build_shards
    from shardgen.preprocess import Preprocessing

    # build_shards resumes by itself: finished cases are kept, so a rerun costs seconds
    result = build_shards(BuildConfig(inputs=(phantoms,), out=shards, preprocessing=Preprocessing(size=recipe.size),
                                      fractions=recipe.fractions, seed=recipe.seed,
                                      workers=min(max(2, recipe.workers), os.cpu_count() or 1)))
    totals = result.manifest["totals"]
    click.echo("    " + ", ".join(f"{s}: {t['cases']} cases / {t['targets']} slices" for s, t in totals.items()))


def train_config(recipe: Recipe, arch: str, shards: Path, run: Path):
    from liverseg.augment import AugmentConfig
    from liverseg.config import TrainConfig

    return TrainConfig(shards=str(shards), out=str(run), arch=arch, encoder=recipe.encoder,
                       decoder_channels=recipe.decoder_channels, steps=recipe.steps,
                       batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                       val_every=recipe.val_every, save_every=recipe.steps, log_every=10,
                       workers=recipe.workers, oversample_tumour=recipe.oversample_tumour,
                       class_weights=recipe.class_weights, augment=AugmentConfig(crop=recipe.crop, p=recipe.augment),
                       seed=recipe.seed)


def finished(run: Path, config) -> bool:
    """A run already trained with exactly these settings, on the shards' training cases
    (a rebuild that assigns the splits otherwise must not score a model on cases it saw)."""
    path = run / "last" / "config.json"
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    manifest = json.loads((Path(config.shards) / "manifest.json").read_text())
    train_cases = sorted({s["case"] for s in manifest["shards"] if s["split"] == "train"})
    return (saved.get("step") == config.steps and saved.get("train_cases") == train_cases
            and saved.get("train") == json.loads(json.dumps(config.to_dict())))


def train_model(recipe: Recipe, arch: str, shards: Path, run: Path) -> Path:
    from liverseg.train import train

    config = train_config(recipe, arch, shards, run)
    if finished(run, config):
        click.echo(f"    reusing {run}")
    else:
        result = train(config.replace(resume="auto" if (run / "checkpoints").exists() else None))
        best = result.best
        click.echo(f"    {arch}: best validation Dice liver {best['val/dice_liver']:.3f}, "
                   f"tumour {best['val/dice_tumour']:.3f}")
    return run / "best"


def train_in_parallel(recipe: Recipe, archs: list[str], shards: Path, runs: Path) -> list[Path]:
    """Train the models side by side, one process each, the cores shared between them.

    On a CPU two single-thread processes train 1.28x more samples per second in all than
    one process with two threads (measured on the development machine, 128², batch 16),
    so the CPU demo trains both models at once. On Linux the processes are forked from this
    one, which has imported the model stack already (a fresh interpreter spends about 10 s
    of CPU on it); elsewhere they start fresh ("spawn"). Each writes its output to
    ``<run>/train.log``; progress is read from each run's history.
    """
    import multiprocessing

    from tqdm.auto import tqdm

    configs = {arch: train_config(recipe, arch, shards, runs / arch) for arch in archs}
    todo = {arch: c for arch, c in configs.items() if not finished(Path(c.out), c)}
    for arch in configs.keys() - todo.keys():
        click.echo(f"    reusing {runs / arch}")
    threads = max(1, (os.cpu_count() or 2) // max(1, len(todo)))
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    procs = {}
    sys.stdout.flush()
    sys.stderr.flush()  # or what is buffered here would be written again by each child
    try:
        for arch, config in todo.items():
            run = Path(config.out)
            run.mkdir(parents=True, exist_ok=True)
            (run / "history.jsonl").unlink(missing_ok=True)
            config = config.replace(resume="auto" if (run / "checkpoints").exists() else None)
            procs[arch] = context.Process(target=train_logged, args=(config, threads, str(run / "train.log")),
                                          name=f"train-{arch}")
            procs[arch].start()
        total = sum(c.steps for c in todo.values())
        with tqdm(total=total, desc="training " + " + ".join(todo), unit="step", disable=not todo) as bar:
            while any(p.is_alive() for p in procs.values()):
                time.sleep(2)
                bar.n = sum(last_step(Path(todo[a].out)) for a in procs)
                bar.refresh()
            bar.n = sum(last_step(Path(todo[a].out)) for a in procs)
            bar.refresh()
    finally:  # an interrupted or failed demo leaves no training behind
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()
            proc.join()
    for arch, proc in procs.items():
        if proc.exitcode != 0:
            log = Path(todo[arch].out) / "train.log"
            raise click.ClickException(f"training {arch} failed (exit {proc.exitcode}); "
                                       f"{log} ends with:\n{log.read_text()[-1500:]}")
        best = json.loads((Path(todo[arch].out) / "best" / "config.json").read_text())["metrics"]
        click.echo(f"    {arch}: best validation Dice liver {best['val/dice_liver']:.3f}, "
                   f"tumour {best['val/dice_tumour']:.3f}")
    return [runs / arch / "best" for arch in archs]


def train_logged(config, threads: int, log: str) -> None:
    """One training run in a process of its own, with ``threads`` CPU threads, its output
    (progress bar, warnings, a traceback) in the file ``log``."""
    import torch

    from liverseg.train import train

    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for fd in (1, 2):
        os.dup2(target, fd)
    os.close(target)
    torch.set_num_threads(threads)
    train(config)


def last_step(run: Path) -> int:
    try:
        lines = (run / "history.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def reusable(result: Path, config, checkpoints: list[Path], inputs: tuple[Path, ...] = (),
             read: Callable[[dict], Any] = lambda saved: saved) -> Any:
    """``read`` of what ``result`` (tuning.json, summary.json) holds, if it was written by
    this liverseg version with exactly ``config`` after the checkpoints' weights and
    ``inputs`` were last written: a rerun can show it again instead of computing it again.
    None otherwise, also when the file cannot be read back (``read`` fails)."""
    from liverseg import __version__

    try:
        saved = json.loads(result.read_text())
        written = result.stat().st_mtime
        newest = max([(Path(c) / "model.safetensors").stat().st_mtime for c in checkpoints]
                     + [Path(i).stat().st_mtime for i in inputs])
        if (isinstance(saved, dict) and saved.get("liverseg_version") == __version__ and written > newest
                and saved.get("config") == json.loads(json.dumps(config.to_dict()))):
            return read(saved)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def tune(checkpoints: list[Path], shards: Path, out: Path, device: str | None) -> Path:
    """The lesion filters of the postprocessing, chosen on the validation cases."""
    from liverseg.config import EvalConfig
    from liverseg.tune import saved_result, tune_postprocess

    config = EvalConfig(checkpoints=tuple(map(str, checkpoints)), data=str(shards), out=str(out), split="val",
                        batch_size=32, device=device)
    result = reusable(out / "tuning.json", config, checkpoints, read=lambda saved: saved_result(saved, out))
    if result is not None and result.postprocess.exists():
        click.echo(f"    reusing {out}")
    else:
        result = tune_postprocess(config)
    chosen, mean_dice = (result.min_volume_mm3, result.min_mean_probability), result.mean_dice
    least = min(mean_dice)  # the least filtering of all candidates, to compare with
    click.echo(f"    tumour components under {chosen[0]:g} mm³ or of mean tumour probability under {chosen[1]:g} "
               f"removed (mean validation tumour Dice {mean_dice[chosen]:.3f}; "
               f"{mean_dice[least]:.3f} with {least[0]:g} mm³ and {least[1]:g})")
    return result.postprocess


def evaluate(checkpoints: list[Path], shards: Path, out: Path, device: str | None, postprocess: Path):
    from liverseg.config import EvalConfig
    from liverseg.evaluate import EvalResult, run_evaluation

    config = EvalConfig(checkpoints=tuple(map(str, checkpoints)), data=str(shards), out=str(out),
                        split="test", batch_size=32, device=device, postprocess=str(postprocess))
    shown = reusable(out / "summary.json", config, checkpoints, (postprocess,),
                     read=lambda summary: EvalResult(out, summary["cases"], summary["failed"], summary,
                                                     out / "report.html"))
    if shown is not None and shown.report.exists():
        click.echo(f"    reusing {out}")
        return shown
    return run_evaluation(config)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--cases", type=click.IntRange(min=5), default=None, help="Phantom cases [default: the recipe's].")
@click.option("--quick", is_flag=True, help="A smaller recipe: about a minute on a CPU, a rougher model.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the phantoms, the split and the training (another seed: other cases, other models).")
@friendly_errors
def main(out: Path, cases: int | None, quick: bool, device: str, seed: int) -> None:
    """Phantoms → shards → U-Net + ResUNet → ensemble evaluation, end to end."""
    with heavy_imports():  # every stage below uses them, a rerun too
        import torch
        import liverseg.evaluate  # noqa: F401
        import liverseg.train  # noqa: F401  (before the CPU recipe forks its trainings)
        import liverseg.tune  # noqa: F401
    from tqdm import std

    from liverseg.eval_cli import print_table

    std.tqdm.monitor_interval = 0  # no tqdm monitor thread: the CPU recipe forks its trainings

    gpu = torch.cuda.is_available() if device == "auto" else device == "cuda"
    recipe = gpu_recipe(quick) if gpu else cpu_recipe(quick)
    recipe = dataclasses.replace(recipe, seed=seed, cases=recipe.cases if cases is None else cases)
    where = torch.cuda.get_device_name() if gpu else f"{os.cpu_count()} CPU cores"
    click.echo(f"liverseg demo, recipe '{recipe.name}' on {where}: {recipe.cases} phantom cases at "
               f"{recipe.size}², U-Net and ResUNet ({recipe.encoder}, {recipe.steps} steps each); "
               f"about {recipe.minutes:g} minute{'' if recipe.minutes == 1 else 's'}" + (" on an H100" if gpu else " on 2 cores") + f". Outputs in {out}/")
    # one folder per recipe, case count and seed: a run never reuses shards or models of another
    base = out / (f"{recipe.name}-{recipe.size}px-{recipe.cases}cases" + (f"-seed{seed}" if seed else ""))
    start = time.perf_counter()
    base.mkdir(parents=True, exist_ok=True)  # fail at once, not after minutes of work
    stage("generating phantom CT cases", start)
    make_phantoms(recipe, base / "phantoms")
    stage("building shards", start)
    make_shards(recipe, base / "phantoms", base / "shards")
    if gpu:  # one GPU: one model after the other, each with the whole card
        checkpoints = []
        for arch in ("unet", "resunet"):
            stage(f"training {arch}", start)
            checkpoints.append(train_model(recipe, arch, base / "shards", base / "runs" / arch))
    else:
        stage("training unet and resunet side by side", start)
        checkpoints = train_in_parallel(recipe, ["unet", "resunet"], base / "shards", base / "runs")
    device = "cuda" if gpu else "cpu"
    stage("choosing the postprocessing on the validation cases", start)
    postprocess = tune(checkpoints, base / "shards", base / "tuning", device)
    stage("evaluating each model, the ensemble and the postprocessed ensemble on held-out cases", start)
    result = evaluate(checkpoints, base / "shards", base / "eval", device, postprocess)
    stage("done", start)
    print_table(result.summary)
    click.echo(f"report: {result.report}")
    if result.failed:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
