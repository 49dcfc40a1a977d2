"""Benchmarks behind docs/PERFORMANCE.md. Each prints its figures and the settings used.

    python launch/benchmark.py shards              # shard writing, slices/s per core
    python launch/benchmark.py shards --cases 3 --slices 400
    python launch/benchmark.py cpu-step --encoder resnet18 --encoder tu-regnetx_002
    python launch/benchmark.py augment               # batch augmentation with windows
    python launch/benchmark.py ceiling demo-out/cpu-256px-100cases/shards --split test
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import click
import numpy as np
from isal import igzip

from liverseg.oracle import lesion_table, oracle_dice  # the ceiling's oracle, also used by liverseg-eval run
from shardgen.build import BuildConfig, Selection, build_shards
from shardgen.nifti import read_volume
from shardgen.phantom import write_phantoms
from shardgen.preprocess import Preprocessing


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


@click.group()
def main() -> None:
    """liverseg benchmarks (see docs/PERFORMANCE.md)."""


def phantom_inputs(work: Path, cases: int, slices: int, size: int) -> tuple[Path, Path]:
    """The same phantom cases as .nii.gz (as generated) and as plain .nii."""
    gz, raw = work / f"gz-{cases}-{slices}-{size}", work / f"nii-{cases}-{slices}-{size}"
    if not gz.exists():
        write_phantoms(gz.with_suffix(".tmp"), cases, seed=11, size=size, slices=(slices, slices))
        gz.with_suffix(".tmp").rename(gz)
    if not raw.exists():
        tmp = raw.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for path in gz.glob("*.nii.gz"):
            (tmp / path.name.removesuffix(".gz")).write_bytes(igzip.decompress(path.read_bytes()))
        tmp.rename(raw)
    return gz, raw


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
@click.option("--cases", default=2, show_default=True, help="Phantom cases at 512x512.")
@click.option("--slices", default=300, show_default=True, help="Slices per case.")
@click.option("--size", default=512, show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Where phantoms are cached [default: a temp folder].")
def shards(cases: int, slices: int, size: int, work: Path | None) -> None:
    """Shard writing on one core (one worker; at 512 from 512 nothing is resized, so no BLAS)."""
    work = work or Path(tempfile.gettempdir()) / "liverseg-bench"
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


def timed(fn, repeat: int = 20) -> tuple[float, object]:
    """Median milliseconds of ``fn()`` and its last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), result


def candidate_codecs() -> dict[str, tuple]:
    """name → (encode(bytes) -> bytes, decode(bytes) -> bytes) for the codecs installed here."""
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
    import zlib

    codecs["zlib-1"] = (lambda b: zlib.compress(b, 1), zlib.decompress)
    return codecs


