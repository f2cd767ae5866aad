from __future__ import annotations

import pytest

from cluster.cli import build_parser, main

SUBCOMMANDS = ["emulator", "up", "down", "status"]


@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: hyperfleet" in capsys.readouterr().out


def test_top_level_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    build_parser().print_help()
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)


def test_bad_emulator_settings_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emulator", "--fault-429", "0.7", "--fault-500", "0.7"]) == 2
    assert "more than 1" in capsys.readouterr().err
    assert main(["emulator", "--tps", "-3"]) == 2
    assert "--tps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["emulator", "--port", "many"])
    assert info.value.code == 2
