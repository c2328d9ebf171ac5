"""The README's examples, taken from README.md and run or parsed as printed.

A reader copies these blocks; these tests copy them too, so that the README cannot drift
from what migrelay does. Each block is found by a stable marker (its first line, or a
command it holds), never by its position. Shell blocks run in ``sh -eu`` with only their
root paths moved into the test's directory (`as_run_here`); file examples go through
the real parsers and loaders (the token file's, ``serve --config``'s). Every default the
README states in words is compared with the command's own (`README_DEFAULTS`).

The shell blocks create a group and files of mode 0640 group ``migrelay`` as the README
does (as root): ``groupadd`` gets ``--prefix`` so that it writes a copy of ``/etc``, and
the group of the files is this process's, since no such group exists on this host.
"""

from __future__ import annotations

import grp
import hashlib
import os
import re
import shlex
import ssl
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from migrelay import config_file
from migrelay.aio.access import TokenEntry, derived_token_name, load_token_entries
from migrelay.aio.source import read_first_token
from migrelay.aio.tls import normalize_fingerprint
from migrelay.cli.app import app
from migrelay.errors import ConfigError

REPOSITORY = Path(__file__).resolve().parents[2]
README = REPOSITORY / "README.md"
SYSTEMD_UNIT = REPOSITORY / "tools" / "migrelay-serve.service"


# -- finding the README's code blocks --------------------------------------------------------


@dataclass(frozen=True)
class CodeBlock:
    """A fenced block of README.md: its language (after the fence) and its lines."""

    language: str
    lines: tuple[str, ...]
    #: The README line number of its first line, for failure messages.
    line_number: int

    @property
    def text(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)

    def commands(self) -> list[str]:
        """Its shell commands: continuation lines (a trailing backslash) joined."""
        commands, pending = [], ""
        for line in self.lines:
            if line.endswith("\\"):
                pending += line[:-1]
            else:
                commands.append(pending + line)
                pending = ""
        assert not pending, f"README line {self.line_number}: the block ends in a backslash"
        return commands


def code_blocks(text: str) -> list[CodeBlock]:
    """Every fenced (```) block of a Markdown text."""
    blocks: list[CodeBlock] = []
    fence: tuple[str, int] | None = None
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("```"):
            if fence is not None:
                body.append(line)
        elif fence is None:
            fence, body = (line[3:].strip(), number + 1), []
        else:
            blocks.append(CodeBlock(fence[0], tuple(body), fence[1]))
            fence = None
    assert fence is None, f"README line {fence[1] - 1}: a code block is never closed"
    return blocks


@pytest.fixture(scope="module")
def readme_blocks() -> list[CodeBlock]:
    return code_blocks(README.read_text(encoding="utf-8"))


def block_starting(blocks: list[CodeBlock], first_line: str) -> CodeBlock:
    """The one block whose first line starts with ``first_line``."""
    found = [block for block in blocks if block.lines and block.lines[0].startswith(first_line)]
    assert len(found) == 1, f"README blocks starting with {first_line!r}: {len(found)}, not 1"
    return found[0]


def commands_starting(blocks: list[CodeBlock], start: str) -> list[str]:
    """Every command of every block that starts with ``start``."""
    return [
        command for block in blocks for command in block.commands() if command.startswith(start)
    ]


# -- running shell blocks as printed ----------------------------------------------------------


def as_run_here(command: str, root: Path) -> str:
    """A README command with its root paths under ``root``, otherwise as printed.

    ``/etc/migrelay`` becomes ``ROOT/etc/migrelay``, ``groupadd`` writes ``ROOT/etc``
    (``--prefix``), and the group ``migrelay`` of files is this process's group.
    """
    own_group = grp.getgrgid(os.getgid()).gr_name
    command = command.replace("/etc/migrelay", f"{root}/etc/migrelay")
    command = command.replace("groupadd ", f"groupadd --prefix {root} ")
    return re.sub(r"(\bchgrp|\binstall .*-g) migrelay\b", rf"\1 {own_group}", command)


def run_block(block: CodeBlock, root: Path) -> str:
    """Run a shell block in ``sh -eu`` as `as_run_here` adapts it; its standard output."""
    script = "\n".join(as_run_here(command, root) for command in block.commands())
    result = subprocess.run(["sh", "-euc", script], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"README line {block.line_number}: exit status {result.returncode}\n{script}\n"
        f"{result.stderr}"
    )
    return result.stdout


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    """A copy of this host's group files, for ``groupadd --prefix``."""
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("group", "gshadow", "login.defs"):
        if (Path("/etc") / name).exists():
            (etc / name).write_bytes((Path("/etc") / name).read_bytes())
    return tmp_path


