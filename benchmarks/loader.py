"""The training loader (liverseg.data.train_loader) on one core (docs/PERFORMANCE.md).

    python -m benchmarks.loader                         # batch 32, 3000 samples timed
    python -m benchmarks.loader --samples 12000
"""

from __future__ import annotations

import itertools
import time
from datetime import date
from pathlib import Path

import click

from .common import benchmark_shards, machine, phantom_options, work_folder


@click.command()
@phantom_options
@click.option("--batch-size", default=32, show_default=True)
@click.option("--samples", default=3000, show_default=True, help="Samples timed (after a warm-up batch).")
def main(cases: int, slices: int, size: int, work: Path | None, batch_size: int, samples: int) -> None:
    """Training samples/s on ONE core through the real training loader (liverseg.data):
    tar reading, decoding, 2.5D stacking, shuffle buffer, batching into uint8 tensors."""
    import torch

    from liverseg.data import LoaderSettings, open_shards, train_loader

    torch.set_num_threads(1)
    source = open_shards(benchmark_shards(work_folder(work), 1, cases, slices, size))
    settings = LoaderSettings(batch_size=batch_size, workers=0, shuffle_buffer=1000)
    batches = iter(train_loader(source, 1, settings))
    images, _ = next(batches)
    start = time.perf_counter()
    n = sum(len(b[0]) for b in itertools.islice(batches, samples // batch_size))
    rate = n / (time.perf_counter() - start)
    print(f"# loader, {date.today()}, {machine()}")
    print(f"{size}x{size}, {images.shape[1]} channels, batch {batch_size}, shuffle buffer 1000, "
          f"workers 0 (this process only): {rate:.0f} training samples/s on one core")


if __name__ == "__main__":
    main()
