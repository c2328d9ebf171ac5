"""``migrelay COMMAND --help`` says every help text whole and every default, and
``migrate --config`` reads its own table, as the README says.

Rich markup once took ``[serve]`` and ``[default: ...]`` in help texts for tags and
printed nothing in their place (``--config`` read "(table  or )"), and options whose
default is computed (``migrate --socket``) showed none. The help is rendered as a
person sees it (`typer.testing.CliRunner`, wide terminal) and read back option by
option.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from migrelay import config_file
from migrelay.cli.app import app
from tests.helpers import FACTOR

COMMAND = typer.main.get_command(app)
assert isinstance(COMMAND, typer.core.TyperGroup)
COMMANDS = dict(COMMAND.commands)
README = Path(__file__).resolve().parents[2] / "README.md"

#: Options with no value unless given, so no default to show: the file or URL to use,
#: the capability to turn on, the extra header. Every other option either has a
#: default that ``--help`` prints, or says what happens without it ("default: ...").
ABSENT_UNLESS_GIVEN: dict[str, set[str]] = {
    "serve": {
        "--target-dir", "--token-file", "--tls-cert", "--tls-key", "--client-ca", "--qmp",
        "--qmp-dir", "--config", "--allow-host", "--trusted-proxy", "--path-prefix",
        "--target-map", "--privileged-target",
    },
    "connect": {"--token-file", "--header", "--fingerprint", "--tls-cert", "--tls-key",
                "--config", "--map"},
    "incoming": {"--multifd", "--compress", "--migrate-disks"},
    "migrate": {
        "--to", "--multifd", "--compress", "--xbzrle-cache", "--migrate-disks",
        "--token-file", "--header", "--fingerprint", "--tls-cert", "--tls-key", "--config",
    },
    "status": set(),
    "cancel": set(),
    "bench": {
        "--json", "--plot", "--link", "--src-qmp", "--dst-qmp", "--disk", "--baseline",
        "--relay-args", "--baseline-relay-args",
    },
}  # fmt: skip


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _flat(text: str) -> str:
    """``text`` with every run of white space one space, and a word that click's
    wrapping broke after a hyphen ("comma- separated") whole again: wrapping aside."""
    return re.sub(r"(\w-) (\w)", r"\1\2", " ".join(text.split()))


def _entries(help_text: str) -> dict[str, str]:
    """Each option's entry of the rendered help (its lines, flattened), by long name."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in help_text.splitlines():
        start = re.match(r"  (?:-\w, )?(--[a-z][a-z0-9-]*)", line)
        if start:
            current = entries.setdefault(start.group(1), [])
        elif not line.startswith("   "):
            current = None  # a heading or a blank line ends the entry
        if current is not None:
            current.append(line)
    return {name: _flat(" ".join(lines)) for name, lines in entries.items()}


def _options(name: str) -> list[typer.core.TyperOption]:
    return [
        param
        for param in COMMANDS[name].params
        if isinstance(param, typer.core.TyperOption) and "--help" not in param.opts
    ]


def _long(param: typer.core.TyperOption) -> str:
    return next(opt for opt in param.opts if opt.startswith("--"))


def test_every_command_is_covered() -> None:
    assert set(COMMANDS) == set(ABSENT_UNLESS_GIVEN)


@pytest.mark.parametrize("name", sorted(ABSENT_UNLESS_GIVEN))
def test_help_shows_every_help_text_whole(name: str) -> None:
    rendered = _help(name)
    entries = _entries(rendered)
    assert _flat(COMMANDS[name].help or "") in _flat(rendered)
    for param in _options(name):
        entry = entries[_long(param)]
        # Whole: brackets and all ("[serve]", "[default: ...]", "[USER:PASS@]").
        assert _flat(param.help or "") in entry, (entry, param.help)


@pytest.mark.parametrize("name", sorted(ABSENT_UNLESS_GIVEN))
def test_help_shows_every_default(name: str) -> None:
    entries = _entries(_help(name))
    absent = ABSENT_UNLESS_GIVEN[name]
    for param in _options(name):
        long, entry = _long(param), entries[_long(param)]
        if param.is_flag and not param.default:
            continue  # off unless given, as a flag says
        if param.required:
            assert "required" in entry, entry
        elif param.default is None or param.default == "":
            if long in absent:
                assert "default:" not in entry, f"{long} has a default: drop it from the list"
            else:
                assert "default:" in entry, f"{long} shows no default: {entry}"
        else:
            assert long not in absent, f"{long} has a default: drop it from the list"
            assert _flat(f"default: {param.default}") in entry, entry


def test_top_level_help_lists_every_command() -> None:
    rendered = _help()
    for name, command in COMMANDS.items():
        assert re.search(rf"(?m)^  {name} ", rendered), rendered
        assert command.short_help is None or command.short_help in rendered


def _migrate_with(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrelay", "migrate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30 * FACTOR,
        check=False,
    )


def test_migrate_reads_its_own_table_of_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "migrate.toml"
    config.write_text(
        '[connect]\nurl = "ws://elsewhere/"\n'
        f'[migrate]\nqmp = "{tmp_path / "vm.qmp"}"\nkeep-paused = true\n'
    )
    ran = _migrate_with(config)
    # --qmp (required) and --keep-paused came from [migrate]; the refusal of the
    # latter without --to comes before anything is touched.
    assert (ran.returncode, ran.stderr) == (
        1,
        "migrelay: error: --keep-paused needs --to; in the four-step form give it to"
        " incoming, on the destination\n",
    ), ran
    config.write_text("[migrate]\nbogus = 1\n")
    ran = _migrate_with(config)
    assert (ran.returncode, ran.stderr) == (
        2,
        f"migrelay: error: {config}: unknown setting 'bogus' in [migrate]\n",
    ), ran


def test_the_readme_migrate_table_is_what_migrate_reads(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    tables = [block for block in blocks if "[migrate]" in block]
    assert tables, "the README shows no [migrate] table"
    known = {param.name for param in COMMANDS["migrate"].params if param.name}
    for block in tables:
        path = tmp_path / "readme.toml"
        path.write_text(block)
        assert config_file.load_section(path, "migrate", known)