def set_up_etc(blocks: list[CodeBlock], root: Path) -> None:
    """Run the README's first set-up block: the group and /etc/migrelay."""
    assert run_block(block_starting(blocks, "groupadd "), root) == ""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the click commands, to parse command lines and --config as migrelay does ---------------


@pytest.fixture
def no_migrelay_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The options as the README gives them, not as this process's environment does."""
    for name in os.environ:
        if name.startswith("MIGRELAY_"):
            monkeypatch.delenv(name)


def parse_command(argv: list[str]) -> dict[str, Any]:
    """The parameters ``migrelay ARGV...`` would run with; nothing is run."""
    assert argv[0] == "migrelay", argv
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    command = group.commands[argv[1]]
    with command.make_context(argv[1], argv[2:]) as context:
        return dict(context.params)


# -- the set-up, certificates and fingerprint -------------------------------------------------


def test_readme_set_up_creates_the_systemd_units_group_and_etc_migrelay(
    readme_blocks: list[CodeBlock], host_root: Path
) -> None:
    set_up_etc(readme_blocks, host_root)
    groups = (host_root / "etc" / "group").read_text().splitlines()
    created = [line for line in groups if line.startswith("migrelay:")]
    assert len(created) == 1
    assert int(created[0].split(":")[2]) < 1000  # --system
    assert mode(host_root / "etc" / "migrelay") == 0o750
    # The group the README creates is the one the systemd unit runs serve in.
    assert "Group=migrelay" in SYSTEMD_UNIT.read_text().splitlines()


def test_readme_certificate_commands_print_a_fingerprint_that_connect_pins(
    readme_blocks: list[CodeBlock], host_root: Path, no_migrelay_environment: None
) -> None:
    set_up_etc(readme_blocks, host_root)
    printed = run_block(block_starting(readme_blocks, "cd /etc/migrelay"), host_root)
    etc = host_root / "etc" / "migrelay"
    der = ssl.PEM_cert_to_DER_cert((etc / "cert.pem").read_text())
    # "The last line prints `sha256 Fingerprint=` and 32 hex pairs."
    assert re.fullmatch(r"sha256 Fingerprint=([0-9A-F]{2}:){31}[0-9A-F]{2}\n", printed)
    assert normalize_fingerprint(printed) == hashlib.sha256(der).digest()
    assert mode(etc / "key.pem") == 0o640  # readable by serve's group, no one else

    # "On the source host, pin that line as printed": the README's connect command, with
    # the line it stands for in place of its placeholder.
    (connect,) = commands_starting(readme_blocks, "migrelay connect wss://dst1.example:8765/")
    argv = shlex.split(connect)
    placeholder = argv[argv.index("--fingerprint") + 1]
    assert placeholder == "sha256 Fingerprint=AB:CD:..."
    argv[argv.index("--fingerprint") + 1] = printed.rstrip("\n")
    params = parse_command(argv)
    assert normalize_fingerprint(params["fingerprint"]) == hashlib.sha256(der).digest()


@pytest.mark.parametrize("command", ["connect", "migrate"])
def test_fingerprint_help_names_the_openssl_command_of_the_readme(command: str) -> None:
    # --help says what the README says --fingerprint takes, and shows it whole (plain
    # text: no markup that would take the backquotes or the brackets).
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    printing = "openssl x509 -noout -fingerprint -sha256"
    assert f"(as `{printing}` prints it: 'sha256 Fingerprint=AB:CD:...'," in flat, flat
    assert f"`{printing} -in cert.pem`" in README.read_text(encoding="utf-8")


# -- tokens -----------------------------------------------------------------------------------


TOKENS_FILE_MARKER = "# /etc/migrelay/tokens"


def test_readme_tokens_file_means_what_its_comments_say(
    readme_blocks: list[CodeBlock], tmp_path: Path
) -> None:
    block = block_starting(readme_blocks, TOKENS_FILE_MARKER)
    path = tmp_path / "tokens"
    path.write_text(block.text)
    entries = load_token_entries(path)
    any_target, limited = (b"3b1f9c0e6d...", b"9a77d2c415...")
    assert entries == [
        TokenEntry(any_target, None, derived_token_name(any_target)),  # "# any target"
        # "# only /vm1 and /vm2; logs say "token src1""
        TokenEntry(limited, frozenset({"vm1", "vm2"}), "src1"),
    ]
    # "connect --token-file ... sends the first token of the file".
    assert read_first_token(path) == any_target.decode()


