"""Training data: shardgen shards streamed per rank, stacked, shuffled and batched, with a
position that a checkpoint saves and a resumed run restores exactly.

Every rank streams its own shards. Each pass over the data ("epoch") is a seeded
permutation of all shards, dealt out to ranks and then to the rank's loader workers. A
worker reads its shards in *blocks* (consecutive shards holding at least
``shuffle_buffer`` target slices, grouped by the manifest's counts) and emits a block's
samples in a seeded random order. The stream's position is therefore three numbers per
worker: (epoch, block, samples of the block already emitted). Every batch carries the
position reached after it; a resumed run re-reads one block and skips to that offset, so
it takes the same samples in the same order as a run that was never stopped.

The training stream never ends (epochs follow each other), so every rank can take exactly
the same number of steps whatever the shard sizes; the validation stream is one finite
pass over the rank's share. The loader is deliberately not passed through
``accelerator.prepare``.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from shardgen.errors import ShardError
from shardgen.format import context_stream, decode_sample, read_samples
from shardgen.manifest import MANIFEST, parse_manifest, read_manifest
from shardgen.settings import default_of

from .config import BAD_SHARD_POLICIES, TrainConfig
from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSource:
    """Where the shards live: a local folder, an http(s) URL of the folder, or a
    ``pipe:`` command template in which ``{}`` stands for a file name in the folder
    (``pipe:aws s3 cp s3://bucket/shards/{} -``). Shard paths come from the manifest,
    which shardgen has checked to stay inside the folder; in a ``pipe:`` command they are
    shell-quoted all the same."""

    location: str
    manifest: dict[str, Any]

    def url(self, relative: str) -> str:
        if self.location.startswith("pipe:"):
            return self.location.replace("{}", shlex.quote(relative))
        if "://" in self.location:
            return self.location.rstrip("/") + "/" + relative
        return str(Path(self.location) / relative)

    def shards(self, split: str) -> list[dict[str, Any]]:
        return [s for s in self.manifest["shards"] if s["split"] == split and s["targets"] > 0]

    def urls(self, split: str) -> list[str]:
        return [self.url(s["path"]) for s in self.shards(split)]


def open_shards(location: str | Path) -> ShardSource:
    """Read the manifest of a shard folder, URL or ``pipe:`` template."""
    location = str(location)
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise ConfigError(f"{location}: a pipe: location needs {{}} where the file name goes")
        command = location.replace("{}", MANIFEST)[len("pipe:"):]
        return ShardSource(location, parse_manifest(_run_pipe(command), location))
    if "://" in location:
        url = location.rstrip("/") + "/" + MANIFEST
        return ShardSource(location, parse_manifest(_fetch(url), url))
    folder = Path(location) if Path(location).is_dir() else Path(location).parent
    return ShardSource(str(folder), read_manifest(location))


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode()
    except OSError as exc:
        raise ConfigError(f"{url}: cannot fetch the manifest ({exc})") from None


def _run_pipe(command: str) -> str:
    result = subprocess.run(command, shell=True, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"pipe:{command} failed ({result.stderr.strip()[-200:]})")
    return result.stdout


# --------------------------------------------------------------------------- reading shards

Item = tuple[list[np.ndarray], np.ndarray, str]  # channel slices, mask, sample key


def read_items(url: str, context: int) -> list[Item]:
    """The target slices of one shard with their context channels, read completely before
    any is used, so a shard damaged half-way is refused whole (ShardError names it)."""
    try:
        with closing(wds.gopen(url, "rb")) as stream:
            decoded = [decode_sample(s, url) for s in read_samples(stream, url)]
        return [(channels, sample.mask, f"{sample.case}/{sample.z}")
                for sample, channels in context_stream(decoded, context)]
    except ShardError:
        raise
    except OSError as exc:  # a missing file, a failing pipe: command, a broken connection
        raise ShardError(url, exc.strerror or str(exc)) from None
    except ValueError as exc:  # a context neighbour missing from the stream
        raise ShardError(url, str(exc)) from None


class BadShards:
    """What a stream does with a shard it cannot read: ``fail`` stops with one line naming
    it, ``skip`` leaves it out with a warning and counts it."""

    def __init__(self, policy: str):
        self.policy = policy
        self.skipped = 0

    def read(self, url: str, context: int) -> list[Item]:
        try:
            return read_items(url, context)
        except ShardError as exc:
            if self.policy == "fail":
                raise
            self.skipped += 1
            log.warning("skipped a bad shard: %s", exc)
            return []


# --------------------------------------------------------------------------- stream position

@dataclass(frozen=True)
class Cursor:
    """Where one worker's stream stands: the next sample is item ``offset`` of block
    ``block`` of pass ``epoch`` (offset 0 means the block has not been read yet)."""

    epoch: int = 0
    block: int = 0
    offset: int = 0


def worker_position() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def epoch_order(count: int, streams: int, seed: int, epoch: int) -> list[int]:
    """Shard indices of one pass, a fresh seeded permutation; repeated until every one of
    ``streams`` (ranks × workers) gets at least one shard."""
    rng = np.random.default_rng([seed, epoch])
    order: list[int] = []
    while len(order) < streams or not order:
        order += rng.permutation(count).tolist()
    return order


def blocks_of(shards: list[int], targets: list[int], block_samples: int) -> list[list[int]]:
    """Consecutive shards grouped until each group holds ``block_samples`` targets."""
    blocks: list[list[int]] = [[]]
    held = 0
    for index in shards:
        if held >= block_samples:
            blocks.append([])
            held = 0
        blocks[-1].append(index)
        held += targets[index]
    return blocks


@dataclass(frozen=True)
class StreamSpec:
    """Everything one rank's training stream depends on; with a cursor per worker it
    determines the samples exactly."""

    urls: tuple[str, ...]
    targets: tuple[int, ...]
    context: int
    batch_size: int
    block_samples: int
    oversample_tumour: float
    seed: int
    rank: int
    world: int
    workers: int  # loader processes (0 counts as one: the main process)
    on_bad_shard: str = "fail"

    @property
    def streams(self) -> int:
        return max(self.workers, 1)

    def role_blocks(self, role: int, epoch: int) -> list[list[int]]:
        streams = self.world * self.streams
        order = epoch_order(len(self.urls), streams, self.seed, epoch)
        mine = order[self.rank * self.streams + role::streams]
        return blocks_of(mine, list(self.targets), self.block_samples)

    def block_items(self, role: int, epoch: int, block: list[int], number: int,
                    bad: BadShards) -> list[Item]:
        """A block's samples in their seeded order, tumour slices repeated on average
        1 + ``oversample_tumour`` times."""
        rng = np.random.default_rng([self.seed, self.rank, role, epoch, number])
        items: list[Item] = []
        for index in block:
            for item in bad.read(self.urls[index], self.context):
                repeats = 1
                if self.oversample_tumour > 0 and (item[1] == 2).any():
                    repeats += int(self.oversample_tumour) + int(rng.random() < self.oversample_tumour % 1)
                items += [item] * repeats
        return [items[i] for i in rng.permutation(len(items))]


def role_stream(spec: StreamSpec, role: int, cursor: Cursor, bad: BadShards
                ) -> Iterator[tuple[Item, Cursor]]:
    """One worker's endless samples from ``cursor`` on, each with the cursor after it."""
    epoch, first, offset = cursor.epoch, cursor.block, cursor.offset
    while True:
        blocks = spec.role_blocks(role, epoch)
        emitted = False
        for number in range(first, len(blocks)):
            items = spec.block_items(role, epoch, blocks[number], number, bad)
            for i in range(offset, len(items)):
                emitted = True
                after = (Cursor(epoch, number, i + 1) if i + 1 < len(items) else
                         Cursor(epoch, number + 1, 0) if number + 1 < len(blocks) else Cursor(epoch + 1, 0, 0))
                yield items[i], after
            offset = 0
        if not emitted and first == 0:
            raise ShardError(spec.urls[0] if len(spec.urls) == 1 else "training shards",
                             "no readable training sample in a whole pass over this worker's shards")
        epoch, first = epoch + 1, 0


def batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor; in a loader worker, allocated in shared memory, so handing
    the batch to the training process costs no further copy (as torch's own collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel)
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def collate(batch: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 tensors (B, C, H, W) and (B, H, W), each slice copied once; conversion to
    float happens on the device."""
    channels, mask = batch[0][0], batch[0][1]
    images = batch_tensor((len(batch), len(channels), *mask.shape))
    masks = batch_tensor((len(batch), *mask.shape))
    image_view, mask_view = images.numpy(), masks.numpy()
    for i, (channels, mask, _) in enumerate(batch):
        for c, plane in enumerate(channels):
            image_view[i, c] = plane
        mask_view[i] = mask
    return images, masks


class RoleBatches(torch.utils.data.IterableDataset):
    """The batches of the worker that plays ``role``, each with the information the main
    process keeps: the role, the cursor after the batch, the samples' keys and how many
    bad shards this role skipped so far. A shard error under the ``fail`` policy becomes
    an ``{"error": (shard, reason, member)}`` item, re-raised by the main process."""

    def __init__(self, spec: StreamSpec, cursors: tuple[Cursor, ...], shift: int, skipped: tuple[int, ...]):
        self.spec, self.cursors, self.shift, self.skipped = spec, cursors, shift, skipped

    def __iter__(self):
        worker, _ = worker_position()
        role = (worker + self.shift) % self.spec.streams
        bad = BadShards(self.spec.on_bad_shard)
        bad.skipped = self.skipped[role]
        batch: list[Item] = []
        try:
            for item, after in role_stream(self.spec, role, self.cursors[role], bad):
                batch.append(item)
                if len(batch) == self.spec.batch_size:
                    info = {"role": role, "cursor": [after.epoch, after.block, after.offset],
                            "keys": [key for _, _, key in batch], "skipped": bad.skipped}
                    yield (*collate(batch), info)
                    batch = []
        except ShardError as exc:
            yield {"error": (exc.shard, exc.reason, exc.member)}


class TrainStream:
    """One rank's endless training batches (uint8 images (B, C, H, W), masks (B, H, W)),
    knowing its exact position: ``state()`` is JSON for a checkpoint, and a stream made
    from that state continues with the very next sample.

    The loader hands out worker w's batches in turn (batch k comes from worker k mod W),
    so after ``consumed`` batches a resumed loader's worker 0 plays role ``consumed mod W``.
    """

    def __init__(self, spec: StreamSpec, state: dict[str, Any] | None = None):
        self.spec = spec
        streams = spec.streams
        self.cursors = [Cursor()] * streams
        self.skipped = [0] * streams
        self.consumed = 0
        self.last_keys: list[str] = []
        if state is not None:
            self._restore(state)
        dataset = RoleBatches(spec, tuple(self.cursors), self.consumed % streams, tuple(self.skipped))
        # its own generator: creating the loader must not draw from the global RNG, which
        # the checkpoint restores for the training step itself
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=spec.workers, pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if spec.workers > 0 else None, generator=torch.Generator().manual_seed(spec.seed))
        self.batches = iter(self.loader)

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = next(self.batches)
        if "error" in item:
            raise ShardError(*item["error"])
        images, masks, info = item
        role = info["role"]
        self.cursors[role] = Cursor(*info["cursor"])
        self.skipped[role] = info["skipped"]
        self.consumed += 1
        self.last_keys = info["keys"]
        return images, masks

    @property
    def skipped_shards(self) -> int:
        return sum(self.skipped)

    def layout(self) -> dict[str, Any]:
        spec = self.spec
        return {"world": spec.world, "rank": spec.rank, "workers": spec.streams, "shards": len(spec.urls),
                "batch_size": spec.batch_size, "block_samples": spec.block_samples, "seed": spec.seed}

    def state(self) -> dict[str, Any]:
        return {**self.layout(), "consumed": self.consumed, "skipped": list(self.skipped),
                "cursors": [[c.epoch, c.block, c.offset] for c in self.cursors]}

    def _restore(self, state: dict[str, Any]) -> None:
        if not valid_position(state):
            raise ConfigError("the saved data position is not one this version of liverseg writes")
        saved = {k: state.get(k) for k in self.layout()}
        if saved != self.layout():
            # another world size, worker count or data: an exact continuation does not
            # exist; start the next pass instead of replaying the first one
            epoch = max((c[0] for c in state["cursors"]), default=0) + 1
            log.warning("the saved data position was made with %s, this run has %s: the stream "
                        "continues from pass %d, not from the exact sample", saved, self.layout(), epoch)
            self.cursors = [Cursor(epoch, 0, 0)] * self.spec.streams
            return
        self.cursors = [Cursor(*c) for c in state["cursors"]]
        self.skipped = list(state["skipped"])
        self.consumed = int(state["consumed"])


def valid_position(state: Any) -> bool:
    """Whether ``state`` has the shape ``TrainStream.state()`` gives (a checkpoint's JSON,
    checked before its numbers position a stream)."""
    def counts(values: Any, width: int | None = None) -> bool:
        return (isinstance(values, list) and (width is None or len(values) == width)
                and all(type(v) is int and v >= 0 for v in values))

    return (isinstance(state, dict) and type(state.get("consumed")) is int and state["consumed"] >= 0
            and isinstance(state.get("cursors"), list) and all(counts(c, 3) for c in state["cursors"])
            and counts(state.get("skipped")) and len(state["skipped"]) == len(state["cursors"]))


@dataclass(frozen=True)
class LoaderSettings:
    """The training settings the loader reads; the defaults are TrainConfig's."""

    batch_size: int = default_of(TrainConfig, "batch_size")
    workers: int = default_of(TrainConfig, "workers")
    shuffle_buffer: int = default_of(TrainConfig, "shuffle_buffer")
    oversample_tumour: float = default_of(TrainConfig, "oversample_tumour")
    seed: int = default_of(TrainConfig, "seed")
    on_bad_shard: str = default_of(TrainConfig, "on_bad_shard")

    @classmethod
    def from_config(cls, config: TrainConfig) -> LoaderSettings:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        if self.on_bad_shard not in BAD_SHARD_POLICIES:
            raise ConfigError(f"on_bad_shard must be one of {BAD_SHARD_POLICIES}, got {self.on_bad_shard!r}")


def train_loader(source: ShardSource, context: int, settings: LoaderSettings, rank: int = 0,
                 world: int = 1, state: dict[str, Any] | None = None) -> TrainStream:
    """An endless stream of training batches for one rank, from ``state`` (a
    ``TrainStream.state()``) when resuming."""
    shards = source.shards("train")
    if not shards:
        raise ConfigError(f"{source.location}: the manifest lists no training shards")
    spec = StreamSpec(tuple(source.url(s["path"]) for s in shards), tuple(s["targets"] for s in shards),
                      context, settings.batch_size, max(1, settings.shuffle_buffer),
                      settings.oversample_tumour, settings.seed, rank, world, settings.workers,
                      settings.on_bad_shard)
    return TrainStream(spec, state)


def split_shards(urls: list[str], rank: int, world: int) -> list[str]:
    """One finite pass: this rank's share of the shards, split again across workers."""
    worker, workers = worker_position()
    return urls[rank::world][worker::workers]


class ValBatches(torch.utils.data.IterableDataset):
    """One finite pass over this worker's share of a split, in shard order (partial last
    batch); a bad shard is handled by the policy, its error item raised by the caller."""

    def __init__(self, urls: list[str], context: int, batch_size: int, rank: int, world: int, policy: str):
        self.urls, self.context, self.batch_size = urls, context, batch_size
        self.rank, self.world, self.policy = rank, world, policy

    def __iter__(self):
        bad = BadShards(self.policy)
        batch: list[Item] = []
        try:
            for url in split_shards(self.urls, self.rank, self.world):
                for item in bad.read(url, self.context):
                    batch.append(item)
                    if len(batch) == self.batch_size:
                        yield collate(batch)
                        batch = []
        except ShardError as exc:
            yield {"error": (exc.shard, exc.reason, exc.member)}
            return
        if batch:
            yield collate(batch)


def val_loader(source: ShardSource, context: int, batch_size: int, rank: int = 0, world: int = 1,
               workers: int = 1, split: str = "val", on_bad_shard: str = "fail") -> Iterator:
    """One finite pass over this rank's share of ``split`` (no shuffling, partial last batch)."""
    urls = source.urls(split)
    workers = min(workers, max(1, len(urls[rank::world])))
    loader = torch.utils.data.DataLoader(
        ValBatches(urls, context, batch_size, rank, world, on_bad_shard), batch_size=None,
        num_workers=workers, pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator())
    for item in loader:
        if isinstance(item, dict):
            raise ShardError(*item["error"])
        yield item
