"""Experiment trackers (W&B, TensorBoard) for training and evaluation: whether W&B can go
online, starting Accelerate's trackers for a training run, the validation overlays, and
an evaluation logged as one W&B run. No torch here; ``wandb``, and ``report`` with its
matplotlib, are imported only by the evaluation's functions, so training never loads them."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import TrainConfig
from .vocabulary import METRICS

if TYPE_CHECKING:
    from accelerate import Accelerator


# --------------------------------------------------------------------------- W&B mode

def wandb_mode() -> str:
    """W&B online only with an API key and a reachable server; otherwise offline at once
    (W&B itself would wait 90 s before giving up)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
    if not has_key:
        return "offline"
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


def start_trackers(accelerator: Accelerator, config: TrainConfig) -> None:
    if config.report_to == "none":
        return
    init_kwargs: dict[str, Any] = {}
    if config.report_to == "wandb":
        init_kwargs["wandb"] = {"mode": wandb_mode(), "dir": str(config.run_dir), "name": config.run_name}
    flat = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
            for k, v in config.to_dict().items()}
    accelerator.init_trackers(config.project, config=flat, init_kwargs=init_kwargs)


# --------------------------------------------------------------------------- training

def log_overlays(accelerator: Accelerator, overlays: list[np.ndarray], step: int) -> None:
    if not overlays or not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_images({"val/overlays": overlays}, step=step)
        elif tracker.name == "tensorboard":
            tracker.log_images({"val/overlays": np.stack(overlays)}, step=step, dataformats="NHWC")


# --------------------------------------------------------------------------- evaluation

def flatten_summary(summary: Mapping) -> dict[str, float]:
    """Scalars of the summary as W&B keys: "ensemble/liver/dice_mean",
    "ensemble/liver/dice_global", "ensemble/detection/recall",
    "ensemble/detection/recall_<10 mm", "ensemble/detection/recall_any_<10 mm",
    "ensemble/detection/tumour_free_fraction", "ensemble/oracle/fraction",
    "ensemble/burden/rmse", "timings/<key>", "cases", "failed"."""
    from .report import as_float, is_number
    flat: dict[str, float] = {}
    for variant, groups in (summary.get("variants") or {}).items():
        for group, values in (groups or {}).items():
            for key, value in (values.items() if isinstance(values, Mapping) else ()):
                flat.update(flatten_value(f"{variant}/{group}", key, value))
    flat.update({f"timings/{k}": float(v) for k, v in (summary.get("timings") or {}).items() if is_number(v)})
    flat["cases"] = as_float(summary.get("cases"))
    flat["failed"] = float(len(summary.get("failed") or []))
    return flat


def flatten_value(prefix: str, key: str, value: Any) -> dict[str, float]:
    from .report import as_float, is_number
    if isinstance(value, Mapping):  # {"mean", "std", ...} of one metric
        return {f"{prefix}/{key}_{s}": float(v) for s, v in value.items() if is_number(v)}
    if key == "by_size":
        return {f"{prefix}/{rule}_{b['bin']}": as_float(b.get(rule))
                for b in value for rule in ("recall", "recall_any")}
    return {f"{prefix}/{key}": float(value)} if is_number(value) else {}


def panel_text(path: Path) -> dict[str, str]:
    from PIL import Image  # pillow comes with matplotlib

    with Image.open(path) as image:
        return {k: str(v) for k, v in getattr(image, "text", {}).items()}


def panels_by_case(panels: Sequence[Path], cases: Sequence[str]) -> dict[str, Path]:
    """The first panel of each case: by the "Case" stored by ``write_panel``, else by the case
    name appearing, as whole words, in the panel's title or file name (longest name wins)."""
    from .report import slug
    found: dict[str, Path] = {}
    for path in panels:
        text = panel_text(Path(path))
        case = text.get("Case")
        if case not in cases:
            words = f"-{slug(text.get('Title') or Path(path).stem)}-"
            matches = [c for c in cases if slug(c) and f"-{slug(c)}-" in words]
            case = max(matches, key=len, default=None)
        if case is not None:
            found.setdefault(case, Path(path))
    return found


def cases_table(rows: Sequence[Mapping], panels: Sequence[Path]):
    from .report import CSV_COLUMNS, as_float, case_order
    import wandb

    images = {case: wandb.Image(str(p)) for case, p in panels_by_case(panels, case_order(rows)).items()}
    table = wandb.Table(columns=[*CSV_COLUMNS, "panel"])
    for r in rows:
        values = [str(r["case"]), str(r["variant"]), str(r["class"]), *(as_float(r.get(m)) for m in METRICS)]
        table.add_data(*values, as_float(r.get("seconds")), images.get(str(r["case"])))
    return table


def log_wandb(summary: Mapping, rows: Sequence[Mapping], charts: Sequence[Path], panels: Sequence[Path],
              run_dir: Path, project: str = "liverseg-eval", mode: str | None = None) -> Path | None:
    """Log the evaluation as one W&B run under ``run_dir/wandb``: the flattened summary
    scalars, each chart and panel, and a table of every case x variant x class with its
    case's panel (W&B stages a table's images under WANDB_DATA_DIR until the run is synced).
    ``mode=None`` picks online only with a key and a reachable server (``wandb_mode``).
    Returns the run's folder (``.../wandb/offline-run-*`` offline), None when disabled."""
    import wandb

    if mode is None:
        mode = wandb_mode()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, dir=str(run_dir), mode=mode, job_type="eval",
                     config=dict(summary.get("config") or {}))
    try:
        run.log({**flatten_summary(summary),
                 **{f"charts/{Path(p).stem}": wandb.Image(str(p)) for p in charts},
                 **{f"panels/{Path(p).stem}": wandb.Image(str(p)) for p in panels},
                 "cases_table": cases_table(rows, panels)})
    finally:
        run.finish()
    return None if mode == "disabled" else Path(run.dir).parent
