"""``liverseg-eval``: thin click commands over :func:`liverseg.evaluate.run_evaluation`.

    liverseg-eval run --checkpoint runs/unet/best --checkpoint runs/resunet/best \\
        --data /data/LiTS --out eval
    liverseg-eval predict --checkpoint runs/unet/best --data /data/LiTS-test --out submission
    liverseg-eval tune --checkpoint runs/unet/best --data shards --split val --out tuned
    liverseg-eval score --reference LiTS/labels --predictions submission --convention lits --out scored
    accelerate launch -m liverseg.eval_cli run ...   # cases split across processes
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from shardgen.clihelp import CONTEXT_SETTINGS, friendly_errors, heavy_imports, verbose_option
from shardgen.labels import SCORED_CLASSES
from shardgen.settings import default_of

# from the torch-free config module: importing inference pulls in torch, timm and smp
# (about 6 s), which `--help` and a mistyped option should not wait for
from .checkpoint import read_evaluable_config
from .config import CONVENTIONS, EVAL_REPORTERS, OUTPUT_FORMATS, TTA_CHOICES, EvalConfig, ScoreConfig
from .vocabulary import TABLE_METRICS, UNITS


def default(name: str):
    return default_of(EvalConfig, name)


def checked(config: EvalConfig) -> EvalConfig:
    """``config`` once every checkpoint folder is there with a config.json that evaluation
    can use: a missing, mistyped or unusable checkpoint is reported at once, before torch
    and smp load (seconds)."""
    for path in config.checkpoints:
        read_evaluable_config(Path(path))
    return config


def shared_options(command=None, split: str = default("split")):
    if command is None:
        return functools.partial(shared_options, split=split)
    options = [
        click.option("--checkpoint", "checkpoints", multiple=True, required=True,
                     help="Exported checkpoint folder (model.safetensors + config.json); "
                          "repeat to ensemble."),
        click.option("--data", required=True,
                     help="LiTS or MSD Task03 folder, or a shard folder / manifest.json "
                          "(its --split cases are read from their source NIfTI)."),
        click.option("--split", default=split, show_default=True,
                     help="Which split of a shard manifest to evaluate."),
        click.option("--out", required=True, help="Output folder."),
        click.option("--tta", type=click.Choice(TTA_CHOICES), default=default("tta"), show_default=True,
                     help="Test-time augmentation: also average over the flips each checkpoint was trained "
                          "with (none for models trained without flip augmentation, the default)."),
        click.option("--postprocess", default=default("postprocess"), show_default=True,
                     help="default, none, or a JSON file of steps (docs/METRICS.md)."),
        click.option("--batch-size", default=default("batch_size"), show_default=True,
                     help="Slices per forward pass."),
        click.option("--device", default=None, help="cuda, cuda:1, cpu  [default: the GPU if any]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


format_option = click.option(
    "--format", "output_format", type=click.Choice(OUTPUT_FORMATS), default=default("output_format"),
    show_default=True, help="Predictions as NIfTI label maps; dicom-seg: for a DICOM series input also a "
                            "DICOM Segmentation (predictions/NAME.seg.dcm) that viewers and PACS open over the series.")


@click.group(context_settings=CONTEXT_SETTINGS)
@verbose_option
def main() -> None:
    """Evaluate liver / tumour segmentation checkpoints the way LiTS scores them."""


@main.command()
@shared_options
@format_option
@click.option("--report-to", type=click.Choice(EVAL_REPORTERS), default=default("report_to"), show_default=True,
              help="Also log to Weights & Biases (offline without an API key or network).")
@click.option("--convention", type=click.Choice(CONVENTIONS), default=default("convention"), show_default=True,
              help="lits: also score every variant as the LiTS challenge scorer does (summary.json: "
                   "lits_official, under its names).")
@click.option("--report/--no-report", default=default("report"), show_default=True,
              help="Draw charts/, panels/ and report.html (a few seconds); --no-report writes the "
                   "metrics and summary only, e.g. in a sweep.")
@friendly_errors
def run(report_to: str, **options) -> None:
    """Predict, postprocess and score labelled cases: each checkpoint, their ensemble and
    the postprocessed ensemble. Writes predictions/, metrics.csv, summary.json and, unless
    --no-report, charts/, panels/ and report.html into --out."""
    config = checked(EvalConfig(**options, report_to=report_to, with_labels=True))
    with heavy_imports():
        from .evaluate import run_evaluation

    result = run_evaluation(config)
    if result.summary is not None:
        print_table(result.summary)
        print_official(result.summary.get("lits_official"))
        if result.report is not None:
            click.echo(f"report: {result.report}")
    finish(result)


@main.command()
@shared_options
@format_option
@friendly_errors
def predict(**options) -> None:
    """Predict unlabelled cases (e.g. LiTS test-volume-N): writes predictions/ as uint8
    NIfTI (test-segmentation-N.nii) in each input's shape and affine."""
    config = checked(EvalConfig(**options, with_labels=False))
    with heavy_imports():
        from .evaluate import run_evaluation

    finish(run_evaluation(config))


