"""``connect URL --map NAME=PATH ...``: one source process for every socket of a libvirt
migration, each carried to the target ``/NAME`` (issue 16), and ``--once``'s end: once a
session has ended on one socket and no socket has a channel open any more."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.integration.served import PROMPT_S, TOKEN, Run, serving, wait_until

from migrelay.aio.source import ClientSettings, parse_socket_map, run_mapped_relays, target_url
from migrelay.errors import ConfigError


async def _send(path: Path, data: bytes) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    return writer


def _nbd_sockets(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(".nbd"))


def test_one_process_carries_each_socket_to_its_target_and_once_waits_for_all(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    tokens = tmp_path / "token"
    tokens.write_text(f"{TOKEN}\n", encoding="ascii")
    rpc, stream = sock_dir / "src-rpc.sock", sock_dir / "src-stream.sock"

    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            settings = ClientSettings(url=served.url("/"), token_file=tokens, workers=1)
            stop = asyncio.Event()
            relays = asyncio.ensure_future(
                run_mapped_relays(settings, {"vm1": rpc, "vm2": stream}, stop, once=True)
            )
            try:
                await wait_until(lambda: rpc.is_socket() and stream.is_socket(), "both sockets")
                # libvirt names its NBD socket itself: no PATH.nbd beside a mapped socket.
                assert _nbd_sockets(sock_dir) == []
                first = await _send(rpc, b"rpc")
                second = await _send(stream, b"stream")
                await wait_until(lambda: served.sink.received == 9, "both at their targets")
                opened = [line for line in served.lines() if "opened" in line]
                assert any("target vm1" in line for line in opened), opened
                assert any("target vm2" in line for line in opened), opened
                # The stream's session ends; the RPC connection is still open: running.
                second.close()
                await wait_until(
                    lambda: any("closed cleanly" in line for line in served.lines()),
                    "the stream's session to end",
                )
                await asyncio.sleep(0.2)
                assert not relays.done()
                first.close()
                assert await asyncio.wait_for(relays, PROMPT_S) == 0
                assert not rpc.exists() and not stream.exists()
            finally:
                stop.set()
                await asyncio.wait_for(relays, PROMPT_S)

    run_async(main())


def test_socket_map_values_and_target_urls() -> None:
    assert parse_socket_map(["libvirt=/run/x/libvirt.sock", "migrate=/run/x/m.sock"]) == {
        "libvirt": Path("/run/x/libvirt.sock"),
        "migrate": Path("/run/x/m.sock"),
    }
    for bad in (["nopath"], ["a=/x", "a=/y"], ["a=/x", "b=/x"], ["../up=/x"]):
        with pytest.raises(ConfigError):
            parse_socket_map(bad)
    assert target_url("wss://dst:8765", "nbd") == "wss://dst:8765/nbd"
    assert target_url("wss://dst/migrelay/", "nbd") == "wss://dst/migrelay/nbd"
