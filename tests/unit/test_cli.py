from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import stack
from cluster.cli.commands import build_parser, main
from cluster.cli.settings import Settings

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


def test_a_bad_redis_url_is_explained_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HYPERFLEET_HOME", str(tmp_path))
    monkeypatch.setenv("HYPERFLEET_REDIS_URL", "localhost:6379")
    assert main(["up"]) == 2
    assert "HYPERFLEET_REDIS_URL" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


def test_up_without_redis_says_why_and_uses_the_sqlite_stores(tmp_path: Path) -> None:
    said: list[str] = []
    off = Settings.from_env({"HYPERFLEET_HOME": str(tmp_path), "HYPERFLEET_REDIS": "off"})
    assert stack._redis(off, stack._daemons(off), 6390, said.append) is None
    assert "SQLite stores" in said[-1]
    given = Settings.from_env(
        {"HYPERFLEET_HOME": str(tmp_path), "HYPERFLEET_REDIS_URL": "redis://:pw@10.0.0.9:6379/0"}
    )
    url = stack._redis(given, stack._daemons(given), 6390, said.append)
    assert url == "redis://:pw@10.0.0.9:6379/0" and "pw" not in said[-1]
    assert not (tmp_path / "run").exists()  # no local redis-server was started


def test_up_says_which_prerequisites_are_missing_and_how_to_get_them(tmp_path: Path) -> None:
    from cluster.cli.prerequisites import missing_prerequisites

    settings = Settings.from_env({"HYPERFLEET_HOME": str(tmp_path)})

    def bare(binary: str) -> str | None:  # a fresh Debian: none of them
        return None

    lines = missing_prerequisites(settings, bare, is_root=True)
    assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines)
    redis, bwrap, iptables = lines
    assert "redis-server not installed" in redis and "slower SQLite path" in redis
    assert redis.endswith("apt-get install -y redis-server")
    assert "bwrap not installed" in bwrap and "bash and other shell tools will fail" in bwrap
    assert bwrap.endswith("apt-get install -y bubblewrap")
    assert "iptables and ip6tables not installed" in iptables
    assert iptables.endswith("apt-get install -y iptables")

    def installed(binary: str) -> str | None:
        return f"/usr/bin/{binary}"

    assert missing_prerequisites(settings, installed, is_root=True) == []
    # Not root: tool egress needs root anyway. No local Redis wanted: no word of it.
    off = Settings.from_env({"HYPERFLEET_HOME": str(tmp_path), "HYPERFLEET_REDIS": "off"})
    only_bwrap = missing_prerequisites(off, bare, is_root=False)
    assert len(only_bwrap) == 1 and "bubblewrap" in only_bwrap[0]
