"""The training function behind ``launch/train.py`` and the Colab notebook.

Accelerate owns devices, precision, process groups and checkpoint state. Each rank streams
its own shards and takes exactly ``config.steps`` optimizer steps; validation counts are
summed per rank and reduced once after the validation loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from accelerate.utils import load as accelerate_load  # torch.load with weights_only=True
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from shardgen.io import write_json_atomic, write_text_atomic
from shardgen.labels import CLASS_NAMES, NUM_CLASSES, overlay
from shardgen.preprocess import Preprocessing
from shardgen.settings import field_names, from_dict

from . import __version__
from .augment import BatchAugment
from .config import TrainConfig
from .data import (LoaderSettings, ShardSource, TrainStream, open_shards, train_loader, val_loader,
                   valid_position)
from .errors import LiversegError
from .losses import DiceCELoss
from .metrics import confusion_matrix, dice, liver_tumour_from_matrix
from .checkpoint import ModelSpec, export_checkpoint, tensors_for_safetensors, unwrap_model
from .models import create_model
from .runtime import make_accelerator, resolve_precision
from .tracking import log_overlays, start_trackers

log = logging.getLogger(__name__)


class TrainingDiverged(LiversegError):
    """Too many optimizer steps in a row had non-finite gradients."""


@dataclass
class TrainState:
    """What resuming needs beyond what Accelerate saves (model, optimizer, scheduler, RNGs):
    kept as JSON, so reading a checkpoint never runs pickled code."""

    step: int = 0
    best_score: float = -1.0
    best: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> "TrainState":
        def problem(d) -> str:
            ok = (type(d["step"]) is int and d["step"] >= 0 and type(d["skipped_steps"]) is int
                  and isinstance(d["best_score"], (int, float)) and isinstance(d["best"], dict))
            return "" if ok else "not a training state written by liverseg"

        return from_dict(cls, data, "training state", LiversegError, required=field_names(cls),
                         source=str(where), check=problem)


@dataclass(frozen=True)
class TrainResult:
    step: int
    best: dict[str, float]
    last_metrics: dict[str, float]
    skipped_steps: int
    run_dir: Path
    rank: int = 0
    world: int = 1
    skipped_shards: int = 0


def has_unused_parameters(model: torch.nn.Module, in_channels: int) -> bool:
    """Some smp decoders leave parameters out of the graph (measured: unet+scse, pspnet);
    DDP must then be told, so find out with one tiny CPU pass instead of guessing."""
    probe = torch.zeros(1, in_channels, 64, 64)
    model.train()
    model(probe).sum().backward()
    unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return unused


def training_accelerator(config: TrainConfig, find_unused: bool) -> Accelerator:
    trackers = None if config.report_to == "none" else config.report_to
    return make_accelerator(mixed_precision=resolve_precision(config.precision),
                            gradient_accumulation_steps=config.grad_accum, log_with=trackers,
                            project_dir=str(config.run_dir), step_scheduler_with_optimizer=False,
                            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])


def lr_lambda(config: TrainConfig):
    """Linear warm-up, then cosine decay to 1 % of the peak learning rate."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def ema_update(decay: float):
    """The averaging rule of ``TrainConfig.ema``: avg ← d·avg + (1 − d)·weights, with
    d = min(decay, (1 + n) / (10 + n)) after n updates, so the first few hundred steps are
    not dominated by the random initialisation. Integer buffers (BatchNorm's batch count)
    are copied."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        n = n.to(averaged[0].dtype)
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))

    return update


# --------------------------------------------------------------------------- resumable state
# checkpoints/step-000020/ holds Accelerate's save_state (model.safetensors; optimizer,
# scheduler and RNG states, which Accelerate reads back with torch.load(weights_only=True))
# and ours: train_state.json, data_position_R.json and rank_state_R.safetensors per rank,
# ema.safetensors. It is written as .step-000020.partial and renamed when complete, so a
# kill during a save leaves no folder that resuming could mistake for a checkpoint.

STATE_FILE = "train_state.json"
PARTIAL = ".partial"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, oldest first."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*")
             if p.is_dir() and p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(loop: Loop, state: TrainState, stream: TrainStream) -> Path:
    """Save everything a resumed run needs to continue exactly, then keep the newest
    ``keep_checkpoints`` complete folders. Every rank calls this."""
    acc, run_dir = loop.accelerator, loop.config.run_dir
    final = checkpoint_dir(run_dir, state.step)
    partial = final.with_name("." + final.name + PARTIAL)
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(partial))
    rank = acc.process_index
    write_json_atomic(partial / f"data_position_{rank}.json", stream.state())
    save_file({"generator": loop.generator.get_state()}, str(partial / f"rank_state_{rank}.safetensors"))
    if acc.is_main_process and loop.ema is not None:
        save_file(tensors_for_safetensors(loop.ema.state_dict()), str(partial / "ema.safetensors"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json_atomic(partial / STATE_FILE, state.to_dict())  # last: its presence marks the folder complete
        shutil.rmtree(final, ignore_errors=True)  # the same step saved by an earlier run
        os.replace(partial, final)
        for old in complete_checkpoints(run_dir)[:-loop.config.keep_checkpoints]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LiversegError(f"{path}: missing from the checkpoint") from None
    except (OSError, ValueError) as exc:
        raise LiversegError(f"{path}: unreadable ({exc})") from None


def checkpoint_to_resume(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume != "auto":
        path = Path(config.resume)
        if not (path / STATE_FILE).is_file():
            raise LiversegError(f"{path}: not a complete liverseg checkpoint folder (no {STATE_FILE})")
        return path
    found = complete_checkpoints(config.run_dir)
    return found[-1] if found else None


def resume(loop: Loop, path: Path) -> tuple[TrainState, dict[str, Any]]:
    """Restore a checkpoint folder; returns the training state and this rank's data position."""
    acc = loop.accelerator
    state = TrainState.from_dict(read_json(path / STATE_FILE), path / STATE_FILE)
    rank = acc.process_index
    position = read_json(path / f"data_position_{rank}.json")
    if not valid_position(position):
        raise LiversegError(f"{path / f'data_position_{rank}.json'}: not a data position written by liverseg")
    try:
        # Accelerate ignores RNG states it cannot read; resuming exactly needs them
        accelerate_load(path / f"random_states_{rank}.pkl")
        acc.load_state(str(path))
        generator = load_file(str(path / f"rank_state_{rank}.safetensors"))["generator"]
        loop.generator.set_state(generator)
        if loop.ema is not None:
            loop.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        # torch.load(weights_only=True) refuses anything but tensors and plain containers
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LiversegError(f"{path}: cannot resume from this checkpoint ({reason[:300]})") from None
    acc.print(f"resumed from {path}")
    return state, position


