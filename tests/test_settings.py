"""The helpers every config and CLI shares: shardgen.settings.from_dict, shardgen.clihelp,
and the configs' defaults as the CLIs show them."""

from __future__ import annotations

import gc
import logging
import sys
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from liverseg.config import EvalConfig, TrainConfig
from liverseg.errors import ConfigError, LiversegError
from shardgen.clihelp import CONTEXT_SETTINGS, friendly_errors, heavy_imports, verbose_option
from shardgen.errors import ShardgenError
from shardgen.settings import default_of, from_dict


@dataclass(frozen=True)
class Pair:
    name: str
    size: int = 1

    def __post_init__(self):
        if self.size < 0:
            raise ValueError("size must be >= 0")


@pytest.mark.parametrize("data, message", [
    ([1, 2], "pair settings must be a mapping, got list"),
    ({"name": "a", "colour": 1, "x" * 10_000: 2}, "unknown pair settings ['colour', 'xxxx"),
    ({"size": 2}, "missing required pair settings ['name']"),
    ({"name": "a", "size": "big"}, "in the check: size must be a number"),
], ids=["not a mapping", "unknown key, shortened", "missing", "check"])
def test_from_dict_refuses_in_one_line(data, message):
    def check(d):
        return "" if isinstance(d.get("size", 0), int) else "in the check: size must be a number"

    with pytest.raises(ConfigError) as caught:
        from_dict(Pair, data, "pair settings", ConfigError, required=("name",), source="f.json", check=check)
    text = str(caught.value)
    assert text.startswith("f.json: ") and message in text and "\n" not in text and len(text) < 300


def test_from_dict_builds_and_lists_the_valid_names():
    assert from_dict(Pair, {"name": "a"}, "pair settings") == Pair("a")
    with pytest.raises(ShardgenError, match="valid: name, size"):
        from_dict(Pair, {"nme": "a"}, "pair settings")


def test_one_error_root():
    assert issubclass(LiversegError, ShardgenError) and issubclass(ConfigError, ShardgenError)


@pytest.mark.parametrize("error, line", [
    (ConfigError("bad flag"), "Error: bad flag"),
    (ShardgenError("bad file"), "Error: bad file"),
    (FileExistsError(17, "File exists", "/x/out"), "Error: /x/out: File exists"),
], ids=["liverseg", "shardgen", "file system"])
def test_user_errors_are_one_line_and_bugs_are_tracebacks(error, line):
    @click.command(context_settings=CONTEXT_SETTINGS)
    @verbose_option
    @friendly_errors
    def command():
        raise error

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1 and result.output.strip() == line

    @click.command()
    @friendly_errors
    def buggy():
        raise KeyError("bug")

    assert isinstance(CliRunner().invoke(buggy, []).exception, KeyError)


def test_verbose_sets_info_logging(monkeypatch):
    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))

    @click.command(context_settings=CONTEXT_SETTINGS)
    @verbose_option
    def command():
        pass

    CliRunner().invoke(command, ["-v"])
    CliRunner().invoke(command, [])
    assert levels == [logging.INFO, logging.WARNING]
    assert "-h, --help" in CliRunner().invoke(command, ["-h"]).output


def test_heavy_imports_pause_the_collector_and_freeze_only_what_a_new_import_made(tmp_path, monkeypatch):
    (tmp_path / "freshly_imported_module.py").write_text("TABLE = [{'row': i} for i in range(1000)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "freshly_imported_module", raising=False)
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with heavy_imports():
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == frozen  # nothing new: left as it was
    with heavy_imports():
        import freshly_imported_module
    assert gc.isenabled() and gc.get_freeze_count() >= frozen + 1000
    gc.disable()  # a caller that paused the collector itself keeps it paused
    try:
        with heavy_imports():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_clis_show_the_configs_defaults():
    from liverseg.eval_cli import main as eval_main
    from liverseg.train_cli import main as train_main

    train_help = CliRunner().invoke(train_main, ["--help"], terminal_width=200).output
    for flag, name in (("--steps", "steps"), ("--batch-size", "batch_size"), ("--lr", "lr"),
                       ("--workers", "workers"), ("--val-every", "val_every")):
        line = next(line for line in train_help.splitlines() if line.strip().startswith(flag))
        assert f"[default: {default_of(TrainConfig, name)}]" in line, line
    run_help = CliRunner().invoke(eval_main, ["run", "--help"], terminal_width=200).output
    line = next(line for line in run_help.splitlines() if line.strip().startswith("--batch-size"))
    assert f"[default: {default_of(EvalConfig, 'batch_size')}]" in line, line


@pytest.mark.parametrize("problem", ["missing", "two classes"])
def test_a_checkpoint_evaluation_cannot_use_is_reported_before_torch_loads(tmp_path, problem):
    import json
    import subprocess
    import sys

    folder = tmp_path / "nowhere"
    if problem == "two classes":  # a valid checkpoint config, but evaluation scores three classes
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model": {"arch": "unet", "encoder": "resnet18",
                                                                   "in_channels": 3, "classes": 2},
                                                         "preprocessing": {"context": 1}}))
    code = ("import sys\nfrom liverseg.eval_cli import main\n"
            f"try:\n    main(['run', '--checkpoint', {str(folder)!r}, '--data', {str(tmp_path)!r},"
            f" '--out', {str(tmp_path / 'eval')!r}])\nexcept SystemExit as exit:\n    print('EXIT', exit.code)\n"
            "print('TORCH', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "EXIT 1" in done.stdout and "TORCH False" in done.stdout, done.stdout + done.stderr
    expected = {"missing": f"{folder}: checkpoint folder not found",
                "two classes": f"{folder / 'config.json'}: invalid model.classes: evaluation needs 3"}[problem]
    assert expected in done.stderr, done.stderr
