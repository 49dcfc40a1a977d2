"""The training data pipeline: shard dealing per rank, endless training stream, finite validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from liverseg.data import (LoaderSettings, deal_shards, open_shards, split_shards, train_loader,
                           val_loader)
from liverseg.errors import ConfigError
from shardgen.build import BuildConfig, build_shards
from shardgen.preprocess import Preprocessing


@pytest.fixture(scope="module")
def shards(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    build_shards(BuildConfig(inputs=(phantom_dir,), out=out, preprocessing=Preprocessing(size=32),
                             fractions=(0.5, 0.5, 0.0)))
    return out


def urls_of(stream, n):
    return [d["url"] for d in itertools.islice(stream, n)]


def test_each_pass_deals_every_shard_once_across_ranks():
    urls = [f"s{i}" for i in range(10)]
    per_rank = [urls_of(deal_shards(urls, rank, 2, seed=0, start=0), 5) for rank in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(urls)


def test_passes_are_reshuffled_and_resume_moves_on():
    urls = [f"s{i}" for i in range(20)]
    stream = urls_of(deal_shards(urls, 0, 1, seed=0, start=0), 60)
    passes = [stream[i:i + 20] for i in (0, 20, 40)]
    assert all(sorted(p) == sorted(urls) for p in passes)
    assert passes[0] != passes[1] != passes[2]
    resumed = urls_of(deal_shards(urls, 0, 1, seed=0, start=500), 20)
    assert resumed != passes[0]


def test_fewer_shards_than_ranks_still_feeds_every_rank():
    streams = [urls_of(deal_shards(["only.tar"], rank, 4, seed=0, start=0), 3) for rank in range(4)]
    assert all(s == ["only.tar"] * 3 for s in streams)


def test_validation_split_covers_each_shard_once():
    urls = [f"s{i}" for i in range(7)]
    got = [d["url"] for rank in range(3) for d in split_shards(urls, rank, 3)]
    assert sorted(got) == sorted(urls)


def test_training_batches_are_uint8_stacks_and_endless(shards):
    source = open_shards(shards)
    settings = LoaderSettings(batch_size=4, workers=0, shuffle_buffer=20)
    total_targets = source.manifest["totals"]["train"]["targets"]
    batches = list(itertools.islice(iter(train_loader(source, 1, settings)), total_targets))  # > one pass
    images, masks = batches[0]
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32)
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
    assert source.urls("train")[0].startswith(f"pipe:cat {shards}/train-")
    images, _ = next(iter(train_loader(source, 1, LoaderSettings(batch_size=2, workers=0))))
    assert images.shape[0] == 2


@pytest.mark.parametrize("location, message", [
    ("/nonexistent/shards", "cannot read manifest"),
    ("pipe:cat /nonexistent/x", "needs {} where the file name goes"),
    ("pipe:cat /nonexistent/{}", "failed"),
])
def test_bad_locations_are_one_line_errors(location, message):
    with pytest.raises(ConfigError, match=message):
        open_shards(location)
