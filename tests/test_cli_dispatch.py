"""Both packages' command tables name modules that exist and parse; errors exit 2 in one line."""

from __future__ import annotations

import importlib
import json

import pytest

from hemblip import dispatch

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("package", ["pipeline", "hemblip"])
def test_every_registered_command_parses_its_help(package, capsys):
    main_mod = importlib.import_module(f"{package}.__main__")
    for name in main_mod.COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main_mod.main([name, "--help"])
        assert exit_.value.code == 0, name
        assert f"python -m {package} {name}" in capsys.readouterr().out


def test_package_error_is_one_line_exit_2(capsys):
    class Boom(Exception):
        pass

    def build(_first):
        import argparse

        parser = argparse.ArgumentParser()
        parser.set_defaults(_main=lambda args: (_ for _ in ()).throw(Boom("x.svs: broken")))
        return parser

    assert dispatch.run(build, [], Boom) == 2
    assert capsys.readouterr().err == "error: x.svs: broken\n"


@pytest.mark.parametrize("package", ["pipeline", "hemblip"])
def test_top_level_help_lists_every_command(package, capsys):
    main_mod = importlib.import_module(f"{package}.__main__")
    with pytest.raises(SystemExit) as exit_:
        main_mod.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in main_mod.COMMANDS:
        assert name in out, name


def test_former_stray_entry_points_are_commands():
    from pipeline.__main__ import COMMANDS

    for name in ("calibrate-consistency", "train-detector", "eval-segmentation", "config-docs"):
        assert name in COMMANDS, name


@pytest.mark.parametrize(
    ("command", "target", "argv"),
    [
        (
            "calibrate-consistency",
            "pipeline._calibrate_consistency.main",
            ["--data", "/d", "--json", "out.json"],
        ),
        ("calibrate-consistency", "pipeline._calibrate_consistency.main", []),
        (
            "train-detector",
            "pipeline.detection.train.main",
            ["--data", "/t", "--jobs", "1", "--seed", "3", "--conditions", "own,jpeg"],
        ),
    ],
)
def test_registered_commands_forward_their_flags(command, target, argv, monkeypatch):
    """The command hands the flags given (and only those: the module keeps its defaults and
    its own checks) to the module's ``main``."""
    from pipeline.__main__ import main

    seen = []
    monkeypatch.setattr(target, lambda a=None: seen.append(a) or 0)
    assert main([command, *argv]) == 0
    assert seen == [argv]


def test_train_detector_requires_data(capsys):
    from pipeline.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["train-detector"])
    assert exit_.value.code == 2 and "--data" in capsys.readouterr().err


def test_eval_segmentation_on_real_crops(shared_data, tmp_path, capsys):
    from pipeline.__main__ import main

    root = shared_data / "segmentation_wbc"
    out = tmp_path / "dice.json"
    assert main(["eval-segmentation", "--data", str(root), "--limit", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean over datasets: nucleus Dice" in text
    assert set(json.loads(out.read_text())["datasets"]) == {"dataset1", "dataset2"}


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_eval_segmentation_bad_root_is_one_line(tmp_path, capsys, make):
    from pipeline.__main__ import main

    root = tmp_path / "root"
    if make == "empty":
        root.mkdir()
    elif make == "file":
        root.write_text("x")
    assert main(["eval-segmentation", "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data {root}") and err.count("\n") == 1, err