def test_readme_tokens_file_without_a_space_before_a_comment_is_an_error(
    readme_blocks: list[CodeBlock], tmp_path: Path
) -> None:
    # "a `#` anywhere else is an error that names the line"
    lines = list(block_starting(readme_blocks, TOKENS_FILE_MARKER).lines)
    assert lines[1].startswith("3b1f9c0e6d...   ")
    lines[1] = re.sub(r"\s+#\s*", "#", lines[1])
    path = tmp_path / "tokens"
    path.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} line 2: '#' inside a field"):
        load_token_entries(path)


def test_readme_token_commands_add_a_token_for_any_target_each_time(
    readme_blocks: list[CodeBlock], host_root: Path
) -> None:
    set_up_etc(readme_blocks, host_root)
    block = block_starting(readme_blocks, "touch /etc/migrelay/tokens")
    tokens = host_root / "etc" / "migrelay" / "tokens"
    for count in (1, 2):  # "one token per source host": the same commands again
        assert run_block(block, host_root) == ""
        entries = load_token_entries(tokens)
        assert len(entries) == count
    assert all(re.fullmatch(rb"[0-9a-f]{32}", entry.secret) for entry in entries)
    assert all(entry.targets is None for entry in entries)  # "for any target"
    assert entries[0].secret != entries[1].secret
    assert mode(tokens) == 0o640  # as the tokens file's first line says


# -- serve.toml -------------------------------------------------------------------------------


SERVE_TOML_MARKER = "# /etc/migrelay/serve.toml"


def serve_toml(blocks: list[CodeBlock], directory: Path, *, uncomment: bool = False) -> Path:
    """The README's serve.toml in ``directory``; with ``uncomment``, its ``# key =`` lines too."""
    block = block_starting(blocks, SERVE_TOML_MARKER)
    assert block.language == "toml"
    text = block.text
    if uncomment:
        text = re.sub(r"^# ([a-z-]+ = )", r"\1", text, flags=re.MULTILINE)
    path = directory / "serve.toml"
    path.write_text(text)
    return path


def test_readme_serve_toml_sets_what_it_says(
    readme_blocks: list[CodeBlock], tmp_path: Path, no_migrelay_environment: None
) -> None:
    path = serve_toml(readme_blocks, tmp_path)
    params = parse_command(["migrelay", "serve", "--config", str(path)])
    etc = Path("/etc/migrelay")
    expected = {
        "listen": "0.0.0.0:8765",
        "target_dir": Path("/run/migrelay"),
        "qmp_dir": Path("/run/migrelay"),
        "token_file": etc / "tokens",
        "tls_cert": etc / "cert.pem",
        "tls_key": etc / "key.pem",
        "client_ca": None,
        "max_sessions": 8,
        "max_channels": 64,
        "idle_timeout": 600,
        "shutdown_timeout": 120,
        "metrics_token_file": None,
    }
    assert {name: params[name] for name in expected} == expected
    # The comments: "/NAME -> /run/migrelay/NAME.sock", "on /run/migrelay/NAME.qmp".
    block = block_starting(readme_blocks, SERVE_TOML_MARKER)
    (target_dir,) = (line for line in block.lines if line.startswith("target-dir"))
    assert target_dir.endswith(f"# /NAME -> {params['target_dir']}/NAME.sock")
    (qmp_dir,) = (line for line in block.lines if line.startswith("qmp-dir"))
    assert qmp_dir.endswith(f"on {params['qmp_dir']}/NAME.qmp")


def test_readme_serve_toml_commented_settings_are_settings_too(
    readme_blocks: list[CodeBlock], tmp_path: Path, no_migrelay_environment: None
) -> None:
    path = serve_toml(readme_blocks, tmp_path, uncomment=True)
    params = parse_command(["migrelay", "serve", "--config", str(path)])
    assert params["client_ca"] == Path("/etc/migrelay/clients-ca.pem")
    assert params["metrics_token_file"] == Path("/etc/migrelay/metrics-tokens")


