"""``liverseg-shards``: thin click commands; each parses flags, builds a config, calls one function."""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from .build import BuildConfig, Selection, build_shards
from .clihelp import CONTEXT_SETTINGS, friendly_errors, verbose_option
from .errors import ShardError, ShardgenError
from .preprocess import Preprocessing
from .settings import default_of


def numbers(kind: type, count: int, expected: str):
    """A click callback parsing "A,B,..." into a tuple of ``count`` ``kind``; ``expected``
    says what was wanted in the error."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            parts = tuple(kind(v) for v in value.split(","))
        except ValueError:
            parts = ()
        if len(parts) != count:
            raise click.BadParameter(f"expected {expected}, got {value!r}")
        return parts

    return parse


class PlannedBar:
    """A progress bar made only once the number of items is known (``plan``), so that an
    error found while planning (no cases, a bad split file) shows no empty bar."""

    def __init__(self, desc: str, unit: str):
        self.desc, self.unit, self.bar = desc, unit, None

    def plan(self, total: int) -> None:
        self.bar = tqdm(total=total, desc=self.desc, unit=self.unit)

    def write(self, text: str) -> None:
        (self.bar.write if self.bar is not None else tqdm.write)(text)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def __enter__(self) -> "PlannedBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def joined(values) -> str:
    """A tuple of numbers as the "A,B,..." text the callbacks above parse."""
    return ",".join(f"{v:g}" for v in values)


def number_pair(kind: type):
    """A click callback parsing "A,B" into a tuple of two ``kind``."""
    return numbers(kind, 2, "two numbers as A,B")


@click.group(context_settings=CONTEXT_SETTINGS)
@verbose_option
def main() -> None:
    """Turn CT volumes into WebDataset shards for liverseg.

    \b
    Typical use:
      liverseg-shards phantom --out phantoms --cases 20 --size 256
      liverseg-shards build --input phantoms --out shards --size 256
      liverseg-shards inspect shards
      liverseg-shards verify shards
    """


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the NIfTI files.")
@click.option("--cases", type=click.IntRange(min=1), default=10, show_default=True, help="Number of cases.")
@click.option("--seed", type=int, default=0, show_default=True, help="Case i depends only on (seed, i).")
@click.option("--size", type=click.IntRange(min=16), default=512, show_default=True, help="In-plane matrix size.")
@click.option("--slices", callback=number_pair(int), default="80,200", show_default=True,
              help="MIN,MAX slices per case.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes.")
@friendly_errors
def phantom(out: Path, cases: int, seed: int, size: int, slices: tuple[int, int], workers: int) -> None:
    """Write synthetic portal-venous abdominal CT cases in LiTS layout
    (volume-i.nii.gz, segmentation-i.nii.gz) — see docs/PHANTOMS.md."""
    from .phantom import write_phantoms

    if not 1 <= slices[0] <= slices[1]:
        raise ShardgenError(f"--slices must be MIN,MAX with 1 <= MIN <= MAX, got {slices}")
    with tqdm(total=cases, desc="phantoms", unit="case") as bar:
        write_phantoms(out, cases, seed=seed, size=size, slices=slices, on_case=lambda i: bar.update(),
                       workers=workers)
    click.echo(f"wrote {cases} cases to {out}")


@main.command()
@click.option("--input", "inputs", type=click.Path(path_type=Path), multiple=True, required=True,
              help="Folder with LiTS (volume-N / segmentation-N) or MSD Task03 files; repeatable.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for shards + manifest.json.")
@click.option("--size", type=click.IntRange(min=8), default=default_of(Preprocessing, "size"), show_default=True,
              help="Output slice size (pixels).")
@click.option("--window", callback=number_pair(float), default=joined(default_of(Preprocessing, "window")),
              show_default=True, help="HU window LOW,HIGH.")
@click.option("--context", type=click.IntRange(min=0), default=default_of(Preprocessing, "context"), show_default=True,
              help="Neighbouring slices on each side stacked as channels (2k+1 channels).")
@click.option("--spacing-mm", type=click.FloatRange(min=0, min_open=True), default=None,
              help="In-plane pixel size of the slices (mm), centre-cropped or padded to --size "
                   "[default: the size that fits each scan's field of view].")
@click.option("--margin-mm", type=click.FloatRange(min=0), default=default_of(Selection, "margin_mm"),
              show_default=True, help="Keep slices within this distance of the liver.")
@click.option("--background-fraction", type=click.FloatRange(0, 1), default=default_of(Selection, "background_fraction"),
              show_default=True, help="Fraction of the other slices kept (seeded).")
@click.option("--split-fractions", callback=numbers(float, 3, "TRAIN,VAL,TEST fractions"),
              default=joined(default_of(BuildConfig, "fractions")), show_default=True,
              help="TRAIN,VAL,TEST fractions of cases.")
@click.option("--split", "split_file", type=click.Path(path_type=Path), default=None,
              help='JSON split file: {"train": [ids], "val": [...], "test": [...]}.')
@click.option("--seed", type=int, default=default_of(BuildConfig, "seed"), show_default=True,
              help="Seed of the split and the slice choice.")
@click.option("--stratify/--no-stratify", default=default_of(BuildConfig, "stratify"), show_default=True,
              help="Spread tumour-free cases over train/val/test in proportion.")
@click.option("--workers", type=click.IntRange(min=1), default=default_of(BuildConfig, "workers"), show_default=True,
              help="Processes.")
@click.option("--num-nodes", type=click.IntRange(min=1), default=default_of(BuildConfig, "num_nodes"),
              show_default=True, help="Machines sharing the work (cases are partitioned).")
@click.option("--node-rank", type=click.IntRange(min=0), default=default_of(BuildConfig, "node_rank"),
              show_default=True, help="This machine's index.")
@click.option("--skip-bad", is_flag=True, help="Exit 0 even if some cases were rejected.")
@friendly_errors
def build(inputs, out, size, window, context, spacing_mm, margin_mm, background_fraction, split_fractions,
          split_file, seed, stratify, workers, num_nodes, node_rank, skip_bad) -> None:
    """Validate, preprocess and write cases as WebDataset shards (one per case) with a manifest.

    Re-running resumes: finished shards are kept, the rest are (re)written. Bad cases are
    skipped with a one-line reason and listed in the manifest under "rejected".
    """
    config = BuildConfig(
        inputs=tuple(inputs), out=out,
        preprocessing=Preprocessing(window=window, size=size, context=context, spacing_mm=spacing_mm),
        selection=Selection(margin_mm=margin_mm, background_fraction=background_fraction),
        fractions=split_fractions, seed=seed, split_file=split_file, stratify=stratify, workers=workers,
        num_nodes=num_nodes, node_rank=node_rank)
    with PlannedBar("cases", "case") as bar:
        result = build_shards(config, on_case=lambda r: report_case(r, bar), on_plan=bar.plan)
    totals = result.manifest["totals"]
    click.echo(f"wrote {result.manifest_path} — " + ", ".join(
        f"{s}: {t['cases']} cases / {t['targets']} slices" for s, t in totals.items()))
    if result.rejected and not skip_bad:
        raise click.ClickException(f"{len(result.rejected)} case(s) rejected (listed in "
                                   f"{result.manifest_path.name}); pass --skip-bad to accept that")


def report_case(result: dict, bar: PlannedBar) -> None:
    if "rejection" in result:
        r = result["rejection"]
        bar.write(f"rejected {r.file}: {r.reason}")
    bar.update()


@main.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Path of the merged manifest (e.g. SHARDS/manifest.json).")
@friendly_errors
def merge(parts: tuple[Path, ...], out: Path) -> None:
    """Join the per-node manifests of a --num-nodes build into one manifest."""
    from .manifest import merge_manifests

    merged = merge_manifests(list(parts), out)
    click.echo(f"wrote {out}: {len(merged['shards'])} shards, {len(merged['rejected'])} rejected")


@main.command("inspect")
@click.argument("shards", type=click.Path(exists=True, path_type=Path))
@click.option("--png", type=click.Path(path_type=Path), default=None,
              help="Where to save the sample grid [default: SHARDS/inspect.png].")
@click.option("--count", type=click.IntRange(min=0), default=16, show_default=True, help="Samples in the grid.")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def inspect_command(shards: Path, png: Path | None, count: int, seed: int) -> None:
    """Counts per split, class balance, and a PNG grid of random slices with masks overlaid.

    Every listed shard must be present with its recorded size; a missing or damaged shard
    is named in one line (exit 1). Use `verify` to read every shard to the end.
    """
    from .inspect import inspect_shards

    folder = shards if shards.is_dir() else shards.parent
    _, written = inspect_shards(shards, png or folder / "inspect.png", count, seed,
                                on_summary=lambda lines: click.echo("\n".join(lines)))
    if written:
        click.echo(f"sample grid: {written}")


@main.command()
@click.argument("shards", type=click.Path(exists=True, path_type=Path))
@friendly_errors
def verify(shards: Path) -> None:
    """Check every shard listed in SHARDS/manifest.json (or the manifest SHARDS).

    \b
    Each shard must be present, have the recorded size and sha256, and read to the end:
    every sample is decoded and the samples and targets counted against the manifest.
    Prints one line per bad shard (SHARD: REASON), then "N shards ok, M bad".
    Exit status 0 if all are good, 1 otherwise.
    """
    from .verify import verify_shards

    with tqdm(desc="shards", unit="shard", delay=1) as bar:  # no bar for a quick check
        problems = verify_shards(shards, on_plan=lambda n: setattr(bar, "total", n),
                                 on_shard=lambda entry, problem: report_shard(problem, bar))
        checked = bar.n
    click.echo(f"{checked - len(problems)} shards ok, {len(problems)} bad")
    if problems:
        raise click.exceptions.Exit(1)


def report_shard(problem: ShardError | None, bar: tqdm) -> None:
    if problem is not None:
        bar.write(str(problem))
    bar.update()


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the summary and every case's numbers to this JSON file.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes.")
@friendly_errors
def stats(folder: Path, json_path: Path | None, workers: int) -> None:
    """Lesion and image statistics of a LiTS / MSD folder (phantoms or real data): lesions
    per case, sizes, contrast to the liver around them, heterogeneity, liver coverage in z,
    liver noise, spacings. Definitions: shardgen/stats.py. Unreadable cases are skipped
    with a one-line reason."""
    from .stats import format_table, measure_folder, summarise, write_json

    with PlannedBar("cases", "case") as bar:
        cases, skipped = measure_folder(folder, workers, on_plan=bar.plan, on_result=lambda r: report_case(r, bar))
    summary = summarise(cases, skipped=len(skipped))
    click.echo(format_table(summary))
    if json_path is not None:
        write_json(json_path, summary, cases, skipped)
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
