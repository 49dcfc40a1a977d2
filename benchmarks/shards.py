"""Shard writing, codecs and reading shards back (docs/PERFORMANCE.md, docs/FORMAT.md).

    python -m benchmarks.shards write                  # 2 cases x 300 slices at 512x512, one core
    python -m benchmarks.shards write --cases 3 --slices 400
    python -m benchmarks.shards codecs                 # per codec, liver slices of a 512 phantom
    python -m benchmarks.shards read [--context 1]     # samples/s, one process, no torch
"""

from __future__ import annotations

import shutil
import time
from datetime import date
from pathlib import Path

import click
import numpy as np

from shardgen.build import BuildConfig, Selection, build_shards
from shardgen.nifti import read_volume
from shardgen.preprocess import Preprocessing

from .common import benchmark_shards, machine, phantom_inputs, phantom_options, timed, work_folder


@click.group()
def main() -> None:
    """Shard writing, codecs and reading (see docs/PERFORMANCE.md)."""


def time_build(inp: Path, out: Path, size: int, select_all: bool) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    selection = Selection(background_fraction=1.0) if select_all else Selection()
    config = BuildConfig(inputs=(inp,), out=out, preprocessing=Preprocessing(size=size),
                         selection=selection, fractions=(1.0, 0.0, 0.0))
    start = time.perf_counter()
    manifest = build_shards(config).manifest
    seconds = time.perf_counter() - start
    depth = sum(c["depth"] for c in manifest["cases"].values())
    samples = sum(s["samples"] for s in manifest["shards"])
    nbytes = sum(s["bytes"] for s in manifest["shards"])
    return {"seconds": seconds, "input_slices": depth, "samples": samples,
            "in_per_s": depth / seconds, "out_per_s": samples / seconds,
            "kb_per_slice": nbytes / samples / 1e3}


def time_read(folder: Path) -> float:
    """Seconds per input slice to read and validate-load the volumes alone."""
    start, depth = time.perf_counter(), 0
    for path in sorted(folder.glob("volume-*")):
        depth += read_volume(path).data.shape[-1]
    return (time.perf_counter() - start) / depth


@main.command()
@phantom_options
def write(cases: int, slices: int, size: int, work: Path | None) -> None:
    """Shard writing on one core (one worker; at 512 from 512 nothing is resized, so no BLAS)."""
    work = work_folder(work)
    gz, raw = phantom_inputs(work, cases, slices, size)
    print(f"# shards benchmark, {date.today()}, {machine()}")
    print(f"# {cases} phantom cases x {slices} slices, {size}x{size}, one worker, context 1")
    print(f"{'input':<8} {'selection':<10} {'in slices/s':>12} {'written/s':>10} {'KB/slice':>9} {'inflate ms/slice':>17}")
    for name, folder in (("nii.gz", gz), ("nii", raw)):
        # a plain .nii is memory-mapped: its reading cost lands inside the build itself
        read = f"{1e3 * time_read(folder):.2f}" if name == "nii.gz" else "-"
        for select_all in (True, False):
            r = time_build(folder, work / "out", size, select_all)
            label = "all" if select_all else "default"
            print(f"{name:<8} {label:<10} {r['in_per_s']:>12.0f} {r['out_per_s']:>10.0f} "
                  f"{r['kb_per_slice']:>9.1f} {read:>17}")
    shutil.rmtree(work / "out", ignore_errors=True)


def candidate_codecs() -> dict[str, tuple]:
    """name → (encode(bytes) -> bytes, decode(bytes) -> bytes) for the codecs installed here."""
    import zlib

    import zstandard

    codecs = {"raw": (lambda b: b, lambda b: b)}
    for level in (1, 3):
        c, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        codecs[f"zstd-{level}"] = (c.compress, d.decompress)
    try:
        import lz4.frame

        codecs["lz4"] = (lz4.frame.compress, lz4.frame.decompress)
    except ImportError:
        pass
    try:
        import blosc2

        params = {"codec": blosc2.Codec.LZ4, "clevel": 5, "filters": [blosc2.Filter.BITSHUFFLE],
                  "typesize": 1, "nthreads": 1}
        codecs["blosc2-lz4-bitshuffle"] = (lambda b: blosc2.compress2(b, **params), blosc2.decompress2)
    except ImportError:
        pass
    codecs["zlib-1"] = (lambda b: zlib.compress(b, 1), zlib.decompress)
    return codecs


@main.command()
@phantom_options
def codecs(cases: int, slices: int, size: int, work: Path | None) -> None:
    """Encode/decode cost and size of one windowed uint8 slice, per codec (about ten liver
    slices of the first phantom case)."""
    from shardgen.nifti import load_case
    from shardgen.preprocess import preprocess_image, preprocess_label

    gz, _ = phantom_inputs(work_folder(work), cases, slices, size)
    case = load_case(gz / "volume-0.nii.gz", gz / "segmentation-0.nii.gz")
    liver_z = np.flatnonzero(case.label.reshape(case.shape[0], -1).max(axis=1))
    zs = liver_z[:: max(1, len(liver_z) // 10)]
    settings = Preprocessing(size=size)
    images = [preprocess_image(case.image[z], settings, case.spacing[1:]).tobytes() for z in zs]
    masks = [preprocess_label(case.label[z], settings, case.spacing[1:]).tobytes() for z in zs]
    print(f"# codecs, {date.today()}, {machine()}; {len(zs)} liver slices of a {size} phantom")
    print(f"{'data':<6} {'codec':<24} {'encode ms':>10} {'decode ms':>10} {'KB':>7}")
    for data_name, blobs in (("image", images), ("mask", masks)):
        for name, (enc, dec) in candidate_codecs().items():
            enc_ms = np.mean([timed(lambda b=b: enc(b), 5)[0] for b in blobs])
            packed = [enc(b) for b in blobs]
            dec_ms = np.mean([timed(lambda p=p: dec(p), 5)[0] for p in packed])
            kb = np.mean([len(p) for p in packed]) / 1e3
            print(f"{data_name:<6} {name:<24} {enc_ms:>10.3f} {dec_ms:>10.3f} {kb:>7.1f}")


@main.command()
@phantom_options
@click.option("--context", default=1, show_default=True)
def read(cases: int, slices: int, size: int, work: Path | None, context: int) -> None:
    """Samples/s of reading shards in one process: webdataset tar reading, decoding and
    2.5D stacking from z-order (no torch collation, no shuffling)."""
    import webdataset as wds

    from shardgen.format import decode_sample, stack_stream
    from shardgen.manifest import read_manifest

    out = benchmark_shards(work_folder(work), context, cases, slices, size)
    manifest = read_manifest(out)
    urls = [str(out / s["path"]) for s in manifest["shards"]]
    best = 0.0
    for _ in range(3):
        start, n = time.perf_counter(), 0
        stream = (decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False))
        for _sample, _stack in stack_stream(stream, context):
            n += 1
        best = max(best, n / (time.perf_counter() - start))
    kb = sum(s["bytes"] for s in manifest["shards"]) / sum(s["samples"] for s in manifest["shards"]) / 1e3
    print(f"# read, {date.today()}, {machine()}")
    print(f"{size}x{size}, context {context}: {best:.0f} training samples/s in one process "
          f"({n} targets), {kb:.1f} KB of shard per stored slice")


if __name__ == "__main__":
    main()
