"""``serve --target-map NAME=PATH`` and privileged targets (issue 16).

A mapped name reaches any unix socket, outside ``--target-dir`` and named as its
daemon names it (libvirt's ``libvirt-sock``), and wins over ``--target-dir``'s
``NAME.sock``; it is still opened without following a symlink. A privileged target
(``--privileged-target``, or a mapped libvirt read-write socket) opens only with a token
that lists it: an any-target token gets 403 and one log line that says why.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from tests.integration.served import (
    TOKEN,
    VM1_TOKEN,
    Run,
    Sink,
    refused,
    serving,
    upgrade,
    wait_until,
)

from migrelay.aio.access import parse_target_map, parse_token_lines, privileged_targets
from migrelay.aio.service import ServeSettings, load_server_config
from migrelay.core.frames import Opcode, encode_frame
from migrelay.errors import ConfigError

#: A token that lists the privileged target (and vm1).
LIBVIRT_TOKEN = "libvirt-and-vm1-token"


async def _sink_at(path: Path) -> tuple[Sink, asyncio.Server]:
    sink = Sink()
    server = await asyncio.get_running_loop().create_unix_server(sink.protocol, str(path))
    return sink, server


def test_mapped_name_reaches_its_socket_and_wins_over_target_dir(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    elsewhere = sock_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)

    async def main() -> None:
        mapped_sink, mapped = await _sink_at(elsewhere / "any-name")
        mapping = {"other": elsewhere / "any-name", "vm1": elsewhere / "any-name"}
        try:
            async with serving(sock_dir, logs, target_map=mapping) as served:
                for path in ("/other", "/vm1"):
                    transport = await upgrade(served, path=path)
                    transport.write(encode_frame(Opcode.BINARY, b"mapped", b"abcd"))
                    transport.abort()
                await wait_until(lambda: mapped_sink.received == 12, "both at the mapped socket")
                # vm2 is not mapped: --target-dir's vm2.sock still serves it.
                transport = await upgrade(served, path="/vm2")
                transport.write(encode_frame(Opcode.BINARY, b"dir", b"abcd"))
                transport.abort()
                await wait_until(lambda: served.sink.received == 3, "vm2.sock's bytes")
                assert mapped_sink.received == 12
        finally:
            for accepted in mapped_sink.transports:
                accepted.close()
            mapped.close()
            await mapped.wait_closed()

    run_async(main())


def test_mapped_symlink_is_refused_503(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        link = sock_dir / "link-sock"
        os.symlink(sock_dir / "vm1.sock", link)
        async with serving(sock_dir, logs, target_map={"linked": link}) as served:
            error = await refused(served, path="/linked")
            assert error.status == 503, error
            assert served.sink.received == 0 and not served.sink.transports

    run_async(main())


def test_privileged_target_opens_only_with_a_token_that_names_it(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        tokens = parse_token_lines(
            [TOKEN, f"{VM1_TOKEN} vm1", f"{LIBVIRT_TOKEN} vm1,libvirt name=libvirt-user"]
        )
        mapping = {"libvirt": sock_dir / "vm2.sock"}
        async with serving(
            sock_dir,
            logs,
            tokens=tokens,
            target_map=mapping,
            privileged_targets=frozenset({"libvirt"}),
        ) as served:
            for token in (TOKEN, VM1_TOKEN):
                logs.clear()
                error = await refused(served, path="/libvirt", token=token)
                assert error.status == 403, error
                lines = served.lines()
                assert len(lines) == 1, lines
                if token == TOKEN:
                    # The log says why: the token may open any target, but not this one.
                    assert "/libvirt is privileged" in lines[0], lines
                    assert "does not name it" in lines[0], lines
                assert token not in lines[0]
            # An any-target token still opens the other targets.
            transport = await upgrade(served, path="/vm1", token=TOKEN)
            transport.abort()
            transport = await upgrade(served, path="/libvirt", token=LIBVIRT_TOKEN)
            transport.write(encode_frame(Opcode.BINARY, b"rpc", b"abcd"))
            await wait_until(lambda: served.sink.received == 3, "the privileged target's bytes")
            transport.abort()
            metrics = served.server.metrics.exposition().decode()
            assert 'reason="privileged_target",status="403"} 1' in metrics, metrics

    run_async(main())


def test_target_map_values_and_libvirt_sockets_are_privileged_by_name() -> None:
    mapped = parse_target_map(
        [
            "libvirt=/run/libvirt/libvirt-sock",
            "ro=/run/libvirt/libvirt-sock-ro",
            "qemud=/run/libvirt/virtqemud-sock",
            "admin=/run/libvirt/libvirt-admin-sock",
            "migrate=/run/migrelay-libvirt/migrate.sock",
        ]
    )
    assert mapped["ro"] == Path("/run/libvirt/libvirt-sock-ro")
    assert privileged_targets(["migrate"], mapped) == {"libvirt", "qemud", "admin", "migrate"}
    assert privileged_targets([], mapped) == {"libvirt", "qemud", "admin"}
    for bad in ("libvirt", "=/x", "a b=/x", "rel=relative/path", "x=/a"):
        with pytest.raises(ConfigError):
            parse_target_map([bad, "x=/b"] if bad == "x=/a" else [bad])
    with pytest.raises(ConfigError):
        privileged_targets(["../etc"], {})


def test_privileged_target_without_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="privileged target libvirt needs --token-file"):
        load_server_config(ServeSettings(target_map=("libvirt=/run/libvirt/libvirt-sock",)))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{LIBVIRT_TOKEN} libvirt\n", encoding="ascii")
    config, _ = load_server_config(
        ServeSettings(
            target_map=("libvirt=/run/libvirt/libvirt-sock", "mig=/run/x/mig.sock"),
            privileged_target=("mig",),
            token_file=tokens,
        )
    )
    assert config.target_map == {
        "libvirt": Path("/run/libvirt/libvirt-sock"),
        "mig": Path("/run/x/mig.sock"),
    }
    assert config.privileged_targets == {"libvirt", "mig"}
    # Only a map: no default target for the path /.
    assert config.target is None
