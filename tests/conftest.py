"""Shared fixtures: tiny phantoms and hand-made NIfTI cases, shards and checkpoints built
once per run, and a warm interpreter for tests that need a process of their own."""

from __future__ import annotations

import atexit
import builtins
import dataclasses
import gc
import json
import multiprocessing
import os
import resource
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

# Under pytest-xdist (launch/test.sh runs one worker per core) each worker gets its share
# of the cores for torch's and BLAS's threads, set before either is imported: two workers
# of two threads each on two cores spin against each other (docs/PERFORMANCE.md, "Test suite").
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as ornt

from shardgen.clihelp import heavy_imports
from shardgen.orientation import CANONICAL_AXCODES, affine_for


def save_canonical(path: Path, canonical: np.ndarray, spacing=(2.0, 0.8, 0.8),
                   axcodes=("L", "P", "S"), origin=(-170.0, -180.0, 0.0)) -> np.ndarray:
    """Store a (z, row, col) array as NIfTI with the given voxel axes; returns the affine."""
    affine, _ = affine_for(canonical.shape, spacing, axcodes, origin)
    transform = ornt.ornt_transform(ornt.axcodes2ornt(CANONICAL_AXCODES), ornt.axcodes2ornt(axcodes))
    nib.save(nib.Nifti1Image(ornt.apply_orientation(canonical, transform), affine), str(path))
    return affine