@main.command()
@click.option("--work", type=click.Path(path_type=Path), default=None)
def codecs(work: Path | None) -> None:
    """Encode/decode cost and size of one 512x512 uint8 windowed slice, per codec."""
    from shardgen.nifti import load_case
    from shardgen.preprocess import preprocess_image, preprocess_label

    work = work or Path(tempfile.gettempdir()) / "liverseg-bench"
    gz, _ = phantom_inputs(work, 2, 300, 512)
    case = load_case(gz / "volume-0.nii.gz", gz / "segmentation-0.nii.gz")
    liver_z = np.flatnonzero(case.label.reshape(case.shape[0], -1).max(axis=1))
    zs = liver_z[:: max(1, len(liver_z) // 10)]
    settings = Preprocessing()
    images = [preprocess_image(case.image[z], settings).tobytes() for z in zs]
    masks = [preprocess_label(case.label[z], settings).tobytes() for z in zs]
    print(f"# codecs, {date.today()}, {machine()}; {len(zs)} liver slices of a 512 phantom")
    print(f"{'data':<6} {'codec':<24} {'encode ms':>10} {'decode ms':>10} {'KB':>7}")
    for data_name, blobs in (("image", images), ("mask", masks)):
        for name, (enc, dec) in candidate_codecs().items():
            enc_ms = np.mean([timed(lambda b=b: enc(b), 5)[0] for b in blobs])
            packed = [enc(b) for b in blobs]
            dec_ms = np.mean([timed(lambda p=p: dec(p), 5)[0] for p in packed])
            kb = np.mean([len(p) for p in packed]) / 1e3
            print(f"{data_name:<6} {name:<24} {enc_ms:>10.3f} {dec_ms:>10.3f} {kb:>7.1f}")


@main.command()
@click.option("--work", type=click.Path(path_type=Path), default=None)
@click.option("--context", default=1, show_default=True)
def read(work: Path | None, context: int) -> None:
    """Samples/s of reading shards in one process: webdataset tar reading, decoding and
    2.5D stacking from z-order (no torch collation, no shuffling)."""
    import webdataset as wds

    from shardgen.format import decode_sample, stack_stream
    from shardgen.manifest import read_manifest

    work = work or Path(tempfile.gettempdir()) / "liverseg-bench"
    out = benchmark_shards(work, context)
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
    print(f"512x512, context {context}: {best:.0f} training samples/s in one process "
          f"({n} targets), {kb:.1f} KB of shard per stored slice")


def benchmark_shards(work: Path, context: int) -> Path:
    """Shards of the 512 phantom cases (built once, cached in ``work``)."""
    gz, _ = phantom_inputs(work, 2, 300, 512)
    out = work / f"read-shards-{context}"
    if not (out / "manifest.json").exists():
        build_shards(BuildConfig(inputs=(gz,), out=out, preprocessing=Preprocessing(context=context),
                                 fractions=(1.0, 0.0, 0.0)))
    return out


@main.command()
@click.option("--work", type=click.Path(path_type=Path), default=None)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--samples", default=3000, show_default=True, help="Samples timed (after a warm-up batch).")
def loader(work: Path | None, batch_size: int, samples: int) -> None:
    """Training samples/s on ONE core through the real training loader (liverseg.data):
    tar reading, decoding, 2.5D stacking, shuffle buffer, batching into uint8 tensors."""
    import itertools

    import torch

    from liverseg.data import LoaderSettings, open_shards, train_loader

    torch.set_num_threads(1)
    work = work or Path(tempfile.gettempdir()) / "liverseg-bench"
    source = open_shards(benchmark_shards(work, 1))
    settings = LoaderSettings(batch_size=batch_size, workers=0, shuffle_buffer=1000)
    batches = iter(train_loader(source, 1, settings))
    images, _ = next(batches)
    start = time.perf_counter()
    n = sum(len(b[0]) for b in itertools.islice(batches, samples // batch_size))
    rate = n / (time.perf_counter() - start)
    print(f"# loader, {date.today()}, {machine()}")
    print(f"512x512, {images.shape[1]} channels, batch {batch_size}, shuffle buffer 1000, "
          f"workers 0 (this process only): {rate:.0f} training samples/s on one core")


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
@click.option("--work", type=click.Path(path_type=Path), default=None)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=50, show_default=True)
@click.option("--workers", default=min(8, os.cpu_count() or 1), show_default=True)
@click.option("--warmup", default=5, show_default=True, help="Untimed steps before each measurement.")
@click.option("--encoder", default="resnet34", show_default=True)
@click.option("--device", default="cuda", show_default=True, help="cpu only to check the script itself.")
def gpu(work: Path | None, batch_size: int, steps: int, workers: int, warmup: int, encoder: str,
        device: str) -> None:
    """Training throughput with the real loader vs. the same model on synthetic tensors
    already on the GPU (Unet, 512x512x3, bf16 autocast, channels_last, AdamW), in one run.

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
    work = work or Path(tempfile.gettempdir()) / "liverseg-bench"
    source = open_shards(benchmark_shards(work, 1))
    model = create_model("unet", encoder, 3, 3).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = DiceCELoss()
    x = torch.randint(0, 256, (batch_size, 3, 512, 512), dtype=torch.uint8)
    y = torch.randint(0, 3, (batch_size, 512, 512), dtype=torch.uint8)
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


# --------------------------------------------------------------------------- eval

def _ball(a: np.ndarray, centre_mm, radius_mm: float, spacing, value: int, within=None) -> None:
    """Paint an ellipsoid-in-voxels ball (centre and radius in mm) into ``a``."""
    sp = np.asarray(spacing, float)
    c = np.asarray(centre_mm, float) / sp
    lo = np.maximum(np.floor(c - radius_mm / sp).astype(int), 0)
    hi = np.minimum(np.ceil(c + radius_mm / sp).astype(int) + 1, a.shape)
    z, y, x = (np.arange(l, h) for l, h in zip(lo, hi))
    d2 = (((z[:, None, None] - c[0]) * sp[0]) ** 2 + ((y[None, :, None] - c[1]) * sp[1]) ** 2
          + ((x[None, None, :] - c[2]) * sp[2]) ** 2)
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    inside = d2 <= radius_mm ** 2
    if within is not None:
        inside &= within[box] != 0
    a[box][inside] = value


def _organ(shape, spacing, centre_mm, semi_mm, phases, shift_mm=(0, 0, 0), grow: float = 0.0) -> tuple:
    """Box and mask of a bumpy ellipsoid, deformed by low-frequency waves (one per phase)."""
    sp = np.asarray(spacing, float)
    lo = np.maximum(((np.asarray(centre_mm) - 1.3 * np.asarray(semi_mm)) / sp).astype(int), 0)
    hi = np.minimum(((np.asarray(centre_mm) + 1.3 * np.asarray(semi_mm)) / sp).astype(int), shape)
    z, y, x = (((np.arange(l, h) * s - c - d) / r).astype(np.float32)
               for l, h, s, c, d, r in zip(lo, hi, sp, centre_mm, shift_mm, semi_mm))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    p = phases
    f = z ** 2 + y ** 2 + x ** 2
    f -= 0.18 * np.sin(3.1 * z + p[0]) * np.cos(2.3 * y + p[1])
    f -= 0.15 * np.sin(2.7 * x + p[2]) * np.cos(1.9 * z + p[3])
    f -= 0.10 * np.cos(4.3 * y + p[4]) * np.sin(3.7 * x + p[5])
    return tuple(slice(l, h) for l, h in zip(lo, hi)), f < 1.0 + grow


# radius mm, centre as a fraction of the liver's semi-axes: inside it and 5 mm apart
LESIONS = ((3, (0.3, 0.3, -0.4)), (4, (-0.3, 0.45, 0.2)), (6, (0.1, -0.45, -0.3)), (9, (-0.25, -0.1, 0.4)),
           (12, (0.4, -0.15, 0.05)), (16, (-0.4, -0.1, -0.45)), (22, (0.0, 0.3, -0.1)))


def synthetic_eval_case(shape=(400, 512, 512), spacing=(1.0, 0.75, 0.75), seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference) uint8 labels of a liver with lesions; the prediction has a
    displaced boundary, holes, specks away from the liver, tiny tumour specks, a missed
    lesion and a false one."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    extent = np.asarray(shape) * sp
    centre, semi = extent * (0.5, 0.42, 0.36), np.array([60.0, 78.0, 95.0])
    phases = rng.uniform(0, 2 * np.pi, 6)
    ref, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    box, liver = _organ(shape, sp, centre, semi, phases)
    ref[box][liver] = 1
    box, liver = _organ(shape, sp, centre, semi, phases + 0.05, shift_mm=(1.0, 0.75, 1.5), grow=-0.02)
    pred[box][liver] = 1
    lesions = [(radius, centre + np.array(where) * semi) for radius, where in LESIONS]
    lesions.append((8, lesions[3][1] + (0, 0, 16)))  # overlaps the 9 mm lesion: one component
    for i, (radius, at) in enumerate(lesions):
        _ball(ref, at, radius, sp, 2, within=ref)
        if i != 1:  # the 4 mm lesion is missed
            _ball(pred, at + rng.normal(0, 1.0, 3), radius * rng.uniform(0.85, 1.1), sp, 2, within=pred)
    _ball(pred, centre + (10, -20, 30), 7, sp, 2, within=pred)  # a false lesion
    for _ in range(4):  # tiny tumour specks inside the liver, and holes
        _ball(pred, centre + rng.uniform(-0.4, 0.4, 3) * semi, 1.0, sp, 2, within=pred)
        _ball(pred, centre + rng.uniform(-0.4, 0.4, 3) * semi, 3.0, sp, 0)
    for value in (1, 1, 1, 1, 2):  # specks away from the liver
        _ball(pred, extent * rng.uniform((0.1, 0.1, 0.65), (0.9, 0.9, 0.9)), rng.uniform(2, 5), sp, value)
    return pred, ref


def independent_postprocess(labels: np.ndarray, spacing: tuple) -> np.ndarray:
    """default_postprocess done plainly: scipy on the whole volume, no cropping."""
    from scipy import ndimage as ndi

    cube = np.ones((3, 3, 3), bool)
    components, _ = ndi.label(labels >= 1, structure=cube)
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    out = np.where(components == largest, labels, 0).astype(np.uint8)
    out[ndi.binary_fill_holes(out >= 1) & (out == 0)] = 1
    lesions, _ = ndi.label(out == 2, structure=cube)
    small = np.flatnonzero(np.bincount(lesions.ravel())[1:] * np.prod(spacing) < 10.0) + 1
    small_mask = np.isin(lesions, small)
    touching = np.unique(lesions[ndi.binary_dilation(out == 1, structure=cube) & small_mask])
    out[small_mask] = np.where(np.isin(lesions[small_mask], touching), 1, 0)
    return out


def independent_class_scores(pred: np.ndarray, ref: np.ndarray, spacing: tuple) -> dict[str, float]:
    """Overlap scores and MONAI's surface distances (edges of the whole volume)."""
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    tp, npred, nref = np.count_nonzero(pred & ref), np.count_nonzero(pred), np.count_nonzero(ref)
    edges_pred, edges_ref = get_mask_edges(pred, ref, crop=False)
    both = np.concatenate([get_surface_distance(edges_pred, edges_ref, spacing=spacing),
                           get_surface_distance(edges_ref, edges_pred, spacing=spacing)]).astype(float)
    return {"dice": 2 * tp / (npred + nref), "iou": tp / (npred + nref - tp), "rvd": (npred - nref) / nref,
            "assd": both.mean(), "mssd": both.max(), "hd95": np.percentile(both, 95)}


def independent_detection(pred: np.ndarray, ref: np.ndarray) -> dict[str, int]:
    """LiTS lesion detection with scipy labels and a plain union-find over overlapping pairs."""
    from scipy import ndimage as ndi

    # scipy's default structure: 6-connected lesions, as LiTS (and liverseg.lits) count them
    (ref_lab, n_ref), (pred_lab, n_pred) = ndi.label(ref), ndi.label(pred)
    ref_size, pred_size = np.bincount(ref_lab.ravel()), np.bincount(pred_lab.ravel())
    both = (ref_lab > 0) & (pred_lab > 0)
    pairs, inter = np.unique(np.stack([ref_lab[both], pred_lab[both]]), axis=1, return_counts=True)
    parent = {("r", i): ("r", i) for i in range(1, n_ref + 1)}
    parent |= {("p", j): ("p", j) for j in range(1, n_pred + 1)}

    def find(node):
        while parent[node] != node:
            node = parent[node]
        return node

    for i, j in pairs.T:
        parent[find(("r", int(i)))] = find(("p", int(j)))
    groups: dict = {}
    for node in parent:
        kind, i = node
        g = groups.setdefault(find(node), {"r": 0, "p": 0, "i": 0})
        g[kind] += int((ref_size if kind == "r" else pred_size)[i])
    for (i, _), n in zip(pairs.T, inter):
        groups[find(("r", int(i)))]["i"] += int(n)
    tp = sum(g["r"] > 0 and g["i"] / (g["r"] + g["p"] - g["i"]) > 0.5 for g in groups.values())
    fn = sum(g["r"] > 0 for g in groups.values()) - tp
    fp = sum(g["p"] > 0 and not (g["r"] > 0 and g["i"] / (g["r"] + g["p"] - g["i"]) > 0.5)
             for g in groups.values())
    return {"tp": tp, "fp": fp, "fn": fn}


def independent_scores(pred: np.ndarray, ref: np.ndarray, spacing: tuple) -> dict:
    return {"liver": independent_class_scores(pred >= 1, ref >= 1, spacing),
            "tumour": independent_class_scores(pred == 2, ref == 2, spacing),
            "lesions": independent_detection(pred == 2, ref == 2)}


def staged_runs(postprocess, score, pred: np.ndarray, ref: np.ndarray, spacing: tuple, repeat: int
                ) -> tuple[list[tuple[float, float]], dict]:
    """(postprocess s, scoring s) of each run and the last scores. Runs that allocate fresh
    memory pay ~0.3 s of page faults on the development VM, so ours is timed after a warm-up."""
    times, scores = [], {}
    for _ in range(repeat):
        start = time.perf_counter()
        post = postprocess(pred, spacing)
        middle = time.perf_counter()
        scores = score(post, ref, spacing)
        times.append((middle - start, time.perf_counter() - middle))
    return times, scores


def score_differences(ours: dict, other: dict) -> tuple[float, bool]:
    """Largest |difference| of the metrics both computed, and whether detection agrees."""
    diff = max(abs(ours[c][m] - other[c][m]) for c in ("liver", "tumour") for m in other[c])
    same = all(ours["lesions"][k] == other["lesions"][k] for k in ("tp", "fp", "fn"))
    return float(diff), same


@main.command("eval")
@click.option("--slices", default=400, show_default=True)
@click.option("--size", default=512, show_default=True)
@click.option("--spacing", nargs=3, type=float, default=(1.0, 0.75, 0.75), show_default=True,
              help="z, y, x in mm.")
@click.option("--repeat", default=3, show_default=True,
              help="Timed runs of ours after one untimed (median reported).")
@click.option("--independent-repeat", default=1, show_default=True,
              help="Timed runs of the independent implementation (~45 s each).")
def eval_(slices: int, size: int, spacing: tuple[float, float, float], repeat: int,
          independent_repeat: int) -> None:
    """default_postprocess + lits.score_case on one synthetic case on ONE core, against an
    independent implementation of the same (scipy without cropping, MONAI's edges and
    surface distances, scipy labels and a union-find for lesions)."""
    import torch
    from threadpoolctl import threadpool_limits

    from liverseg import lits
    from liverseg.postprocess import default_postprocess

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)  # MONAI imports torch; nothing here should use it
    pred, ref = synthetic_eval_case((slices, size, size), spacing)
    with threadpool_limits(1):
        (first, *ours_t), ours = staged_runs(default_postprocess(), lits.score_case, pred, ref, spacing,
                                             1 + repeat)
        other_t, other = staged_runs(independent_postprocess, independent_scores, pred, ref, spacing,
                                     independent_repeat)
    print(f"# eval, {date.today()}, {machine()}, pinned to one core")
    print(f"# synthetic case {slices}x{size}x{size}, spacing {spacing} mm, liver "
          f"{np.count_nonzero(ref) * np.prod(spacing) / 1e6:.2f} L, {ours['lesions']['ref_lesions']} "
          f"reference lesions; median of {repeat} runs after a warm-up (ours), of "
          f"{independent_repeat} (independent)")
    print(f"{'implementation':<44} {'postprocess s':>14} {'metrics s':>10} {'total s':>8}  totals")
    for name, runs in (("ours (liverseg.postprocess + liverseg.lits)", ours_t),
                       ("independent (scipy uncropped, MONAI edges)", other_t)):
        post, metrics, total = np.median([[r[0], r[1], sum(r)] for r in runs], axis=0)
        totals = ", ".join(f"{sum(r):.3f}" for r in runs)
        print(f"{name:<44} {post:>14.3f} {metrics:>10.3f} {total:>8.3f}  {totals}")
    mine, theirs = (float(np.median([sum(r) for r in runs])) for runs in (ours_t, other_t))
    diff, same = score_differences(ours, other)
    print(f"independent / ours: {theirs / mine:.1f}x; metrics agree to {diff:.2g}, detection "
          f"{'agrees' if same else 'DIFFERS'} (tp/fp/fn {ours['lesions']['tp']}/{ours['lesions']['fp']}/"
          f"{ours['lesions']['fn']}); ours' untimed first run: {sum(first):.3f} s")


@main.command()
@click.option("--slices", default=400, show_default=True, help="Depth of the synthetic volume.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--encoder", default="resnet34", show_default=True)
@click.option("--size", default=512, show_default=True, help="Network input size (the volume is 512x512).")
@click.option("--device", default="cuda", show_default=True, help="cpu only to check the script itself.")
def infer(slices: int, batch_size: int, encoder: str, size: int, device: str) -> None:
    """Whole-volume inference (liverseg.inference.predict_volume: windowing, resizing,
    2.5D stacking, autocast, softmax, labels back on the host) vs. the bare model on
    synthetic tensors already on the device, in one run. Target >= 90 %."""
    import torch

    from liverseg.inference import Member, autocast_dtype, predict_volume
    from liverseg.models import create_model

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device here (use --device cpu only to test the script)")
    pre = Preprocessing(size=size, context=1)
    model = create_model("unet", encoder, pre.channels, 3).to(device, memory_format=torch.channels_last).eval()
    dtype = autocast_dtype(device)
    x = torch.rand(batch_size, pre.channels, size, size, device=device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def bare() -> float:
        rounds = max(1, slices // batch_size)
        for timed in (False, True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(rounds if timed else 1):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    model(x).float().softmax(1).argmax(1)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return rounds * batch_size / (time.perf_counter() - start)

    def whole() -> float:
        start = time.perf_counter()
        predict_volume([member], volume, device, batch_size)  # returns labels on the host: synchronised
        return slices / (time.perf_counter() - start)

    volume = np.random.default_rng(0).integers(-1000, 1000, (slices, 512, 512)).astype(np.int16)
    member = Member("unet", Path("."), model, pre)
    # warm-up on a whole volume: kernels chosen, and the pinned staging buffers allocated
    # once, as over an evaluation's many cases; then the median of three of each
    whole()
    wholes = sorted(whole() for _ in range(3))
    bares = sorted(bare() for _ in range(3))
    synthetic, whole_rate = bares[1], wholes[1]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# infer, {date.today()}, {name}, torch {torch.__version__}, unet {encoder}, "
          f"{size}x{size}x{pre.channels}, batch {batch_size}, {slices} slices")
    print(f"bare model on device tensors: {synthetic:.4g} slices/s; whole-volume inference: "
          f"{whole_rate:.4g} slices/s ({100 * whole_rate / synthetic:.0f} %); medians of 3 "
          f"(whole: {', '.join(f'{w:.4g}' for w in wholes)})")


# --------------------------------------------------------------------------- ceiling

@main.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--split", default="test", show_default=True, help="Split of a shard manifest (ignored for a folder).")
@click.option("--min-cm3", "volumes", default="0,0.5,1,2", show_default=True,
              help="Smallest lesion volumes the oracle finds, comma-separated.")
@click.option("--min-hu", "contrasts", default="0,20,30,40", show_default=True,
              help="Smallest |contrast| to the liver around a lesion the oracle finds, comma-separated.")
def ceiling(data: Path, split: str, volumes: str, contrasts: str) -> None:
    """What the per-case tumour Dice of a set of cases allows: the mean an oracle would
    score that segments exactly every reference lesion of at least MIN_CM3 whose median HU
    differs from the liver around it by at least MIN_HU, and nothing else. DATA is a LiTS /
    MSD folder or a shard manifest (its cases are read from their source files). The oracle
    is liverseg.oracle's, the one `liverseg-eval run` reports at its default thresholds."""
    from liverseg.errors import LiversegError
    from liverseg.evaluate import find_cases
    from shardgen.errors import ShardgenError
    from shardgen.nifti import load_case

    try:
        rows, columns = ([float(x) for x in text.split(",")] for text in (volumes, contrasts))
        sources, _ = find_cases(data, split, with_labels=True)
    except ValueError as exc:
        raise click.BadParameter(f"--min-cm3 and --min-hu take comma-separated numbers ({exc})") from None
    except LiversegError as exc:
        raise click.ClickException(str(exc)) from None
    scores: dict[tuple[float, float], list[float]] = {(v, c): [] for v in rows for c in columns}
    for source in sources:
        try:
            case = load_case(source.image, source.label)
        except ShardgenError as exc:
            raise click.ClickException(str(exc)) from None
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
    sys.exit(main())
