"""Hostile tenants against ``serve`` (issue 11): each threat of the README's threat model
that lives in the server, with the client that exploits it, over real sockets.

Browsers without tokens, DNS rebinding, floods of idle and half-open TLS connections,
predictable session ids, sessions claimed across tokens, quotas, sockets bound by the
wrong user or swapped for symlinks, log floods. The data-plane floods (pings, tiny
frames) are in ``test_hostile_frames.py``; the client side in ``test_client_policy.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
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
from tests.pki import PKI, make_pki
from tests.processes import MigrelayProcesses

from migrelay.aio import local
from migrelay.aio.access import parse_token_lines
from migrelay.aio.server import REFUSAL_LOG_BURST, REFUSAL_LOG_RATE
from migrelay.aio.service import ServeSettings, load_server_config
from migrelay.errors import ConfigError
from migrelay.lab.hostile import closed_by_peer, open_idle_connection
from migrelay.limits import Limits

#: Tokens with names, for the quota and session-binding tests.
ALICE, BOB = "alice-secret-token", "bob-secret-token"
#: Clients of another "host": loopback has all of 127/8.
OTHER_ADDRESS = "127.0.0.2"
#: Idle connections of the flood: within the listen backlog (128), so that none waits
#: for a SYN retransmission, and far above the per-address cap of the test.
FLOOD = 120
#: RLIMIT_NOFILE of the serve process in the descriptor test: far below the flood.
DESCRIPTOR_LIMIT = 200


def _key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


async def raw_upgrade(
    port: int,
    path: str = "/vm1",
    headers: list[tuple[str, str]] | None = None,
    host: str | None = None,
) -> tuple[int, bytes]:
    """Send one upgrade request by hand; return the status and the body (or b"")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host if host is not None else f'127.0.0.1:{port}'}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {_key()}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: migrelay.v1",
        *(f"{name}: {value}" for name, value in headers or []),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PROMPT_S)
        status = int(head.split()[1])
        body = b"" if status == 101 else await asyncio.wait_for(reader.read(), PROMPT_S)
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def metric(served: Served, reason: str) -> float:
    text = served.server.metrics.exposition().decode()
    found = re.findall(rf'migrelay_refusals_total{{reason="{reason}",status="\d+"}} (\S+)', text)
    return sum(float(value) for value in found)


# -- browsers and DNS rebinding (no tokens) -----------------------------------------------


def test_without_tokens_a_browser_origin_is_refused_unless_allowed(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # Any web page open on the host could otherwise stream bytes into destination QEMU:
    # `new WebSocket("ws://127.0.0.1:8765/vm1", "migrelay.v1")` sends this request.
    async def main() -> None:
        async with serving(sock_dir, logs, tokens=[]) as served:
            evil = [("Origin", "http://evil.example")]
            assert (await raw_upgrade(served.port, headers=evil))[0] == 403
            assert (await raw_upgrade(served.port))[0] == 101  # the relay: no Origin
        allowed = frozenset({"https://console.example"})
        async with serving(sock_dir, logs, tokens=[], allowed_origins=allowed) as served:
            console = [("Origin", "https://console.example")]
            assert (await raw_upgrade(served.port, headers=console))[0] == 101
            assert (await raw_upgrade(served.port, headers=[("Origin", "null")]))[0] == 403

    run_async(main())


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example:{port}", 403),  # DNS rebinding: the page's name, our address
        ("evil.example", 403),
        ("127.0.0.1:{port}", 101),
        ("localhost:{port}", 101),
        ("127.0.0.1:1", 403),  # another port: another service's origin
        ("allowed.example:{port}", 101),  # --allow-host
        ("", 403),
    ],
)
def test_without_tokens_host_must_name_the_listener(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture, host: str, status: int
) -> None:
    async def main() -> None:
        async with serving(
            sock_dir,
            logs,
            tokens=[],
            allowed_hosts=frozenset({"allowed.example"}),
        ) as served:
            got, _ = await raw_upgrade(served.port, host=host.format(port=served.port))
            assert got == status

    run_async(main())


