"""The liverseg-shards commands as a user runs them: phantom → build → inspect, and merge."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from shardgen.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_phantom_build_inspect(tmp_path):
    run("phantom", "--out", tmp_path / "ph", "--cases", 3, "--size", 48, "--slices", "8,10", "--seed", 1)
    assert len(list((tmp_path / "ph").glob("volume-*.nii.gz"))) == 3
    out = run("build", "--input", tmp_path / "ph", "--out", tmp_path / "sh", "--size", 32, "--context", 2)
    assert "wrote" in out and (tmp_path / "sh" / "manifest.json").exists()
    manifest = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert manifest["preprocessing"] == {"window": [-100.0, 400.0], "size": 32, "context": 2,
                                         "orientation": "SPL", "spacing_mm": None}
    report = run("inspect", tmp_path / "sh", "--count", 4)
    assert "train" in report and "context 2 (5 channels)" in report
    assert (tmp_path / "sh" / "inspect.png").read_bytes()[:4] == b"\x89PNG"


def test_multi_node_build_and_merge(tmp_path):
    run("phantom", "--out", tmp_path / "ph", "--cases", 4, "--size", 32, "--slices", "6,8")
    for rank in (0, 1):
        run("build", "--input", tmp_path / "ph", "--out", tmp_path / "sh", "--size", 16,
            "--num-nodes", 2, "--node-rank", rank)
    parts = sorted((tmp_path / "sh").glob("manifest.node-*-of-2.json"))
    assert len(parts) == 2
    out = run("merge", *parts, "--out", tmp_path / "sh" / "manifest.json")
    assert "4 shards" in out


def test_bad_slices_option_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["phantom", "--out", str(tmp_path), "--slices", "20,10"])
    assert result.exit_code == 1 and "Error: --slices must be MIN,MAX" in result.output


def test_an_out_that_is_a_file_is_one_line(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("kept")
    result = CliRunner().invoke(main, ["phantom", "--out", str(taken), "--cases", "1", "--size", "64",
                                       "--slices", "8,8"])
    assert result.exit_code == 1 and f"Error: {taken}: is a file, not a folder" in result.output
    assert taken.read_text() == "kept"


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("name", sorted(main.commands))
def test_help_shows_the_command_its_arguments_and_every_option(name):
    command = main.commands[name]
    shown = words(run(name, "--help"))
    usage = shown[:shown.index(" Options:")] if " Options:" in shown else shown
    assert usage.startswith(f"Usage: main {name} ") and words(command.help.split("\n\n")[0]) in usage
    for param in command.params:
        if isinstance(param, click.Argument):
            assert param.human_readable_name in usage, param.name
            continue
        assert all(opt in shown for opt in param.opts), param.opts
        if param.help:
            assert words(param.help) in shown, param.opts
        if param.show_default and param.default is not None and not param.is_flag:
            assert f"[default: {param.default}" in shown, param.opts


def test_every_command_is_listed_with_its_summary():
    shown = words(run("--help"))
    listed = shown[shown.index("Commands:"):]
    for name, command in main.commands.items():
        assert f" {name} {words(command.help)[:30]}" in listed, name  # the start of its summary


def test_build_with_a_chosen_pixel_size_records_it(tmp_path):
    run("phantom", "--out", tmp_path / "ph", "--cases", 2, "--size", 32, "--slices", "6,8")
    run("build", "--input", tmp_path / "ph", "--out", tmp_path / "sh", "--size", 32, "--spacing-mm", 9.5)
    manifest = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert manifest["preprocessing"]["spacing_mm"] == 9.5
