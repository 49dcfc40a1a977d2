"""The training data pipeline: shard dealing per rank, endless training stream, finite validation."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from liverseg.data import (LoaderSettings, StreamSpec, open_shards, split_shards, train_loader,
                           val_loader)
from shardgen.errors import ShardError, ShardgenError


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards


def spec_of(n_shards: int, world: int = 1, workers: int = 0, **changes) -> StreamSpec:
    settings = dict(urls=tuple(f"s{i}" for i in range(n_shards)), targets=(5,) * n_shards, context=1,
                    batch_size=2, block_samples=10, oversample_tumour=0.0, seed=0, rank=0, world=world,
                    workers=workers)
    return StreamSpec(**{**settings, **changes})


def pass_shards(spec: StreamSpec, epoch: int) -> list[int]:
    return [i for role in range(spec.streams) for block in spec.role_blocks(role, epoch) for i in block]


def test_each_pass_deals_every_shard_once_across_ranks_and_workers():
    dealt = [pass_shards(spec_of(10, world=2, workers=2, rank=rank), 0) for rank in (0, 1)]
    assert sorted(dealt[0] + dealt[1]) == list(range(10))


def test_passes_are_reshuffled():
    spec = spec_of(20)
    passes = [pass_shards(spec, epoch) for epoch in range(3)]
    assert all(sorted(p) == list(range(20)) for p in passes)
    assert passes[0] != passes[1] != passes[2]


def test_blocks_hold_at_least_the_shuffle_buffer():
    spec = spec_of(10, targets=(3, 9, 1, 4, 4, 2, 8, 1, 1, 6), block_samples=8)
    blocks = spec.role_blocks(0, 0)
    assert sorted(i for b in blocks for i in b) == list(range(10))
    assert all(sum(spec.targets[i] for i in b) >= 8 for b in blocks[:-1])


def test_fewer_shards_than_ranks_still_feeds_every_rank():
    for rank in range(4):
        assert pass_shards(spec_of(1, world=4, rank=rank), 0) == [0]


def test_validation_split_covers_each_shard_once():
    urls = [f"s{i}" for i in range(7)]
    got = [url for rank in range(3) for url in split_shards(urls, rank, 3)]
    assert sorted(got) == sorted(urls)


def test_training_batches_are_uint8_stacks_and_endless(shards):
    source = open_shards(shards)
    settings = LoaderSettings(batch_size=4, workers=0, shuffle_buffer=20)
    total_targets = source.manifest["totals"]["train"]["targets"]
    batches = list(itertools.islice(iter(train_loader(source, 1, settings)), total_targets))  # > one pass
    images, masks = batches[0]
    assert images.shape == (4, 3, 64, 64) and masks.shape == (4, 64, 64)
    assert str(images.dtype) == "torch.uint8" and int(masks.max()) <= 2
    assert len(batches) == total_targets


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_sees_every_target_exactly_once_over_ranks(shards, world):
    source = open_shards(shards)
    seen = sum(len(m) for rank in range(world) for _, m in val_loader(source, 1, 5, rank, world, workers=0))
    assert seen == source.manifest["totals"]["val"]["targets"]


def test_tumour_oversampling_raises_the_tumour_share(shards):
    source = open_shards(shards)

    def tumour_share(oversample):
        settings = LoaderSettings(batch_size=8, workers=0, shuffle_buffer=10, oversample_tumour=oversample)
        masks = [m for _, m in itertools.islice(iter(train_loader(source, 1, settings)), 30)]
        return np.mean([(m == 2).flatten(1).any(1).float().mean().item() for m in masks])

    assert tumour_share(2.0) > tumour_share(0.0) + 0.05


def test_pipe_location_reads_manifest_and_shards(shards):
    source = open_shards(f"pipe:cat {shards}/{{}}")
    assert source.urls("train")[0].startswith(f"pipe:cat {shards}/")
    images, _ = next(iter(train_loader(source, 1, LoaderSettings(batch_size=2, workers=0))))
    assert images.shape[0] == 2


@pytest.mark.parametrize("location, message", [
    ("/nonexistent/shards", "cannot read manifest"),
    ("pipe:cat /nonexistent/x", "needs {} where the file name goes"),
    ("pipe:cat /nonexistent/{}", "failed"),
])
def test_bad_locations_are_one_line_errors(location, message):
    with pytest.raises(ShardgenError, match=message):
        open_shards(location)


def test_pipe_shard_names_are_quoted(shards):
    source = open_shards(f"pipe:cat {shards}/{{}}")
    assert source.url("a b.tar") == f"pipe:cat {shards}/'a b.tar'"


@pytest.mark.parametrize("path", ["train-volume-0.tar; touch PWNED #", "../../other/x.tar",
                                  "/etc/passwd", "a/../../b.tar", "$(touch PWNED).tar", ""])
def test_manifest_shard_paths_that_leave_the_folder_or_reach_a_shell_are_refused(shards, tmp_path, path):
    import json
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["path"] = path
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for location in (str(copy), f"pipe:cat {copy}/{{}}"):
        with pytest.raises(ShardgenError, match="refused shard path"):
            open_shards(location)
    assert not list(tmp_path.rglob("PWNED")) and not (Path.cwd() / "PWNED").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_restored_from_its_state_continues_with_the_next_sample(shards, workers):
    source = open_shards(shards)
    settings = LoaderSettings(batch_size=3, workers=workers, shuffle_buffer=7, oversample_tumour=0.5, seed=4)
    whole = train_loader(source, 1, settings)
    expected = []
    for _ in range(14):
        next(whole)
        expected.append(whole.last_keys)
    for cut in (5, 9):  # mid-block and another worker's turn
        first = train_loader(source, 1, settings)
        for _ in range(cut):
            next(first)
        resumed = train_loader(source, 1, settings, state=first.state())
        got = []
        for _ in range(14 - cut):
            next(resumed)
            got.append(resumed.last_keys)
        assert got == expected[cut:], cut


def damaged_copy(shards: Path, tmp_path: Path) -> tuple[Path, str]:
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    victim = open_shards(copy).shards("train")[0]["path"]
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[:len(data) // 2])
    return copy, victim


def test_a_damaged_shard_stops_training_with_its_name(shards, tmp_path):
    copy, victim = damaged_copy(shards, tmp_path)
    stream = train_loader(open_shards(copy), 1, LoaderSettings(batch_size=2, workers=1, shuffle_buffer=500))
    with pytest.raises(ShardError, match=victim):
        for _ in range(50):
            next(stream)


def test_skip_policy_leaves_out_a_damaged_shard_and_counts_it(shards, tmp_path):
    copy, victim = damaged_copy(shards, tmp_path)
    source = open_shards(copy)
    settings = LoaderSettings(batch_size=2, workers=0, shuffle_buffer=500, on_bad_shard="skip")
    stream = train_loader(source, 1, settings)
    keys = set()
    for _ in range(40):
        next(stream)
        keys.update(stream.last_keys)
    bad_case = next(s["case"] for s in source.shards("train") if s["path"] == victim)
    assert stream.skipped_shards >= 1 and not any(k.startswith(bad_case + "/") for k in keys)
    seen = sum(len(m) for _, m in val_loader(source, 1, 5, workers=0, split="train", on_bad_shard="skip"))
    good = sum(s["targets"] for s in source.shards("train") if s["path"] != victim)
    assert seen == good
