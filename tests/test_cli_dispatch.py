"""Both packages' command tables name modules that exist and parse; errors exit 2 in one line."""

from __future__ import annotations

import importlib

import pytest

from hemblip import _cli

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

    assert _cli.run(build, [], Boom) == 2
    assert capsys.readouterr().err == "error: x.svs: broken\n"
