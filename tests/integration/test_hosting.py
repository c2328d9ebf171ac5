"""Production-host features of ``serve`` and ``connect`` over real sockets (issue 6).

Token scopes, the Origin allow-list, the channel limit, path prefix, X-Forwarded-For,
message size, idle timeout, graceful shutdown, ``/metrics``, CONNECT proxies and the
TOML config file. (The refusals that ``test_refusals.py`` covers are not repeated.)
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast

import pytest
import typer
from tests import helpers
from tests.integration.served import (
    PROMPT_S,
    TOKEN,
    VM1_TOKEN,
    Run,
    Served,
    refused,
    serving,
    upgrade,
    wait_until,
)
from typer.testing import CliRunner
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from migrelay.aio.access import IPNetwork, parse_networks, parse_token_lines
from migrelay.aio.client import ClientConfig, open_websocket
from migrelay.aio.proxy import ProxyURL, bypassed, proxy_for
from migrelay.cli.options import config_callback
from migrelay.config_file import ConfigError, load_section
from migrelay.errors import ConnectError, RelayError
from migrelay.limits import Limits

FACTOR = helpers.FACTOR
TO_VM2 = 'migrelay_bytes_total{direction="to_destination",target="vm2"}'


def foreign_client(url: str) -> ws_connect:
    """A `websockets` client to ``url`` with the token, as a non-migrelay peer would be."""
    return ws_connect(
        url,
        subprotocols=[Subprotocol("migrelay.v1")],
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        compression=None,
    )


async def assert_still_serving(served: Served) -> None:
    transport = await upgrade(served)
    transport.abort()
    await wait_until(lambda: not served.server.channels, "the channel to close")


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), PROMPT_S)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# -- refusals that test_refusals.py does not cover --------------------------------------


@dataclass(frozen=True)
class RefusalCase:
    kwargs: dict[str, Any]
    status: int
    config: dict[str, Any] = field(default_factory=dict)


REFUSALS = {
    "token_for_another_target_is_403": RefusalCase({"path": "/vm2", "token": VM1_TOKEN}, 403),
    "origin_not_in_allow_list_is_403": RefusalCase(
        {"headers": [("Origin", "https://evil.example")]},
        403,
        {"allowed_origins": frozenset({"https://console.example"})},
    ),
    "channel_beyond_max_channels_is_429": RefusalCase(
        {"headers": [("Migrelay-Session", "s1"), ("Migrelay-Channel", "4")]},
        429,
        {"max_channels": 4},
    ),
    "path_outside_the_prefix_is_404": RefusalCase({}, 404, {"path_prefix": "/migrelay"}),
    "session_while_draining_is_503": RefusalCase({}, 503, {}),
}


@pytest.mark.parametrize("case", list(REFUSALS.values()), ids=list(REFUSALS))
def test_refusal_is_its_status_with_one_log_line_and_server_keeps_serving(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture, case: RefusalCase
) -> None:
    draining = case is REFUSALS["session_while_draining_is_503"]

    async def main() -> None:
        async with serving(sock_dir, logs, **case.config) as served:
            served.server.draining = draining
            logs.clear()
            error = await refused(served, **case.kwargs)
            assert error.status == case.status, error
            lines = served.lines()
            assert len(lines) == 1 and f": {case.status} " in lines[0], lines
            assert TOKEN not in lines[0] and VM1_TOKEN not in lines[0]
            served.server.draining = False
            if case.config.get("path_prefix"):
                transport = await upgrade(served, path="/migrelay/vm1")
                transport.abort()
            else:
                await assert_still_serving(served)
            metrics = served.server.metrics.exposition().decode()
            assert re.search(
                rf'migrelay_refusals_total{{reason="\w+",status="{case.status}"}} 1', metrics
            ), metrics

    run_async(main())


def test_restricted_token_reaches_its_own_target(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            transport = await upgrade(served, path="/vm1", token=VM1_TOKEN)
            transport.abort()
            unrestricted = await upgrade(served, path="/vm2", token=TOKEN)
            unrestricted.abort()

    run_async(main())


def test_allowed_origin_and_absent_origin_are_accepted(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        allowed = frozenset({"https://console.example"})
        async with serving(sock_dir, logs, allowed_origins=allowed) as served:
            # Browsers send an origin without a path; case does not matter.
            for headers in ([("Origin", "https://Console.example")], []):
                transport = await upgrade(served, headers=headers)
                transport.abort()

    run_async(main())


def test_token_file_lines_name_their_targets_and_reject_garbage() -> None:
    entries = parse_token_lines(["# comment", "", "a", "b vm1,vm2", "c /"])
    assert [entry.targets for entry in entries] == [None, {"vm1", "vm2"}, {"/"}]
    assert "b" not in repr(entries[1]).replace("bytes", "")
    with pytest.raises(RelayError, match="line 1: expected"):
        parse_token_lines(["x y z"])


# -- reverse proxies -----------------------------------------------------------------------


def test_x_forwarded_for_is_logged_only_from_a_trusted_proxy(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    xff = [("X-Forwarded-For", "198.51.100.7, 203.0.113.9")]

    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            await refused(served, token="wrong", headers=xff)
            assert "203.0.113.9" not in served.lines()[-1]
        async with serving(sock_dir, logs, trusted_proxies=_networks("127.0.0.0/8")) as served:
            logs.clear()
            await refused(served, token="wrong", headers=xff)
            # The right-most untrusted hop is the client; the left one could be forged.
            assert "from 203.0.113.9 via 127.0.0.1:" in served.lines()[-1], served.lines()

    run_async(main())


def _networks(*values: str) -> tuple[IPNetwork, ...]:
    return parse_networks(values)


def test_path_prefix_routes_upgrades_and_health_checks(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs, path_prefix="/migrelay") as served:
            transport = await upgrade(served, path="/migrelay/vm2")
            await wait_until(lambda: len(served.sink.transports) == 1, "vm2's connection")
            transport.abort()
            assert await http_get(served.port, "/migrelay/healthz") == (200, b"ok\n")
            assert (await http_get(served.port, "/healthz"))[0] == 200

    run_async(main())


# -- limits on open channels -----------------------------------------------------------


def test_message_above_max_message_closes_1009(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    limits = Limits(max_message_bytes=4096, read_bytes=4096)

    async def main() -> None:
        async with serving(sock_dir, logs, limits=limits) as served:
            async with foreign_client(served.url()) as ws:
                await ws.send(b"x" * 8192)
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), PROMPT_S)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            await wait_until(lambda: not served.server.channels, "the channel to close")
            closing = [line for line in served.lines() if " closed: " in line]
            assert len(closing) == 1 and "1009" in closing[0], served.lines()

    run_async(main())


def test_channel_without_data_for_idle_timeout_closes_4002(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs, idle_timeout=0.4) as served:
            async with foreign_client(served.url()) as ws:
                await ws.send(b"some data")
                started = time.monotonic()
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), PROMPT_S)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4002
                assert time.monotonic() - started >= 0.3
            await wait_until(lambda: not served.server.channels, "the channel to close")
            closing = [line for line in served.lines() if " closed: " in line]
            assert len(closing) == 1 and "idle timeout" in closing[0], served.lines()

    run_async(main())


# -- graceful shutdown -----------------------------------------------------------------


def test_shutdown_waits_for_a_running_channel_to_finish(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            transport = await upgrade(served)
            shutdown = asyncio.ensure_future(served.server.shutdown(PROMPT_S))
            # Its line says that it reached its wait, and for what.
            waiting = f"shutting down: waiting up to {PROMPT_S:g} s for 1 session(s), 1 channel(s)"
            await wait_until(lambda: waiting in served.lines(), "shutdown's wait")
            # Had it not waited, it would have gone on at once: deadline, 4004, close.
            assert not shutdown.done()
            assert len(served.server.channels) == 1
            assert not [line for line in served.lines() if "deadline" in line], served.lines()
            # New connections are no longer accepted.
            with pytest.raises(ConnectError):
                await upgrade(served)
            transport.abort()  # the migration ends (here: its client goes away)
            await asyncio.wait_for(shutdown, PROMPT_S)

    run_async(main())


def test_shutdown_deadline_closes_remaining_channels_with_4004(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with (
            serving(sock_dir, logs) as served,
            foreign_client(served.url()) as ws,
        ):
            started = time.monotonic()
            shutdown = asyncio.ensure_future(served.server.shutdown(0.3))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), PROMPT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
            assert time.monotonic() - started >= 0.25
            await asyncio.wait_for(shutdown, PROMPT_S)

    run_async(main())


# -- metrics ---------------------------------------------------------------------------


def test_metrics_count_bytes_each_way_per_target_while_open_and_after_close(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            async with foreign_client(served.url("/vm2")) as ws:
                await ws.send(b"y" * 100_000)
                await wait_until(lambda: served.sink.received == 100_000, "the bytes")
                status, body = await http_get(served.port, "/metrics")
                assert status == 200
                text = body.decode()
                assert (
                    'migrelay_bytes_total{direction="to_destination",target="vm2"} 100000.0'
                    in text
                )
                assert "migrelay_channels_open 1.0" in text
                assert "migrelay_sessions_open 1.0" in text
            await wait_until(lambda: not served.server.channels, "the channel to close")
            text = (await http_get(served.port, "/metrics"))[1].decode()
            assert f"{TO_VM2} 100000.0" in text
            assert 'migrelay_channels_total{target="vm2"} 1.0' in text
            assert "migrelay_channels_open 0.0" in text
            assert "migrelay_handshake_seconds_count 1.0" in text

    run_async(main())


def test_metrics_token_guards_metrics_but_not_healthz_with_one_line_per_refusal(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(
            sock_dir, logs, metrics_tokens=parse_token_lines(["scraper"])
        ) as served:
            assert (await http_get(served.port, "/metrics"))[0] == 401
            # The migration token is not a metrics token: they are kept apart.
            wrong = f"Authorization: Bearer {TOKEN}\r\n"
            assert (await http_get(served.port, "/metrics", wrong))[0] == 403
            status, body = await http_get(
                served.port, "/metrics", "Authorization: Bearer scraper\r\n"
            )
            assert status == 200 and b"migrelay_refusals_total" in body
            assert await http_get(served.port, "/healthz") == (200, b"ok\n")
            refusals = [
                re.sub(r":\d+:", ":PORT:", line)
                for line in served.lines()
                if line.startswith("refused ")
            ]
            assert refusals == [
                "refused /metrics from 127.0.0.1:PORT: 401 authentication required",
                "refused /metrics from 127.0.0.1:PORT: 403 invalid token",
            ], refusals
            assert all("scraper" not in line for line in served.lines())

    run_async(main())


# -- HTTP CONNECT proxy ----------------------------------------------------------------


def test_proxy_comes_from_https_proxy_for_wss_and_no_proxy_exempts_hosts() -> None:
    env = {"https_proxy": "http://proxy.example:3128", "HTTP_PROXY": "http://p2:8080"}
    chosen = proxy_for(True, "dst.example", None, env)
    assert chosen is not None and (chosen.host, chosen.port) == ("proxy.example", 3128)
    plain = proxy_for(False, "dst.example", None, env)
    assert plain is not None and plain.host == "p2"
    assert proxy_for(True, "dst.example", None, {**env, "no_proxy": ".example"}) is None
    assert proxy_for(True, "dst.example", "direct", env) is None
    assert proxy_for(True, "dst.example", None, {}) is None
    assert bypassed("a.b.example", "other, b.example:443")
    assert not bypassed("notexample", "example")


def test_proxy_credentials_become_basic_auth_and_stay_out_of_repr() -> None:
    proxy = ProxyURL.parse("http://user:pa%40ss@proxy:3128")
    assert proxy.authorization == "Basic dXNlcjpwYUBzcw=="
    assert "pa" not in repr(proxy).replace("proxy", "")
    with pytest.raises(ValueError, match="only http://"):
        ProxyURL.parse("socks5://proxy:1080")


class _FakeProxy(asyncio.Protocol):
    """A CONNECT proxy in a few lines: answers ``status`` and then splices the bytes."""

    def __init__(self, status: int, seen: list[bytes]) -> None:
        self.status = status
        self.seen = seen
        self.head = b""
        self.peer: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self.splice: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.peer is not None:
            self.peer.write(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        self.seen.append(self.head)
        if self.status != 200:
            self.transport.write(f"HTTP/1.1 {self.status} Nope\r\n\r\n".encode())
            self.transport.close()
            return
        authority = self.head.split()[1].decode()
        host, port = authority.rsplit(":", 1)
        self.splice = asyncio.ensure_future(self._splice(host, int(port)))

    async def _splice(self, host: str, port: int) -> None:
        assert self.transport is not None
        client = self.transport

        class _Back(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                client.write(data)

            def connection_lost(self, exc: Exception | None) -> None:
                client.close()

        loop = asyncio.get_running_loop()
        peer, _ = await loop.create_connection(_Back, host, port)
        self.peer = peer
        client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


def _proxy_factory(status: int, seen: list[bytes]) -> Callable[[], _FakeProxy]:
    return lambda: _FakeProxy(status, seen)


def test_upgrade_goes_through_a_connect_proxy_and_a_refusal_is_one_line(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[bytes] = []
        async with serving(sock_dir, logs) as served:
            for status in (200, 407):
                proxy_server = await loop.create_server(
                    _proxy_factory(status, seen), "127.0.0.1", 0
                )
                proxy = ProxyURL("127.0.0.1", proxy_server.sockets[0].getsockname()[1])
                config = ClientConfig(url=served.url(), token=TOKEN, proxy=proxy)
                try:
                    if status == 200:
                        transport, _ = await open_websocket(config)
                        await wait_until(lambda: bool(served.server.channels), "the channel")
                        transport.abort()
                    else:
                        with pytest.raises(ConnectError) as caught:
                            await open_websocket(config)
                        message = str(caught.value)
                        assert "refused CONNECT" in message and "407" in message
                        assert "\n" not in message
                finally:
                    proxy_server.close()
                    await proxy_server.wait_closed()
            assert seen[0].startswith(f"CONNECT 127.0.0.1:{served.port} HTTP/1.1\r\n".encode())
            assert b"Bearer" not in seen[0]  # the token goes inside the tunnel only
            await wait_until(lambda: not served.server.channels, "the channel to close")

    run_async(main())


# -- the config file -----------------------------------------------------------------------


def test_config_file_table_maps_dashed_keys_and_refuses_unknown_ones(tmp_path: Path) -> None:
    path = tmp_path / "migrelay.toml"
    path.write_text('[serve]\nmax-sessions = 3\npath_prefix = "/m"\n[connect]\nca = "x"\n')
    assert load_section(path, "serve", {"max_sessions", "path_prefix"}) == {
        "max_sessions": 3,
        "path_prefix": "/m",
    }
    path.write_text("[serve]\nlisten-on = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'listen-on' in \\[serve\\]"):
        load_section(path, "serve", {"listen"})
    path.write_text("[serve\n")
    with pytest.raises(ConfigError, match="not valid toml"):
        load_section(path, "serve", {"listen"})


CONFIG_OPT = Annotated[
    Path | None, typer.Option("--config", is_eager=True, callback=config_callback)
]
LISTEN_OPT = Annotated[str, typer.Option(envvar="MIGRELAY_LISTEN")]
TARGET_OPT = Annotated[str, typer.Option(envvar="MIGRELAY_TARGET")]
TOKEN_FILE_OPT = Annotated[str, typer.Option(envvar="MIGRELAY_TOKEN_FILE")]


def test_command_line_beats_environment_beats_config_file(tmp_path: Path) -> None:
    app = typer.Typer()
    seen: dict[str, object] = {}

    @app.command()
    def serve(
        config_file: CONFIG_OPT = None,
        listen: LISTEN_OPT = "default",
        target: TARGET_OPT = "default",
        token_file: TOKEN_FILE_OPT = "default",
    ) -> None:
        seen.update(listen=listen, target=target, token_file=token_file)

    @app.command()
    def other() -> None:  # a second command, so that `serve` is a subcommand
        raise AssertionError("not called")

    path = tmp_path / "c.toml"
    path.write_text('[serve]\nlisten = "file"\ntarget = "file"\ntoken-file = "file"\n')
    result = CliRunner().invoke(
        app,
        ["serve", "--config", str(path), "--listen", "flag"],
        env={"MIGRELAY_TARGET": "env"},
    )
    assert result.exit_code == 0, result.output
    assert seen == {"listen": "flag", "target": "env", "token_file": "file"}
    path.write_text('[serve]\nlisten = "file"\nport = 1\n')
    result = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert result.exit_code == 2 and "unknown setting 'port'" in result.output
