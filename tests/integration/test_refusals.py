"""Every refusal of ``serve`` (DESIGN.md §3): its HTTP status, one log line, no harm done.

Requests are written byte for byte on raw sockets, so the server is checked against the
wire and not against migrelay's own client. After each refusal the same server must
still accept a well-formed session and relay its bytes to the destination.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests import helpers

from migrelay.aio.access import TokenEntry
from migrelay.aio.client import ClientConfig, open_websocket
from migrelay.aio.server import RelayServer, ServerConfig
from migrelay.core.frames import Opcode, encode_frame
from migrelay.limits import Limits

Run = Callable[[Coroutine[Any, Any, None]], None]

FACTOR = helpers.FACTOR
PROMPT_SECONDS = 2.0 * FACTOR
TOKEN = "s3cret-token"
#: A refusal is answered "at once": as soon as the head is read, long before the
#: handshake timeout could have ended the connection (so a refusal that came only from
#: the timeout fails the test).
AT_ONCE_SECONDS = 0.5 * FACTOR
HANDSHAKE_TIMEOUT = 2 * AT_ONCE_SECONDS
WAIT_TARGET = 0.3 * FACTOR


# -- raw HTTP ---------------------------------------------------------------------------


def upgrade_request(
    path: str = "/",
    *,
    token: str | None = TOKEN,
    subprotocol: str | None = "migrelay.v1",
    version: str | None = "13",
    key: str | None = None,
    http_version: str = "1.1",
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A WebSocket upgrade request; each header can be left out (None) or altered."""
    lines = [
        f"GET {path} HTTP/{http_version}",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key or base64.b64encode(os.urandom(16)).decode()}",
    ]
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float


