"""The shard format: sample encoding, tar layout read by webdataset, 2.5D stacks from z-order."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
import zstandard

from shardgen.build import with_context
from shardgen.errors import ShardError
from shardgen.format import (ShardWriter, decode_sample, encode_sample, member_header, read_members,
                             read_samples, read_shard, sample_key, stack_stream)
from shardgen.preprocess import stack_context


def volume(depth=9, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (depth, size, size), dtype=np.uint8),
            rng.integers(0, 3, (depth, size, size), dtype=np.uint8))


def write(path, case, images, masks, written, targets):
    compressor = zstandard.ZstdCompressor(level=1)
    with ShardWriter(path) as writer:
        for z in written:
            writer.write(encode_sample(case, z, len(images), z in targets, images[z], masks[z], compressor))
    return writer


def test_sample_round_trip():
    images, masks = volume()
    s = decode_sample(encode_sample("volume-3", 4, 9, True, images[4], masks[4], zstandard.ZstdCompressor()))
    assert (s.image == images[4]).all() and (s.mask == masks[4]).all()
    assert (s.case, s.z, s.depth, s.target) == ("volume-3", 4, 9, True)
    assert s.liver == bool((masks[4] >= 1).any()) and s.tumour == bool((masks[4] == 2).any())


def test_keys_hold_no_dots():
    assert "." not in sample_key("case.v1.nii", 3)


def test_webdataset_reads_what_we_write(tmp_path):
    images, masks = volume()
    writer = write(tmp_path / "a.tar", "c0", images, masks, range(9), set(range(9)))
    ours = list(read_shard(tmp_path / "a.tar"))
    theirs = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert writer.samples == 9 and len(theirs) == 9
    with tarfile.open(tmp_path / "a.tar") as tar:  # the standard library agrees on the layout
        assert tar.getnames()[:3] == ["c0-z0000.image.zst", "c0-z0000.mask.zst", "c0-z0000.meta.json"]
        assert all(m.mtime == 0 and m.mode == 0o444 for m in tar.getmembers())
    for a, b in zip(ours, theirs):
        assert a["__key__"] == b["__key__"]
        for field in ("image.zst", "mask.zst", "meta.json"):
            assert a[field] == b[field]


@pytest.mark.parametrize("name, size", [
    ("c0-z0000.image.zst", 0), ("volume-12-z0123.mask.zst", 611), ("x.meta.json", 8**11 - 1),
    ("liver_130-z9999.image.zst", 262144), ("n" * 95 + ".json", 10),
])
def test_member_headers_equal_the_standard_librarys(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uname = info.gname = "liverseg"
    assert member_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_member_reader_agrees_with_tarfile_on_a_foreign_tar(tmp_path):
    path = tmp_path / "foreign.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("somedir/a.image.zst", b"x" * 700), ("somedir/a.meta.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        ours = list(read_members(f))
    assert ours == [("somedir/a.image.zst", b"x" * 700), ("somedir/a.meta.json", b"{}")]


def members_end(shard: bytes) -> int:
    """Where the end-of-archive blocks start: after the block holding the last meta.json's '}'."""
    return (shard.rindex(b"}") // 512 + 1) * 512


def test_member_reader_refuses_a_directory_entry(tmp_path):
    path = tmp_path / "foreign.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(tmp_path, arcname="somedir", recursive=False)
    refused = pytest.raises(ShardError, match=r"^foreign.tar \(member somedir/\): a directory")
    with open(path, "rb") as f, refused:
        list(read_members(f, "foreign.tar"))


@pytest.mark.parametrize("name, damage, message", [
    ("truncated inside a member", lambda b: b[:700], r"\(member c0-z0000.image.zst\): stream ends inside"),
    ("truncated inside a header", lambda b: b[:300], "ends inside a tar header"),
    ("flipped byte in a header", lambda b: b[:10] + b"#" + b[11:], "checksum mismatch"),
    ("cut after the last member", lambda b: b[:members_end(b)], "without the end-of-archive"),
    ("one end-of-archive block", lambda b: b[:members_end(b) + 512], "not followed by a second"),
])
def test_member_reader_refuses_damaged_tars(tmp_path, name, damage, message):
    images, masks = volume(depth=2)
    write(tmp_path / "a.tar", "c0", images, masks, range(2), {0})
    with pytest.raises(ShardError, match=f"^a.tar.*{message}"):
        list(read_members(io.BytesIO(damage((tmp_path / "a.tar").read_bytes())), "a.tar"))


def tar_of(names):
    """A well-formed tar stream of one-byte members with these names."""
    blocks = [member_header(n, 1) + b"x" + b"\0" * 511 for n in names]
    return io.BytesIO(b"".join(blocks) + b"\0" * 1024)


FULL = ["k0.image.zst", "k0.mask.zst", "k0.meta.json"]


@pytest.mark.parametrize("name, names, message", [
    ("unknown field", ["k0.image.zst", "k0.label.png"], r"\(member k0.label.png\): member name is not"),
    ("no field", ["README"], r"\(member README\): member name is not"),
    ("a field twice", ["k0.image.zst", "k0.image.zst"],
     r"\(member k0.image.zst\): field image.zst appears twice"),
    ("a field missing", ["k0.image.zst", "k0.meta.json", "k1.image.zst"],
     r"\(member k0\): sample lacks mask.zst"),
    ("members of a sample apart", [*FULL, "k1.image.zst", "k1.mask.zst", "k1.meta.json", *FULL],
     r"\(member k0\): sample key appears twice"),
])
def test_sample_reader_refuses_foreign_layouts(name, names, message):
    with pytest.raises(ShardError, match=f"^a.tar {message}"):
        list(read_samples(tar_of(names), "a.tar"))


def with_meta(**changes):
    def change(sample):
        meta = {**json.loads(sample["meta.json"]), **changes}
        return {**sample, "meta.json": json.dumps({k: v for k, v in meta.items() if v is not None}).encode()}
    return change


@pytest.mark.parametrize("name, change, message", [
    ("not JSON", lambda s: {**s, "meta.json": b"{"}, "meta.json.*not valid JSON"),
    ("not UTF-8", lambda s: {**s, "meta.json": b"\xff\xfe"}, "meta.json.*not valid JSON"),
    ("a list", lambda s: {**s, "meta.json": b"[]"}, "meta.json.*lacks some of"),
    ("no shape", with_meta(shape=None), "meta.json.*lacks some of"),
    ("shape of three axes", with_meta(shape=[1, 16, 16]), r"meta.json.*not \[height, width\]"),
    ("shape of floats", with_meta(shape=[16.0, 16]), r"meta.json.*not \[height, width\]"),
    ("shape larger than the pixels", with_meta(shape=[17, 16]), "image.zst.*decodes to 256 bytes"),
    ("z beyond the depth", with_meta(z=9), "meta.json.*not a slice of depth 9"),
    ("z as text", with_meta(z="4"), "meta.json.*not a slice"),
    ("no image", lambda s: {k: v for k, v in s.items() if k != "image.zst"}, "sample has no image.zst"),
    ("mask not zstd", lambda s: {**s, "mask.zst": b"abc"}, "mask.zst.*corrupt zstd"),
])
def test_decode_refuses_damaged_samples(name, change, message):
    images, masks = volume()
    sample = encode_sample("c0", 4, 9, True, images[4], masks[4], zstandard.ZstdCompressor())
    with pytest.raises(ShardError, match=f"^a.tar \\(member c0-z0004.*{message}"):
        decode_sample(change(sample), "a.tar")


def test_shard_bytes_are_deterministic(tmp_path):
    images, masks = volume()
    a = write(tmp_path / "a.tar", "c0", images, masks, range(9), {2, 3})
    b = write(tmp_path / "b.tar", "c0", images, masks, range(9), {2, 3})
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert a.sha256 == b.sha256 and a.bytes == (tmp_path / "a.tar").stat().st_size


@pytest.mark.parametrize("name, targets, context", [
    ("every slice, k=1", [0, 1, 2, 3, 4, 5, 6, 7, 8], 1),
    ("scattered targets, k=1", [0, 4, 8], 1),
    ("scattered targets, k=2", [1, 5, 6], 2),
    ("no context", [2, 7], 0),
    ("edges only, k=3", [0, 8], 3),
])
def test_stacks_from_z_order_equal_whole_volume_stacks(tmp_path, name, targets, context):
    cases = [("c0", *volume(seed=0)), ("c1", *volume(depth=5, seed=1))]
    stream = []
    for case, images, masks in cases:
        mine = [t for t in targets if t < len(images)]
        written = with_context(np.array(mine), len(images), context)
        write(tmp_path / f"{case}.tar", case, images, masks, written.tolist(), set(mine))
        stream += [decode_sample(s) for s in read_shard(tmp_path / f"{case}.tar")]
    got = [(s.case, s.z, stack) for s, stack in stack_stream(stream, context)]
    expected = [(case, t, stack_context(images, t, context))
                for case, images, _ in cases for t in targets if t < len(images)]
    assert [(c, z) for c, z, _ in got] == [(c, z) for c, z, _ in expected]
    for (_, _, a), (_, _, b) in zip(got, expected):
        assert (a == b).all()


def test_same_shard_twice_in_a_row_restarts_the_stack(tmp_path):
    images, masks = volume(depth=4)
    write(tmp_path / "c.tar", "c", images, masks, range(4), {0, 3})
    once = [decode_sample(s) for s in read_shard(tmp_path / "c.tar")]
    got = [(s.z, st) for s, st in stack_stream(once + once, 1)]
    assert [z for z, _ in got] == [0, 3, 0, 3]
    assert all((st == stack_context(images, z, 1)).all() for z, st in got)


def test_missing_neighbour_is_an_error_not_a_wrong_stack(tmp_path):
    images, masks = volume(depth=5)
    write(tmp_path / "c.tar", "c", images, masks, [2], {2})  # neighbours 1 and 3 not written
    with pytest.raises(ValueError, match="lacks slice"):
        list(stack_stream(map(decode_sample, read_shard(tmp_path / "c.tar")), 1))
