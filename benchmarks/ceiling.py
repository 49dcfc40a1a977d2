"""What the per-case tumour Dice of a set of cases allows: liverseg.oracle's visible-lesion
oracle over a grid of thresholds (docs/PERFORMANCE.md, docs/METRICS.md).

    python -m benchmarks.ceiling demo-out/cpu-256px-100cases/shards --split test
    python -m benchmarks.ceiling PHANTOM_FOLDER --min-cm3 0,0.5,1 --min-hu 0,30
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import click
import numpy as np

from liverseg.oracle import lesion_table, oracle_dice
from shardgen.clihelp import friendly_errors


@click.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--split", default="test", show_default=True, help="Split of a shard manifest (ignored for a folder).")
@click.option("--min-cm3", "volumes", default="0,0.5,1,2", show_default=True,
              help="Smallest lesion volumes the oracle finds, comma-separated.")
@click.option("--min-hu", "contrasts", default="0,20,30,40", show_default=True,
              help="Smallest |contrast| to the liver around a lesion the oracle finds, comma-separated.")
@friendly_errors
def main(data: Path, split: str, volumes: str, contrasts: str) -> None:
    """What the per-case tumour Dice of a set of cases allows: the mean an oracle would
    score that segments exactly every reference lesion of at least MIN_CM3 whose median HU
    differs from the liver around it by at least MIN_HU, and nothing else. DATA is a LiTS /
    MSD folder or a shard manifest (its cases are read from their source files). The oracle
    is liverseg.oracle's, the one `liverseg-eval run` reports at its default thresholds."""
    from liverseg.evaluate import find_cases
    from shardgen.nifti import load_case

    try:
        rows, columns = ([float(x) for x in text.split(",")] for text in (volumes, contrasts))
        sources, _ = find_cases(data, split, with_labels=True)
    except ValueError as exc:
        raise click.BadParameter(f"--min-cm3 and --min-hu take comma-separated numbers ({exc})") from None
    scores: dict[tuple[float, float], list[float]] = {(v, c): [] for v in rows for c in columns}
    for source in sources:
        case = load_case(source.image, source.label)
        lesions = lesion_table(case.label, case.image, case.spacing)
        for v, c in scores:
            scores[v, c].append(oracle_dice(lesions, v, c))
        print(f"{source.case}: " + (", ".join(f"{v:.1f} cm³ {c:+.0f} HU" for _, v, c in lesions) or "no lesion"))
    print(f"# ceiling, {date.today()}, {data} ({split}), {len(sources)} cases: mean per-case tumour Dice of "
          "an oracle finding exactly the lesions of >= MIN_CM3 and >= MIN_HU contrast")
    print("min cm³ \\ min HU " + "".join(f"{c:>8g}" for c in columns))
    for v in rows:
        print(f"{v:>17g} " + "".join(f"{np.mean(scores[v, c]):8.3f}" for c in columns))


if __name__ == "__main__":
    main()