async def exchange(port: int, *parts: bytes, gap: float = 0.0) -> Response:
    """Send ``parts`` (``gap`` seconds apart), read the answer until the server closes."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(reader.read())  # everything until the server closes
    try:
        for index, part in enumerate(parts):
            if index and gap:
                await asyncio.sleep(gap)  # pacing a slow client, not synchronisation
            if answer.done() or writer.transport.is_closing():
                break  # the server answered early (it must not wait for the rest)
            writer.write(part)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        raw = await asyncio.wait_for(answer, PROMPT_SECONDS + HANDSHAKE_TIMEOUT * 2)
    finally:
        answer.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    elapsed = time.monotonic() - started
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    http, status, *_ = status_line.split(" ", 2)
    assert http == "HTTP/1.1", raw
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status), headers, body, elapsed)


# -- the server under test -------------------------------------------------------------


@dataclass
class Recorder:
    """A destination socket that records every connection and the bytes it got."""

    connections: list[bytearray] = field(default_factory=list)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)

    def protocol(self) -> asyncio.Protocol:
        recorder = self

        class _Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.data = bytearray()
                recorder.connections.append(self.data)
                recorder.transports.append(transport)

            def data_received(self, data: bytes) -> None:
                self.data += data

        return _Protocol()


@dataclass
class Served:
    server: RelayServer
    port: int
    default: Recorder
    named: Recorder
    outside: Recorder
    logs: pytest.LogCaptureFixture

    def refusal_lines(self) -> list[str]:
        return [r.getMessage() for r in self.logs.records if r.name.startswith("migrelay")]


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    await helpers.wait_until(predicate, PROMPT_SECONDS, what)


@contextlib.asynccontextmanager
async def serving(
    sock_dir: Path, logs: pytest.LogCaptureFixture, **config: Any
) -> AsyncIterator[Served]:
    """``serve`` with a token, a default target, and ``--target-dir vms/`` holding vm.sock.

    ``etc.sock`` sits next to ``vms/``: a path that escaped the directory would reach it.
    """
    loop = asyncio.get_running_loop()
    (sock_dir / "vms").mkdir()
    recorders = Recorder(), Recorder(), Recorder()
    paths = sock_dir / "dest.sock", sock_dir / "vms" / "vm.sock", sock_dir / "etc.sock"
    listeners = [
        await loop.create_unix_server(recorder.protocol, str(path))
        for recorder, path in zip(recorders, paths, strict=True)
    ]
    settings: dict[str, Any] = {
        "port": 0,
        "target": paths[0],
        "target_dir": sock_dir / "vms",
        "tokens": [TokenEntry(TOKEN.encode())],
        "wait_target": WAIT_TARGET,
        "limits": Limits(handshake_timeout=HANDSHAKE_TIMEOUT),
    }
    settings.update(config)
    server = RelayServer(ServerConfig(**settings))
    await server.start()
    served = Served(server, server.sockets[0].getsockname()[1], *recorders, logs)
    try:
        yield served
    finally:
        await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)
        for recorder in recorders:
            for transport in recorder.transports:
                transport.close()
        for listener in listeners:
            listener.close()
            await asyncio.wait_for(listener.wait_closed(), PROMPT_SECONDS)
        assert served.outside.connections == [], "a request escaped --target-dir"


async def open_session(
    port: int, path: str = "/", headers: Sequence[tuple[str, str]] = ()
) -> asyncio.Transport:
    transport, _ = await open_websocket(
        ClientConfig(url=f"ws://127.0.0.1:{port}{path}", token=TOKEN), headers
    )
    return transport


async def assert_still_serves(served: Served) -> None:
    """A fresh, well-formed session is accepted and its bytes reach the destination."""
    before = len(served.default.connections)
    transport = await asyncio.wait_for(open_session(served.port), PROMPT_SECONDS)
    transport.write(encode_frame(Opcode.BINARY, b"still serving", b"\x01\x02\x03\x04"))
    await wait_until(
        lambda: (
            len(served.default.connections) == before + 1
            and served.default.connections[-1] == b"still serving"
        ),
        "a new session's bytes at the destination",
    )
    transport.abort()
    await wait_until(lambda: not served.server.channels, "the channel to close")


# -- the refusal table ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    request: bytes
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "dot_dot_path_is_404": Case(upgrade_request("/../etc"), 404),
    "dot_dot_inside_name_is_404": Case(upgrade_request("/vms/../../etc"), 404),
    "encoded_slash_name_is_404": Case(upgrade_request("/..%2Fetc"), 404),
    "name_starting_with_dot_is_404": Case(upgrade_request("/.vm"), 404),
    "name_of_65_chars_is_404": Case(upgrade_request("/" + "a" * 65), 404),
    "name_without_target_dir_is_404": Case(upgrade_request("/vm"), 404, {}, {"target_dir": None}),
    "no_default_target_is_404": Case(upgrade_request("/"), 404, {}, {"target": None}),
    "no_token_is_401_with_www_authenticate": Case(
        upgrade_request(token=None), 401, {"www-authenticate": "Bearer"}
    ),
    "basic_auth_is_401": Case(
        upgrade_request(token=None, extra=[("Authorization", "Basic dXNlcjpwYXNz")]),
        401,
        {"www-authenticate": "Bearer"},
    ),
    "wrong_token_is_403": Case(upgrade_request(token="not-the-token"), 403),
    "missing_subprotocol_is_400": Case(upgrade_request(subprotocol=None), 400),
    "other_subprotocol_is_400": Case(upgrade_request(subprotocol="migrelay.v2"), 400),
    "non_numeric_channel_is_400": Case(
        upgrade_request(extra=[("Migrelay-Session", "s1"), ("Migrelay-Channel", "x")]), 400
    ),
    "negative_channel_is_400": Case(
        upgrade_request(extra=[("Migrelay-Session", "s1"), ("Migrelay-Channel", "-1")]), 400
    ),
    "channel_256_is_400": Case(
        upgrade_request(extra=[("Migrelay-Session", "s1"), ("Migrelay-Channel", "256")]), 400
    ),
    "channel_without_session_is_400": Case(
        upgrade_request(extra=[("Migrelay-Channel", "0")]), 400
    ),
    "invalid_session_id_is_400": Case(
        upgrade_request(extra=[("Migrelay-Session", "../x"), ("Migrelay-Channel", "0")]), 400
    ),
    "websocket_version_8_is_426_naming_version_13": Case(
        upgrade_request(version="8"), 426, {"sec-websocket-version": "13"}
    ),
    "missing_websocket_version_is_400": Case(upgrade_request(version=None), 400),
    "invalid_websocket_key_is_400": Case(upgrade_request(key="c2hvcnQ="), 400),
    "upgrade_over_http_1_0_is_400": Case(upgrade_request(http_version="1.0"), 400),
    "header_line_without_colon_is_400": Case(
        b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n", 400
    ),
    "binary_garbage_is_400": Case(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "plain_get_is_426_with_upgrade": Case(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426, {"upgrade": "websocket"}
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_refusal_has_its_status_one_log_line_and_server_keeps_serving(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture, case: Case
) -> None:
    async def main() -> None:
        config = dict(case.config)
        async with serving(sock_dir, logs, **config) as served:
            served.logs.clear()
            response = await exchange(served.port, case.request)
            assert response.status == case.status, response
            assert response.elapsed < AT_ONCE_SECONDS, response
            for name, value in case.headers.items():
                assert response.headers.get(name) == value, response.headers
            assert response.headers.get("connection") == "close"
            assert response.body.endswith(b"\n") and response.body.count(b"\n") == 1
            lines = served.refusal_lines()
            assert len(lines) == 1 and f": {case.status} " in lines[0], lines
            if config.get("target", True) is not None:
                await assert_still_serves(served)
            assert served.outside.connections == []

    run_async(main())


def test_oversized_head_is_431_before_the_head_ends(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            served.logs.clear()
            head = upgrade_request()[:-2]  # no blank line: the head never ends
            padding = "".join(f"X-Pad-{n}: {'p' * 90}\r\n" for n in range(170)).encode()
            assert len(head + padding) > served.server.config.limits.max_head_bytes
            response = await exchange(served.port, head + padding)
            assert response.status == 431
            assert response.elapsed < AT_ONCE_SECONDS, response
            assert len(served.refusal_lines()) == 1
            await assert_still_serves(served)

    run_async(main())


_REQUEST = upgrade_request()
#: What a client that never finishes its head sends: each part ``SLOW_GAP`` s apart.
SLOW_CLIENTS: dict[str, list[bytes]] = {
    # slowloris: a byte every 20 ms keeps the connection busy, never complete
    "slow_handshake": [_REQUEST[i : i + 1] for i in range(len(_REQUEST) - 4)],
    "silent_client": [],
}
SLOW_GAP = 0.02


@pytest.mark.parametrize("parts", list(SLOW_CLIENTS.values()), ids=list(SLOW_CLIENTS))
def test_unfinished_head_is_408_after_handshake_timeout(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture, parts: list[bytes]
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            served.logs.clear()
            response = await exchange(served.port, *parts, gap=SLOW_GAP)
            assert response.status == 408
            assert (
                HANDSHAKE_TIMEOUT - 0.05 <= response.elapsed < HANDSHAKE_TIMEOUT + PROMPT_SECONDS
            )
            assert len(served.refusal_lines()) == 1
            await assert_still_serves(served)

    run_async(main())


def test_healthz_is_200_and_not_a_refusal(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            served.logs.clear()
            response = await exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (response.status, response.body) == (200, b"ok\n")
            assert served.refusal_lines() == []
            await assert_still_serves(served)

    run_async(main())


def test_repeated_channel_is_409_and_first_channel_keeps_working(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            session = [("Migrelay-Session", "dup"), ("Migrelay-Channel", "0")]
            first = await open_session(served.port, headers=session)
            served.logs.clear()
            response = await exchange(served.port, upgrade_request(extra=session))
            assert response.status == 409
            assert response.elapsed < AT_ONCE_SECONDS, response
            assert len(served.refusal_lines()) == 1
            first.write(encode_frame(Opcode.BINARY, b"first", b"abcd"))
            await wait_until(
                lambda: served.default.connections == [b"first"], "the first channel's bytes"
            )
            first.abort()
            await wait_until(lambda: not served.server.channels, "the channel to close")
            await assert_still_serves(served)

    run_async(main())


def test_session_moving_to_another_target_is_409(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            first = await open_session(
                served.port, "/", [("Migrelay-Session", "s"), ("Migrelay-Channel", "0")]
            )
            served.logs.clear()
            other = [("Migrelay-Session", "s"), ("Migrelay-Channel", "1")]
            response = await exchange(served.port, upgrade_request("/vm", extra=other))
            assert response.status == 409
            assert response.elapsed < AT_ONCE_SECONDS, response
            assert len(served.refusal_lines()) == 1
            assert served.named.connections == []
            first.abort()
            await wait_until(lambda: not served.server.channels, "the channel to close")
            await assert_still_serves(served)

    run_async(main())


def test_sessions_beyond_max_sessions_are_503_with_retry_after(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs, max_sessions=1) as served:
            first = await open_session(served.port)
            served.logs.clear()
            response = await exchange(served.port, upgrade_request())
            assert response.status == 503
            assert response.elapsed < AT_ONCE_SECONDS, response
            assert response.headers.get("retry-after", "").isdigit()
            assert len(served.refusal_lines()) == 1
            first.abort()
            await wait_until(lambda: not served.server.sessions, "the session to end")
            await assert_still_serves(served)

    run_async(main())


def test_missing_destination_socket_is_503_with_retry_after_after_wait_target(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            served.logs.clear()
            response = await exchange(served.port, upgrade_request("/absent"))
            assert response.status == 503
            assert response.headers.get("retry-after", "").isdigit()
            assert WAIT_TARGET <= response.elapsed < WAIT_TARGET + PROMPT_SECONDS
            assert len(served.refusal_lines()) == 1
            await assert_still_serves(served)

    run_async(main())


def test_named_target_in_target_dir_is_served(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # The counterpart of the 404 cases: a valid NAME reaches --target-dir/NAME.sock.
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            transport = await open_session(served.port, "/vm")
            transport.write(encode_frame(Opcode.BINARY, b"to vm", b"wxyz"))
            await wait_until(lambda: served.named.connections == [b"to vm"], "bytes at vm.sock")
            assert served.default.connections == []
            transport.abort()
            await wait_until(lambda: not served.server.channels, "the channel to close")

    run_async(main())