def test_readme_serve_toml_is_the_walkthroughs_serve_command(
    readme_blocks: list[CodeBlock], tmp_path: Path, no_migrelay_environment: None
) -> None:
    # "serves as the walkthrough's `serve` command does, with the limits above"
    from_file = parse_command(
        ["migrelay", "serve", "--config", str(serve_toml(readme_blocks, tmp_path))]
    )
    # The walkthrough's serve is the one that issues migrate-incoming itself, as the
    # file's does (other examples, behind nginx say, serve otherwise on purpose).
    walkthrough = [
        command
        for command in commands_starting(readme_blocks, "migrelay serve ")
        if "--qmp-dir" in command
    ]
    assert walkthrough, "no `migrelay serve ... --qmp-dir` command in the README"
    shared = ("listen", "target_dir", "qmp_dir", "token_file", "tls_cert", "tls_key")
    for command in walkthrough:
        printed = parse_command(shlex.split(command))
        assert {name: printed[name] for name in shared} == {
            name: from_file[name] for name in shared
        }, command


def test_config_file_docstring_example_is_read_by_each_of_its_commands(tmp_path: Path) -> None:
    # The module's own example (`migrelay.config_file`): one table per command that
    # reads the file, every key one of that command's settings.
    doc = config_file.__doc__ or ""
    example = doc.split("::\n\n", 1)[1].split("\n\nPrecedence", 1)[0]
    path = tmp_path / "example.toml"
    path.write_text("\n".join(line.removeprefix("    ") for line in example.splitlines()))
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    tables = re.findall(r"^\[(\w+)\]$", path.read_text(), re.MULTILINE)
    assert tables == ["serve", "connect", "migrate"]
    for command in tables:
        known = {param.name for param in group.commands[command].params if param.name}
        assert config_file.load_section(path, command, known), command
    # The serve table serves what the README's serve.toml serves.
    (target_dir,) = re.findall(r'^target-dir = "(.*)"$', path.read_text(), re.MULTILINE)
    assert target_dir == "/run/migrelay"


# -- defaults the README states ---------------------------------------------------------------


#: The README's words for the liveness defaults (Wire protocol).
_PING = "a ping after `--ping-interval` seconds without traffic (15)"
_PONG = "no answer within `--ping-timeout` (15)"
#: (command, parameter, its default in the code, the README's words for it).
README_DEFAULTS = [
    ("serve", "wait_target", 30.0, "`--wait-target` seconds (default 30)"),
    ("migrate", "wait_socket", 30.0, "`--wait-socket` seconds (default 30)"),
    ("connect", "retry_open", 0.0, "(default 0: it fails the connection at once)"),
    ("serve", "ping_interval", 15.0, _PING),
    ("connect", "ping_interval", 15.0, _PING),
    ("serve", "ping_timeout", 15.0, _PONG),
    ("connect", "ping_timeout", 15.0, _PONG),
    ("migrate", "stall_timeout", 60.0, "`--stall-timeout` seconds (60 by default"),
    ("migrate", "recover_timeout", 300.0, "(`--recover-timeout`, default 300 s)"),
    ("migrate", "max_downtime", 2000, "`--max-downtime` (default 2000 ms"),
    ("migrate", "disk_copy_mode", "background", "in the default `--disk-copy-mode background`"),
    ("incoming", "export_timeout", 3600.0, "(at most `--export-timeout`, 3600 s)"),
    ("serve", "max_handshakes", 512, "`--max-handshakes` (512)"),
    ("serve", "max_handshakes_per_address", 32, "`--max-handshakes-per-address` (32)"),
    ("serve", "handshake_timeout", 10.0, "`--handshake-timeout` (10 s)"),
    ("serve", "max_channels", 64, "`--max-channels` (64)"),
    ("serve", "max_sessions_per_token", 16, "`--max-sessions-per-token` (16)"),
    ("serve", "max_sessions_per_target", 4, "`--max-sessions-per-target` (4)"),
    ("serve", "max_header_bytes", 16 * 1024, "`--max-header-bytes` (16 KiB)"),
    ("serve", "max_sessions", 64, "`--max-sessions` (64)"),
    ("serve", "max_message", "1M", "`--max-message` (1 MiB)"),
    ("serve", "shutdown_timeout", 120.0, "`--shutdown-timeout` seconds (120 by default"),
    ("serve", "idle_timeout", 0.0, "`--idle-timeout` is off by default"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "name", "default", "words"),
    README_DEFAULTS,
    ids=[f"{command}-{name}" for command, name, _, _ in README_DEFAULTS],
)
def test_a_default_the_readme_states_is_the_commands_default(
    command: str, name: str, default: object, words: str
) -> None:
    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert words in readme, f"the README no longer says {words!r}"
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    (param,) = (param for param in group.commands[command].params if param.name == name)
    assert param.default == default, (command, name, param.default)