def test_with_tokens_host_is_not_checked(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # A browser cannot send the bearer token; behind a proxy Host is the public name.
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            auth = [("Authorization", f"Bearer {TOKEN}")]
            got, _ = await raw_upgrade(served.port, headers=auth, host="relay.example:443")
            assert got == 101

    run_async(main())


# -- session ids and quotas -----------------------------------------------------------------


def named_tokens(**config: Any) -> dict[str, Any]:
    entries = parse_token_lines([f"{ALICE} name=alice", f"{BOB} name=bob"])
    return {"tokens": entries, **config}


def test_anonymous_session_ids_are_unpredictable_and_cannot_be_claimed(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # The ids used to be anon-1, anon-2…: a client sending Migrelay-Session: anon-N
    # ahead of a victim's plain client made the victim's channel 0 "repeated" (409).
    async def main() -> None:
        config = {"tokens": [], "max_sessions_per_target": 20}
        async with serving(sock_dir, logs, **config) as served:
            squatters = []
            for number in range(1, 6):
                headers = [("Migrelay-Session", f"anon-{number}"), ("Migrelay-Channel", "0")]
                squatters.append(await upgrade(served, token=None, headers=headers))
            victims = [await upgrade(served, token=None) for _ in range(3)]
            opened = [line for line in served.lines() if " opened: " in line]
            ids = re.findall(r"channel (anon-[0-9a-f]{16})/0 opened", "\n".join(opened))
            assert len(set(ids)) == 3, opened
            for transport in squatters + victims:
                transport.abort()

    run_async(main())


def test_a_session_id_belongs_to_the_token_that_opened_it(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # Bob knows (or guesses) Alice's session id and sends its channel 1: it must not
    # become part of Alice's migration, and his refusal must not mention her session.
    async def main() -> None:
        async with serving(sock_dir, logs, **named_tokens()) as served:
            alice = [("Migrelay-Session", "migration-7"), ("Migrelay-Channel", "0")]
            first = await upgrade(served, token=ALICE, headers=alice)
            bob = [("Migrelay-Session", "migration-7"), ("Migrelay-Channel", "1")]
            error = await refused(served, token=BOB, headers=bob)
            # His own session migration-7 has no channel 0: 409 after --wait-target.
            assert error.status == 409 and "alice" not in error.reason, error
            (key,) = served.server.sessions
            assert key == ("alice", "migration-7")
            assert served.server.sessions[key].claimed == {"0"}
            assert any("token alice" in line for line in served.lines())
            metrics = served.server.metrics.exposition().decode()
            assert 'migrelay_sessions_total{token="alice"} 1.0' in metrics
            assert 'migrelay_sessions_total{token="bob"} 1.0' in metrics
            assert ALICE not in metrics and BOB not in metrics
            first.abort()

    run_async(main())


def test_one_token_cannot_take_every_session(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        config = named_tokens(max_sessions_per_token=3, max_sessions_per_target=10)
        async with serving(sock_dir, logs, **config) as served:
            held = [await upgrade(served, token=ALICE) for _ in range(3)]
            error = await refused(served, token=ALICE)
            assert error.status == 429 and "token" in error.reason, error
            other = await upgrade(served, token=BOB)
            assert metric(served, "token_quota") == 1
            for transport in [*held, other]:
                transport.abort()

    run_async(main())


def test_one_target_cannot_take_every_session(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        config = named_tokens(max_sessions_per_token=10, max_sessions_per_target=2)
        async with serving(sock_dir, logs, **config) as served:
            held = [await upgrade(served, path="/vm1", token=ALICE) for _ in range(2)]
            error = await refused(served, path="/vm1", token=BOB)
            assert error.status == 429 and "/vm1" in error.reason, error
            other = await upgrade(served, path="/vm2", token=BOB)
            for transport in [*held, other]:
                transport.abort()

    run_async(main())


# -- connections in handshake ---------------------------------------------------------------


async def idle_connections(port: int, count: int, address: str) -> list[socket.socket]:
    """``count`` connections from ``address`` that never send a byte."""
    sockets = [open_idle_connection("127.0.0.1", port, address) for _ in range(count)]
    await asyncio.sleep(0)
    return sockets


def test_a_flood_of_idle_connections_from_one_address_leaves_room_for_others(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        config = {"max_handshakes": 100, "max_handshakes_per_address": 8}
        async with serving(sock_dir, logs, **config) as served:
            began = asyncio.get_running_loop().time()
            flood = await idle_connections(served.port, FLOOD, OTHER_ADDRESS)
            await wait_until(
                lambda: (
                    served.server.admission.by_address.get(OTHER_ADDRESS) == 8
                    and sum(closed_by_peer(sock) for sock in flood) == FLOOD - 8
                ),
                "all but 8 of the flood to be closed",
            )
            # Another client is served at once, not after the flood's 10 s timeout.
            transport = await upgrade(served)
            transport.abort()
            assert metric(served, "handshake_limit") == FLOOD - 8
            lines = [line for line in served.lines() if "dropped connection" in line]
            # Rate-limited: a burst, then REFUSAL_LOG_RATE lines a second.
            elapsed = asyncio.get_running_loop().time() - began
            bound = REFUSAL_LOG_BURST + REFUSAL_LOG_RATE * elapsed + 1
            assert 0 < len(lines) <= bound, (len(lines), elapsed)
            for sock in flood:
                sock.close()
            await wait_until(lambda: not served.server.admission.total, "admission to empty")

    run_async(main())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("tls") / "pki")


def test_the_tls_handshake_is_inside_the_handshake_timeout(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture, pki: PKI
) -> None:
    # A TCP connection that never sends its ClientHello was kept for asyncio's default
    # 60 s TLS handshake timeout, uncounted; now it is counted and gets --handshake-timeout.
    async def main() -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.cert, pki.key)
        limits = Limits(handshake_timeout=0.5)
        async with serving(sock_dir, logs, ssl_context=context, limits=limits) as served:
            (silent,) = await idle_connections(served.port, 1, "127.0.0.1")
            await wait_until(lambda: served.server.admission.total == 1, "it to be counted")
            await helpers.wait_until(
                lambda: closed_by_peer(silent), 3 * helpers.FACTOR, "the server to close it"
            )
            silent.close()
            await wait_until(lambda: served.server.admission.total == 0, "it to be released")
            assert metric(served, "tls_handshake") == 1

    run_async(main())


# -- destination sockets --------------------------------------------------------------------


def test_a_destination_socket_bound_by_another_user_gets_no_byte(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # Another local user bound the VM's socket before QEMU did (a shared directory):
    # the relay used to connect and hand it the guest's RAM.
    sock_dir.chmod(0o1777)
    with helpers.listening_as(helpers.NOBODY_UID, sock_dir / "tenant.sock"):

        async def main() -> None:
            async with serving(sock_dir, logs, wait_target=0.5) as served:
                error = await refused(served, path="/tenant")
                assert error.status == 503 and error.reason == "destination socket not trusted"
                assert any("uid 65534" in line for line in served.lines()), served.lines()
                assert metric(served, "untrusted_socket") == 1

        run_async(main())


def test_a_symlink_in_the_target_dir_is_not_followed(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            (sock_dir / "escape.sock").symlink_to(sock_dir / "vm1.sock")
            error = await refused(served, path="/escape")
            assert error.status == 503, error
            assert served.sink.transports == []

    run_async(main())


def test_a_shared_target_dir_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "vms"
    shared.mkdir()
    shared.chmod(0o2770)
    with pytest.raises(ConfigError, match=r"without the sticky bit .* chmod \+t"):
        load_server_config(ServeSettings(target_dir=shared))
    shared.chmod(0o3770)
    config, _ = load_server_config(ServeSettings(target_dir=shared))
    assert config.target_dir == shared.resolve()


def test_socket_owner_accepts_a_named_user(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    sock_dir.chmod(0o1777)
    with helpers.listening_as(helpers.NOBODY_UID, sock_dir / "tenant.sock"):

        async def main() -> None:
            owners = local.SocketOwners.parse(["nobody"])
            async with serving(sock_dir, logs, socket_owners=owners) as served:
                transport = await upgrade(served, path="/tenant")
                transport.abort()

        run_async(main())


# -- logs -----------------------------------------------------------------------------------


def test_refusal_logs_are_clipped_and_rate_limited(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs) as served:
            logs.clear()
            long_path = "/%1b[31m" + "A" * 4000
            for _ in range(300):
                status, _ = await raw_upgrade(served.port, path=long_path)
                assert status == 401
            lines = [line for line in served.lines() if line.startswith("refused")]
            assert len(lines) < 300 and all(len(line) < 300 for line in lines), len(lines)
            assert all("A" * 100 not in line for line in lines)
            assert metric(served, "unauthorized") == 300

    run_async(main())


def test_tokens_are_named_in_logs_never_shown(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{VM1_TOKEN} vm1 name=ops   # the operators\n{TOKEN}\n")
    config, _ = load_server_config(ServeSettings(token_file=tokens))
    names = {entry.name for entry in config.tokens}
    assert "ops" in names and len(names) == 2
    assert all(TOKEN not in name and VM1_TOKEN not in name for name in names)


def test_idle_sockets_beyond_the_descriptor_limit_cannot_starve_a_migration(
    run_async: Run, sock_dir: Path, migrelay_procs: MigrelayProcesses
) -> None:
    # serve under a descriptor limit of 200, 1,000 idle sockets from one address:
    # accept() used to fail with EMFILE, and so did the unix connect of a real channel.
    # Now the handshake caps are sized to leave every session's channels their
    # descriptors, and a connection over a cap is closed at once.
    target = sock_dir / "dest.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(target))
    listener.listen(16)
    serve = migrelay_procs.serve(
        *("--target", str(target), "--max-sessions", "4", "--max-channels", "4"),
        prefix=("prlimit", f"--nofile={DESCRIPTOR_LIMIT}:{DESCRIPTOR_LIMIT}", "--"),
    )
    assert serve.port is not None
    port = serve.port

    async def main() -> None:
        flood: list[socket.socket] = []
        try:
            # In batches within the listen backlog (128): beyond it the kernel drops
            # handshakes and retries them for up to a minute, whatever serve does.
            for _ in range(1000 // FLOOD):
                flood.extend(await idle_connections(port, FLOOD, OTHER_ADDRESS))
                await helpers.wait_until(
                    lambda: sum(closed_by_peer(sock) for sock in flood) >= len(flood) - 32,
                    10 * helpers.FACTOR,
                    "serve to shed the flood",
                )
            status, _ = await raw_upgrade(port, path="/")
            assert status == 101
        finally:
            for sock in flood:
                sock.close()

    try:
        run_async(main())
    finally:
        listener.close()
    log = serve.log()
    assert "Too many open files" not in log and "EMFILE" not in log, log[-2000:]
    assert "dropped connection from 127.0.0.2" in log