def forget_after(path: Path, step: int) -> None:
    """Drop a log's lines past ``step`` (and a line a kill cut short): a resumed run logs
    those steps again."""
    if not path.exists():
        return

    def step_of(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    kept = [line for line in path.read_text().splitlines(keepends=True) if step_of(line) <= step]
    write_text_atomic(path, "".join(kept))


def clear_partial_saves(run_dir: Path) -> None:
    for partial in (run_dir / "checkpoints").glob(".step-*" + PARTIAL):
        shutil.rmtree(partial, ignore_errors=True)


def to_model_input(images: torch.Tensor, masks: torch.Tensor, device: torch.device,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.to(device, non_blocking=True).float().div_(255.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, masks.to(device, non_blocking=True).long()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, config: TrainConfig,
             accelerator: Accelerator) -> tuple[torch.Tensor, list[np.ndarray]]:
    """This rank's 3×3 confusion matrix over its validation shards (no collectives inside:
    ranks may hold different numbers of batches), plus a few overlays from the first batch."""
    model.eval()
    matrix = torch.zeros(3, 3, dtype=torch.long, device=device)
    overlays: list[np.ndarray] = []
    for i, (images, masks) in enumerate(batches):
        if config.val_batches is not None and i >= config.val_batches:
            break
        x, y = to_model_input(images, masks, device, config.channels_last)
        with accelerator.autocast():
            pred = model(x).argmax(1)
        matrix += confusion_matrix(pred, y)
        if i == 0:
            overlays = [overlay_triplet(images[j], y[j], pred[j]) for j in range(min(4, len(y)))]
    model.train()
    return matrix, overlays


def overlay_triplet(image: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """CT | ground truth | prediction side by side (uint8 RGB), labels drawn by
    ``shardgen.labels.overlay``."""
    ct = image[image.shape[0] // 2].cpu().numpy()
    panels = [overlay(ct, mask) for mask in (np.zeros_like(ct), truth.cpu().numpy(), pred.cpu().numpy())]
    return (np.concatenate(panels, axis=1) * 255).round().clip(0, 255).astype(np.uint8)


def scores(matrix: torch.Tensor) -> dict[str, float]:
    per_class = dice(liver_tumour_from_matrix(matrix)).tolist()
    return {"val/dice_liver": per_class[0], "val/dice_tumour": per_class[1],
            "val/dice_mean": float(np.mean(per_class))}


def export(accelerator: Accelerator, model: torch.nn.Module, config: TrainConfig, spec: ModelSpec,
           source: ShardSource, preprocessing: Preprocessing, name: str, step: int,
           metrics: dict[str, float]) -> None:
    """Write ``model`` (a plain module: ``Loop.weights``) as the checkpoint folder ``name``;
    its config names the cases it was trained on (``train_cases``)."""
    if accelerator.is_main_process:
        extra = {"preprocessing": preprocessing.to_dict(), "classes": list(CLASS_NAMES),
                 "train": config.to_dict(), "step": step, "metrics": metrics,
                 "train_cases": sorted({s["case"] for s in source.shards("train")}),
                 "liverseg_version": __version__}
        export_checkpoint(model, spec, config.run_dir / name, extra)
    accelerator.wait_for_everyone()


class History:
    """history.jsonl in the run folder: one JSON line per logged step (main process)."""

    def __init__(self, accelerator: Accelerator, path: Path):
        self.accelerator, self.path = accelerator, path

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


@dataclass
class Loop:
    """The objects a training step needs, gathered once."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: torch.nn.Module
    augment: BatchAugment
    generator: torch.Generator
    config: TrainConfig
    net: torch.nn.Module  # the model without DDP / compile wrappers
    ema: torch.optim.swa_utils.AveragedModel | None = None

    @property
    def weights(self) -> torch.nn.Module:
        """The weights that are validated and exported: the average when there is one."""
        return self.ema.module if self.ema is not None else self.net


def train_step(loop: Loop, batches: TrainStream) -> tuple[torch.Tensor, bool, float, list[str]]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns the last loss, whether
    the step was applied, the seconds spent waiting for data and the samples' keys."""
    acc, cfg = loop.accelerator, loop.config
    waited, loss, keys = 0.0, torch.zeros(()), []
    for _ in range(cfg.grad_accum):
        start = time.perf_counter()
        images, masks = next(batches)
        waited += time.perf_counter() - start
        keys += batches.last_keys
        x, y = to_model_input(images, masks, acc.device, cfg.channels_last)
        x, y = loop.augment(x, y, generator=loop.generator)
        with acc.accumulate(loop.model):
            loss = loop.loss_fn(loop.model(x), y)
            acc.backward(loss)
    # gradients are all-reduced, so this norm (and the decision below) is the same on every rank
    norm = acc.clip_grad_norm_(loop.model.parameters(), cfg.grad_clip)
    finite = bool(torch.isfinite(norm))
    if finite or acc.mixed_precision == "fp16":  # fp16: the grad scaler skips and rescales itself
        loop.optimizer.step()
    applied = finite and not getattr(loop.optimizer, "step_was_skipped", False)
    if applied:
        loop.scheduler.step()
        if loop.ema is not None:
            loop.ema.update_parameters(loop.net)
    loop.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), applied, waited, keys


def build_loss(config: TrainConfig) -> torch.nn.Module:
    return DiceCELoss(classes=NUM_CLASSES, class_weights=config.class_weights)


def setup(config: TrainConfig) -> tuple[Loop, ShardSource, Preprocessing, ModelSpec]:
    source = open_shards(config.shards)
    preprocessing = Preprocessing.from_dict(source.manifest["preprocessing"])
    spec = ModelSpec(config.arch, config.encoder, preprocessing.channels, NUM_CLASSES, config.attention,
                     config.decoder_channels)
    set_seed(config.seed)  # the initial weights too (torch seeds each process at random); DDP copies rank 0's
    model = create_model(spec.arch, spec.encoder, spec.in_channels, spec.classes,
                         encoder_weights=config.encoder_weights, attention=spec.attention,
                         decoder_channels=spec.decoder_channels)
    accelerator = training_accelerator(config, has_unused_parameters(model, spec.in_channels))
    set_seed(config.seed + accelerator.process_index)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    net = unwrap_model(accelerator.unwrap_model(model))
    ema = None
    if config.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=ema_update(config.ema), use_buffers=True)
    generator = torch.Generator(device=accelerator.device)
    generator.manual_seed(config.seed * 1000 + accelerator.process_index)
    loop = Loop(accelerator, model, optimizer, scheduler, build_loss(config).to(accelerator.device),
                BatchAugment(config.augment), generator, config, net, ema)
    return loop, source, preprocessing, spec


def validate(loop: Loop, source: ShardSource, preprocessing: Preprocessing, step: int
             ) -> tuple[dict[str, float], list[np.ndarray]]:
    acc, cfg = loop.accelerator, loop.config
    batches = val_loader(source, preprocessing.context, cfg.batch_size, acc.process_index,
                         acc.num_processes, workers=min(cfg.workers, 2), on_bad_shard=cfg.on_bad_shard)
    matrix, overlays = evaluate(loop.weights, batches, acc.device, cfg, acc)
    matrix = acc.reduce(matrix, reduction="sum")  # the one collective of a validation
    return scores(matrix), overlays


def start(loop: Loop, source: ShardSource, preprocessing: Preprocessing) -> tuple[TrainState, TrainStream]:
    """The state to start from (a checkpoint's when resuming) and the data stream positioned
    at the sample that comes next."""
    cfg, acc = loop.config, loop.accelerator
    if acc.is_main_process:
        clear_partial_saves(cfg.run_dir)
    acc.wait_for_everyone()
    path = checkpoint_to_resume(cfg)
    state, position = TrainState(), None
    if path is not None:
        state, position = resume(loop, path)
    elif cfg.resume is not None:
        acc.print("no checkpoint to resume from: starting at step 0")
    if acc.is_main_process:
        forget_after(cfg.run_dir / HISTORY, state.step)
    forget_after(trace_path(cfg.run_dir, acc.process_index), state.step)
    stream = train_loader(source, preprocessing.context, LoaderSettings.from_config(cfg), acc.process_index,
                          acc.num_processes, state=position)
    return state, stream


HISTORY = "history.jsonl"


def trace_path(run_dir: Path, rank: int) -> Path:
    """samples.jsonl (rank 0) or samples-rank-R.jsonl: the sample keys of every step."""
    return run_dir / ("samples.jsonl" if not rank else f"samples-rank-{rank}.jsonl")


def train(config: TrainConfig) -> TrainResult:
    """Train, validating every ``val_every`` steps, saving resumable state every
    ``save_every`` steps, and exporting ``best/`` and ``last/`` checkpoints."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    loop, source, preprocessing, spec = setup(config)
    acc = loop.accelerator
    state, batches = start(loop, source, preprocessing)
    has_val = bool(source.shards("val"))
    if not has_val:
        acc.print(f"warning: {source.location} has no validation shards: validation is skipped "
                  "and no best/ checkpoint is exported")
    start_trackers(acc, config)
    history = History(acc, config.run_dir / HISTORY)
    trace = trace_path(config.run_dir, acc.process_index) if config.trace_samples else None
    metrics: dict[str, float] = {}
    in_a_row, waited, busy, last_logged = 0, 0.0, 0.0, state.step
    # no bar when a finished run is resumed: nothing is left to train
    bar = tqdm(total=config.steps, initial=state.step, desc="training",
               disable=not acc.is_main_process or state.step >= config.steps)
    for step in range(state.step + 1, config.steps + 1):
        tick = time.perf_counter()
        loss, applied, wait, keys = train_step(loop, batches)
        busy += time.perf_counter() - tick
        waited += wait
        in_a_row = 0 if applied else in_a_row + 1
        state.skipped_steps += 0 if applied else 1
        if in_a_row >= config.max_nonfinite:
            raise TrainingDiverged(f"{in_a_row} steps in a row had non-finite loss or gradients "
                                   f"(at step {step}); lower --lr, or use --precision bf16")
        state.step = step
        bar.update()
        if trace is not None:
            with open(trace, "a") as f:
                f.write(json.dumps({"step": step, "keys": keys}) + "\n")
        if step % config.log_every == 0 or step == config.steps:
            samples = (step - last_logged) * config.batch_size * config.grad_accum * acc.num_processes
            history.log({"train/loss": float(loss), "train/lr": loop.scheduler.get_last_lr()[0],
                         "train/samples_per_s": samples / busy, "train/data_wait_fraction": waited / busy,
                         "train/skipped_steps": state.skipped_steps,
                         "train/skipped_shards": batches.skipped_shards}, step)
            bar.set_postfix(loss=f"{float(loss):.3f}")
            waited, busy, last_logged = 0.0, 0.0, step
        if has_val and (step % config.val_every == 0 or step == config.steps):
            metrics, overlays = validate(loop, source, preprocessing, step)
            history.log(metrics, step)
            log_overlays(acc, overlays, step)
            if metrics["val/dice_mean"] > state.best_score:
                state.best_score, state.best = metrics["val/dice_mean"], {**metrics, "step": step}
                export(acc, loop.weights, config, spec, source, preprocessing, "best", step, metrics)
        if step % config.save_every == 0 or step == config.steps:
            save_checkpoint(loop, state, batches)
    bar.close()
    export(acc, loop.weights, config, spec, source, preprocessing, "last", state.step, metrics)
    acc.end_training()
    return TrainResult(state.step, state.best, metrics, state.skipped_steps, config.run_dir,
                       acc.process_index, acc.num_processes, batches.skipped_shards)
