"""Damaged and hostile shards: the reader, `inspect` and `verify` name the shard in one line.

The corpus is made by the test from a real tiny build: each case copies the build and
damages the first shard of its manifest (names are read from the manifest, never assumed).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_blob_case

from shardgen.build import BuildConfig, build_shards
from shardgen.cli import main
from shardgen.errors import ShardError
from shardgen.format import decode_sample, read_samples, read_shard
from shardgen.preprocess import Preprocessing


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    """Shards of two 48-pixel blob cases, built once; cases damage copies of them."""
    root = tmp_path_factory.mktemp("intact")
    for index in (0, 1):
        write_blob_case(root / "in", index)
    build_shards(BuildConfig(inputs=(root / "in",), out=root / "shards",
                             preprocessing=Preprocessing(size=48)))
    return root / "shards"


def shard_paths(folder: Path) -> list[Path]:
    return [folder / s["path"] for s in json.loads((folder / "manifest.json").read_text())["shards"]]


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:  # the standard library as an independent map of the layout
        return tar.getmembers()


def member_bytes(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    info.size = len(data) if info.isreg() else 0
    return info.tobuf(tarfile.USTAR_FORMAT) + data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)


def prepend(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> str:
    path.write_bytes(member_bytes(info, data) + path.read_bytes())
    return info.name


# Each damage takes the shard's path and a scratch folder and returns the member the error
# must name (None where the stream cannot tell).

def cut_in_half(path: Path, scratch: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def cut_on_sample_boundary(path: Path, scratch: Path) -> None:
    second_sample = members(path)[3].offset  # three members per sample
    path.write_bytes(path.read_bytes()[:second_sample])


def zero_zstd_bytes(path: Path, scratch: Path) -> str:
    image = next(m for m in members(path) if m.name.endswith(".image.zst"))
    data = bytearray(path.read_bytes())
    middle = image.offset_data + image.size // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return image.name


def bad_header_checksum(path: Path, scratch: Path) -> None:
    second = members(path)[1].offset
    data = bytearray(path.read_bytes())
    data[second + 136] ^= 1  # a bit of the mtime field: the stored checksum no longer adds up
    path.write_bytes(bytes(data))


def parent_escape(path: Path, scratch: Path) -> str:
    return prepend(path, tarfile.TarInfo("../evil.image.zst"), b"evil")


def absolute_name(path: Path, scratch: Path) -> str:
    return prepend(path, tarfile.TarInfo(str(scratch / "outside" / "abs.image.zst")), b"evil")


def symlink(path: Path, scratch: Path) -> str:
    info = tarfile.TarInfo("link.image.zst")
    info.type, info.linkname = tarfile.SYMTYPE, str(scratch / "outside" / "target")
    return prepend(path, info)


def hardlink(path: Path, scratch: Path) -> str:
    info = tarfile.TarInfo("hard.image.zst")
    info.type, info.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    return prepend(path, info)


def missing_file(path: Path, scratch: Path) -> None:
    path.unlink()


def corrupt_meta(path: Path, scratch: Path) -> str:
    meta = next(m for m in members(path) if m.name.endswith(".meta.json"))
    data = bytearray(path.read_bytes())
    data[meta.offset_data:meta.offset_data + meta.size] = b"{" + b"x" * (meta.size - 1)  # same size
    path.write_bytes(bytes(data))
    return meta.name


CASES = [
    pytest.param(cut_in_half, "stream ends", id="cut in half"),
    pytest.param(cut_on_sample_boundary, "without the end-of-archive", id="cut on a sample boundary"),
    pytest.param(zero_zstd_bytes, "corrupt zstd data", id="zeroed zstd bytes"),
    pytest.param(bad_header_checksum, "checksum mismatch", id="bad header checksum"),
    pytest.param(parent_escape, "leaves the shard", id="../ member"),
    pytest.param(absolute_name, "leaves the shard", id="absolute member name"),
    pytest.param(symlink, "symbolic link member", id="symlink member"),
    pytest.param(hardlink, "hard link member", id="hardlink member"),
    pytest.param(missing_file, "No such file|missing", id="missing shard"),
    pytest.param(corrupt_meta, "meta.json is not valid JSON", id="corrupt meta.json"),
]


@pytest.fixture
def damaged(intact, tmp_path, monkeypatch):
    """A copy of the build, and a working folder below it so stray writes would show."""
    folder = tmp_path / "shards"
    shutil.copytree(intact, folder)
    (tmp_path / "outside").mkdir()
    monkeypatch.chdir(tmp_path / "outside")
    return folder


def damage_first_shard(folder: Path, damage, scratch: Path) -> tuple[Path, str | None]:
    path = shard_paths(folder)[0]
    return path, damage(path, scratch)


def read_everything(path: Path) -> None:
    for sample in read_shard(path):
        decode_sample(sample, str(path))


def assert_nothing_extracted(scratch: Path) -> None:
    assert list((scratch / "outside").iterdir()) == []
    assert not any(p.name.startswith(("evil", "abs", "link", "hard")) for p in scratch.rglob("*"))


@pytest.mark.parametrize("damage, reason", CASES)
def test_reader_names_the_shard_and_member(damaged, tmp_path, damage, reason):
    path, member = damage_first_shard(damaged, damage, tmp_path)
    with pytest.raises(ShardError) as caught:
        read_everything(path)
    assert caught.value.shard == str(path) and re.search(reason, caught.value.reason)
    assert caught.value.member == member or member is None
    assert str(caught.value).startswith(str(path))
    assert_nothing_extracted(tmp_path)


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    # CliRunner catches exceptions: anything but a clean exit is a traceback for a user
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def lines_naming(output: str, path: Path) -> list[str]:
    return [line for line in output.splitlines() if str(path) in line]


@pytest.mark.parametrize("damage, reason", CASES)
def test_inspect_and_verify_print_one_line(damaged, tmp_path, damage, reason):
    path, _ = damage_first_shard(damaged, damage, tmp_path)
    code, output = run_cli("inspect", damaged, "--png", tmp_path / "grid.png")
    assert code == 1 and len(lines_naming(output, path)) == 1, output
    assert "preprocessing:" in output  # the manifest is fine, so its summary is still shown
    code, output = run_cli("verify", damaged)
    assert code == 1 and len(lines_naming(output, path)) == 1, output
    assert re.search(reason, lines_naming(output, path)[0]) and "1 shards ok, 1 bad" in output
    assert_nothing_extracted(tmp_path)


def test_verify_passes_an_intact_build(intact):
    code, output = run_cli("verify", intact)
    assert code == 0 and "2 shards ok, 0 bad" in output, output


def test_verify_notices_a_shard_swapped_for_another_readable_one(damaged):
    first, second = shard_paths(damaged)
    shutil.copyfile(second, first)  # same size and counts: only the sha256 tells
    code, output = run_cli("verify", damaged)
    assert code == 1 and "sha256 differs" in lines_naming(output, first)[0], output


def test_verify_help_explains():
    code, output = run_cli("verify", "--help")
    assert code == 0 and "sha256" in output and "Exit status 0" in output


def test_a_stream_is_named_as_the_loader_names_it(intact):
    data = shard_paths(intact)[0].read_bytes()
    with pytest.raises(ShardError, match="^https://host/a.tar.*: stream ends"):
        list(read_samples(io.BytesIO(data[:len(data) // 3]), "https://host/a.tar"))