def blob_case(depth: int = 12, size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small canonical image/label pair: an ellipse of 'liver' with a 'tumour' inside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(0, 15, (depth, size, size)).astype(np.float32)
    label = np.zeros((depth, size, size), np.uint8)
    liver = ((yy - size * 0.4) / (size * 0.2)) ** 2 + ((xx - size * 0.35) / (size * 0.25)) ** 2 < 1
    for z in range(depth // 4, 3 * depth // 4):
        label[z][liver] = 1
        image[z][liver] += 110
    label[depth // 2][(yy - size * 0.4) ** 2 + (xx - size * 0.35) ** 2 < (size * 0.06) ** 2] = 2
    return np.rint(image).astype(np.int16), label


def write_blob_case(folder: Path, index: int, gz: bool = True, **kwargs) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image, label = blob_case(seed=index)
    ext = ".nii.gz" if gz else ".nii"
    vol, seg = folder / f"volume-{index}{ext}", folder / f"segmentation-{index}{ext}"
    save_canonical(vol, image, **kwargs)
    save_canonical(seg, label, **kwargs)
    return vol, seg


def labels(shape, liver=(), tumour=()) -> np.ndarray:
    """A label volume: 0, then 1 in each ``liver`` box, then 2 in each ``tumour`` box."""
    out = np.zeros(shape, np.uint8)
    for box in liver:
        out[box] = 1
    for box in tumour:
        out[box] = 2
    return out


def pytest_collection_modifyitems(config, items):
    """The slow tests first: with one worker per core (pytest-xdist) the long ones then
    run beside the many short ones, and no worker is left with a long one at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Test modules import torch, timm and smp: without the garbage collector's passes over
    them while they load and during the tests (``heavy_imports``)."""
    with heavy_imports():
        return (yield)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``):
    their 64 px batches and small convolutions are too small to split, and two threads on a
    shared 2-core machine spend more time waiting for each other than computing. (Under
    pytest-xdist each worker already has its share of the cores.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name``, made by ``build(folder)`` once per test run: under pytest-xdist
    the first worker to ask builds it while any other waits, and every worker reads the
    same folder (the workers' temporary folders share a parent unique to the run)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six tiny phantom cases (64 px, 10-16 slices), shared by the tests that only read them."""
    from shardgen.phantom import write_phantoms

    return built_once(tmp_path_factory, "phantoms", lambda out: write_phantoms(out, 6, seed=3, size=64, slices=(10, 16)))


@pytest.fixture(scope="session")
def train_shards(phantom_dir, tmp_path_factory) -> Path:
    """64 px shards of the six phantoms: three training, one validation and two test cases.
    Built once per run and shared by every test that streams, trains or evaluates: read
    only (a test that changes shards changes a copy)."""
    from shardgen.build import BuildConfig, build_shards
    from shardgen.preprocess import Preprocessing

    return built_once(tmp_path_factory, "train-shards", lambda out: build_shards(
        BuildConfig(inputs=(phantom_dir,), out=out, preprocessing=Preprocessing(size=64), fractions=(0.5, 0.17, 0.33))))


# the settings of every tiny training: 3 steps, one validation and one save at the end. A
# small timm encoder and a narrow decoder: 1 s and 8 MB of checkpoints per run, where
# resnet18 takes 3-4 s and writes 275 MB (weights, optimizer state, best/ and last/)
TINY_TRAINING = dict(encoder="tu-mobilenetv3_small_050", decoder_channels=(32, 16, 16, 8, 8), steps=3, batch_size=2,
                     val_every=3, save_every=3, log_every=1, workers=0, shuffle_buffer=8, warmup_steps=2)


@pytest.fixture(scope="session")
def trained(train_shards, tmp_path_factory) -> dict:
    """A U-Net and a ResUNet trained with TINY_TRAINING on train_shards, once per run:
    ``{arch: (run folder, TrainResult)}``. The U-Net learns with left-right flips (so
    ``--tta flips`` uses them), the ResUNet without. Shared by the test workers (the
    results are read back from the run folder's JSON). Read only."""
    from liverseg.config import AugmentConfig, TrainConfig
    from liverseg.train import TrainResult, train

    def build(runs: Path) -> None:
        for arch, flip_lr in (("unet", 0.5), ("resunet", 0.0)):
            config = TrainConfig(shards=str(train_shards), out=str(runs / arch), arch=arch,
                                 augment=AugmentConfig(flip_lr=flip_lr), **TINY_TRAINING)
            result = dataclasses.asdict(train(config))
            (runs / f"{arch}.json").write_text(json.dumps({**result, "run_dir": str(result["run_dir"])}))

    runs = built_once(tmp_path_factory, "runs", build)
    results = {arch: json.loads((runs / f"{arch}.json").read_text()) for arch in ("unet", "resunet")}
    return {arch: (runs / arch, TrainResult(**{**r, "run_dir": Path(r["run_dir"])})) for arch, r in results.items()}


@pytest.fixture(scope="session")
def checkpoints(trained) -> list[str]:
    """The best checkpoints of ``trained``: U-Net first, then ResUNet."""
    return [str(trained[arch][0] / "best") for arch in ("unet", "resunet")]


# --------------------------------------------------------------------------- processes

# Importing torch, timm and segmentation_models_pytorch costs about 10 s of CPU, more than
# most runs the tests start. A fork server imports them once per test run and every run
# below is a fresh process forked from it: its own exit code, signals, limits, stdout and
# stderr, as with `python ...`, without paying the imports again. Modules missing here are
# skipped by the server (a preload ImportError is ignored).
PRELOAD = ["torch", "accelerate", "safetensors.torch", "segmentation_models_pytorch", "webdataset",
           "matplotlib.pyplot", "liverseg.train", "liverseg.evaluate", "liverseg.eval_cli"]
_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(PRELOAD)


def _run_forked(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str,
                address_space: int | None, peak: str, start_method: str) -> None:
    """The child: run ``python ARGV`` (``-c CODE ...``, ``-m MODULE ...`` or ``SCRIPT ...``)."""
    gc.freeze()  # the server's modules, as heavy_imports leaves them in a process of the product
    # the fork server made its children's default start method its own: give back Python's,
    # or every data loader worker would start a fork server of its own (seconds each)
    multiprocessing.set_start_method(start_method, force=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        if fd == 2 and err == out:
            os.dup2(1, 2)
            continue
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    if address_space is not None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    if env.get("OMP_NUM_THREADS"):  # read by the OpenMP runtime when torch loaded, in the server
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path.insert(0, "")
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # a forked child leaves with os._exit: run what Python's exit would
        Path(peak).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def start_python(argv: list[str], *, out: str | Path, err: str | Path | None = None,
                 env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 address_space: int | None = None, peak: str | Path | None = None) -> multiprocessing.Process:
    """Start ``python ARGV`` in a process forked from the warm server (see PRELOAD), its
    stdout written to the file ``out`` and its stderr to ``err`` (``out`` too if None), and
    return at once: ``exitcode`` is None while it runs, -N if signal N killed it.
    ``address_space`` caps its virtual memory (RLIMIT_AS) before it runs anything; ``peak``
    is a file that receives its peak resident memory in KiB."""
    args = [str(a) for a in argv]
    child = _SERVER.Process(target=_run_forked, args=(
        args, dict(os.environ if env is None else env), str(cwd or os.getcwd()), str(out), str(err or out),
        address_space, str(peak or os.devnull), multiprocessing.get_start_method()))
    child.start()
    return child


def run_python(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
               timeout: float = 300, address_space: int | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], capture_output=True, text=True)``, in a
    process forked from the warm server (``start_python``). A child killed by signal N
    returns -N, as subprocess reports it. The result's ``peak_mb`` is the child's peak
    resident memory (the server's pages it started with included), None if it was killed."""
    import tempfile

    args = [str(a) for a in argv]
    with tempfile.TemporaryDirectory(prefix="run-python-") as folder:
        out, err, peak = (os.path.join(folder, name) for name in ("stdout", "stderr", "peak"))
        child = start_python(args, out=out, err=err, env=env, cwd=cwd, address_space=address_space, peak=peak)
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
        text = [Path(path).read_text(errors="replace") if os.path.exists(path) else "" for path in (out, err)]
        done = subprocess.CompletedProcess([sys.executable, *args], child.exitcode, *text)
        done.peak_mb = int(Path(peak).read_text()) / 1024 if os.path.exists(peak) and os.path.getsize(peak) else None
    return done


def console_script(name: str) -> list[str]:
    """``run_python`` arguments that run the installed console script ``name``."""
    code = ("import sys\nfrom importlib.metadata import entry_points\n"
            f"sys.argv[0] = {name!r}\n"
            f"sys.exit(entry_points(group='console_scripts', name={name!r})[{name!r}].load()())\n")
    return ["-c", code]


def accelerate_launch(*args: str | Path) -> list[str]:
    """``run_python`` / ``start_python`` arguments of ``accelerate launch ARGS`` with this
    interpreter (not whichever ``accelerate`` is first on PATH): the one way the tests start
    launchers. The launcher itself forks from the warm server; the processes it launches
    are fresh interpreters, as on a real machine."""
    return ["-m", "accelerate.commands.launch", *map(str, args)]