@main.command()
@shared_options(split="val")
@friendly_errors
def tune(**options) -> None:
    """Choose the postprocessing's lesion filters on labelled validation cases: of every
    pair of smallest lesion kept (remove_small_lesions) and least mean tumour probability a
    lesion needs (remove_unsure_lesions), the one with the best mean per-case tumour Dice. Writes
    postprocess.json, to pass to `run --postprocess`, and tuning.json into --out. The
    --postprocess chain is the one tuned. Tune on validation cases, never on the test cases
    you report."""
    config = checked(EvalConfig(**options, with_labels=True))
    with heavy_imports():
        from .tune import tune_postprocess

    result = tune_postprocess(config)
    if result.is_main:
        volumes = list(dict.fromkeys(v for v, _ in result.mean_dice))
        probabilities = list(dict.fromkeys(t for _, t in result.mean_dice))
        chosen = (result.min_volume_mm3, result.min_mean_probability)
        click.echo("mean tumour Dice per case by min lesion volume (rows, mm³) and min mean tumour "
                   "probability (columns); * chosen")
        click.echo(f"{'':>8}" + "".join(f"{t:>8g}" for t in probabilities))
        for v in volumes:
            cells = "".join(f"{result.mean_dice[v, t]:>7.3f}{'*' if (v, t) == chosen else ' '}" for t in probabilities)
            click.echo(f"{v:>8g}{cells}")
        click.echo(f"postprocessing written to {result.postprocess}")
    finish(result)


@main.command()
@click.option("--reference", required=True, help="Folder of reference label maps (segmentation-N.nii[.gz]).")
@click.option("--predictions", required=True,
              help="Folder of predicted label maps: segmentation-N, test-segmentation-N or volume-N, "
                   "paired with the reference by N.")
@click.option("--convention", type=click.Choice(CONVENTIONS), default=default_of(ScoreConfig, "convention"),
              show_default=True,
              help="liverseg: liverseg's LiTS-style scores; lits: the LiTS challenge scorer's numbers "
                   "(docs/METRICS.md lists the differences).")
@click.option("--out", required=True, help="Output folder.")
@friendly_errors
def score(**options) -> None:
    """Score existing predictions, without a model: writes scores.json (dataset figures;
    with --convention lits under the official scorer's names, and scores.txt), cases.json
    and cases.csv into --out."""
    from .scoring import headline, score_folders

    config = ScoreConfig(**options)
    result = score_folders(config)
    for name, value in headline(result.dataset, config.convention).items():
        click.echo(f"{name}: {value:.3f}")
    click.echo(f"scored in {result.seconds:.2f} s")
    finish(result)


def print_table(summary: dict) -> None:
    """Per class and variant: mean Dice, IoU, precision, recall and ASSD over cases; then
    the lesion scorecard, one column per variant."""
    from .report import scorecard_rows  # matplotlib: not for --help

    metrics = TABLE_METRICS
    heads = [f"{m} ({UNITS[m]})" if m in UNITS else m for m in metrics]
    click.echo(f"{'class':<7} {'variant':<24}" + "".join(f"{h:>10}" for h in heads))
    for cls in SCORED_CLASSES:
        for variant, scores in summary["variants"].items():
            values = [scores[cls][m]["mean"] for m in metrics]
            cells = "".join(f"{v:>10.3f}" if v == v else f"{'–':>10}" for v in values)
            click.echo(f"{cls:<7} {variant:<24}{cells}")
    cards = {variant: scorecard_rows(scores) for variant, scores in summary["variants"].items()}
    width = {v: max(len(v), *(len(text) for _, text in rows)) + 2 for v, rows in cards.items()}
    names = [name for name, _ in next(iter(cards.values()), [])]
    label = max((len(n) for n in names), default=0) + 1
    click.echo(f"\n{'lesion scorecard':<{label}}" + "".join(f"{v:>{width[v]}}" for v in cards))
    for i, name in enumerate(names):
        click.echo(f"{name:<{label}}" + "".join(f"{rows[i][1]:>{width[v]}}" for v, rows in cards.items()))


def print_official(official: dict | None) -> None:
    """The LiTS scorer's figures, one row per name, one column per variant."""
    if not official:
        return
    width = {v: max(len(v), 9) + 2 for v in official}
    names = list(next(iter(official.values())))
    label = max(len(n) for n in names) + 1
    click.echo(f"\n{'LiTS official':<{label}}" + "".join(f"{v:>{width[v]}}" for v in official))
    for name in names:
        click.echo(f"{name:<{label}}" + "".join(f"{official[v][name]:>{width[v]}.3f}" for v in official))


def finish(result) -> None:
    if not result.is_main:
        return  # a multi-process run: the main process reports
    for item in result.failed:
        click.echo(f"failed: {item['case']}: {item['error']}", err=True)
    click.echo(f"{result.cases} case(s) done, {len(result.failed)} failed; outputs in {result.out}")
    if result.failed:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
