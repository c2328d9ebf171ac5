"""``serve``'s TLS settings replaced on SIGHUP (`tls.ReloadableServerContext`), both loops.

A reload swaps certificate, key and client CAs together or not at all: new handshakes
see the new files, a reload that cannot read them changes nothing, and a CA removed
from the client-CA file is no longer trusted, not even through a TLS session resumed
from before the reload. Real TLS handshakes over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests import helpers
from tests.loops import AsyncRunner
from tests.pki import CLIENT_USAGE, PKI, SERVER_NAMES, issue, make_pki

from migrelay.aio.server import RelayServer, ServerConfig
from migrelay.aio.tls import ReloadableServerContext

PROMPT_S = 5.0 * helpers.FACTOR


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("tls") / "pki")


@contextlib.asynccontextmanager
async def listening(credentials: ReloadableServerContext) -> AsyncIterator[int]:
    """A server whose TLS context follows ``credentials``: `reload` is SIGHUP's path."""
    server = RelayServer(ServerConfig(port=0, ssl_context=credentials.current))
    await server.start()
    _servers[credentials] = server
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        del _servers[credentials]
        await asyncio.wait_for(server.close(), PROMPT_S)


_servers: dict[ReloadableServerContext, RelayServer] = {}


def reload(credentials: ReloadableServerContext) -> None:
    """What `service.reload_files` does with the certificates on SIGHUP."""
    _servers[credentials].config.ssl_context = credentials.reload()


async def healthz(port: int, context: ssl.SSLContext) -> bytes:
    """GET /healthz over TLS; returns the certificate the server presented (DER)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"),
        PROMPT_S,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        presented = ssl_object.getpeercert(binary_form=True)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), PROMPT_S)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok\n"), answer
        return bytes(presented)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def refused(port: int, context: ssl.SSLContext) -> bool:
    """True when the server ends the connection without answering GET /healthz.

    With TLS 1.3 the client's side of the handshake completes before the server has
    judged the client certificate; the refusal arrives as an alert or an end of stream.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"),
            PROMPT_S,
        )
    except (ssl.SSLError, ConnectionError):
        return True
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), PROMPT_S)
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return answer == b""


def client(pki: PKI, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def live_files(pki: PKI, directory: Path) -> tuple[Path, Path, tuple[Path, Path]]:
    """The files serve reads (copies of the PKI's server pair), and a renewed pair."""
    live_cert, live_key = directory / "live.pem", directory / "live.key"
    shutil.copy(pki.cert, live_cert)
    shutil.copy(pki.key, live_key)
    return live_cert, live_key, issue(directory, "renewed", (pki.ca, pki.ca_key), SERVER_NAMES)


def test_reload_presents_the_new_certificate_to_new_connections(
    run_async: AsyncRunner, pki: PKI, tmp_path: Path
) -> None:
    live_cert, live_key, renewed = live_files(pki, tmp_path)
    credentials = ReloadableServerContext(live_cert, live_key)

    async def main() -> None:
        async with listening(credentials) as port:
            assert await healthz(port, client(pki)) == der(pki.cert)
            shutil.copy(renewed[0], live_cert)
            shutil.copy(renewed[1], live_key)
            reload(credentials)
            assert await healthz(port, client(pki)) == der(renewed[0])

    run_async(main())


def test_reload_with_a_key_that_does_not_match_changes_nothing(
    run_async: AsyncRunner, pki: PKI, tmp_path: Path
) -> None:
    # A certificate renewed on disk before its key: the moment a careless deploy
    # script, or a SIGHUP sent too early, would catch.
    live_cert, live_key, renewed = live_files(pki, tmp_path)
    credentials = ReloadableServerContext(live_cert, live_key)

    async def main() -> None:
        async with listening(credentials) as port:
            shutil.copy(renewed[0], live_cert)
            with pytest.raises(ssl.SSLError):
                reload(credentials)
            assert await healthz(port, client(pki)) == der(pki.cert)
            live_key.unlink()
            with pytest.raises(FileNotFoundError):
                reload(credentials)
            assert await healthz(port, client(pki)) == der(pki.cert)

    run_async(main())


def test_a_client_ca_removed_from_the_file_is_no_longer_trusted_after_reload(
    run_async: AsyncRunner, pki: PKI, tmp_path: Path
) -> None:
    client_cas = tmp_path / "client-cas.pem"
    client_cas.write_text(pki.ca.read_text() + pki.other_ca.read_text())
    from_other_ca = issue(tmp_path, "other-client", (pki.other_ca, pki.other_ca_key), CLIENT_USAGE)
    credentials = ReloadableServerContext(pki.cert, pki.key, client_cas)
    ours = client(pki, (pki.client_cert, pki.client_key))
    theirs = client(pki, from_other_ca)

    async def main() -> None:
        async with listening(credentials) as port:
            await healthz(port, ours)
            await healthz(port, theirs)
            client_cas.write_text(pki.ca.read_text())  # the other CA is revoked
            reload(credentials)
            await healthz(port, ours)
            assert await refused(port, theirs)
            await healthz(port, ours)

    run_async(main())


def get_healthz_blocking(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """GET /healthz with a plain blocking socket, which can offer a saved TLS session.

    Returns:
        The answer (b"" when refused), the session to resume later, and whether this
        connection resumed ``session``.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=PROMPT_S) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while chunk := tls.recv(4096):
                    answer += chunk
                return answer, tls.session, bool(tls.session_reused)
        except (ssl.SSLError, ConnectionError):
            return b"", None, False


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_revoked_client_cannot_resume_a_tls_session_from_before_the_reload(
    run_async: AsyncRunner, pki: PKI, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    # A resumed session skips certificate verification: the server only checks that
    # it issued the session. With the listening context kept across reloads (its
    # session cache and ticket keys), a client whose CA was removed came back in.
    client_cas = tmp_path / "client-cas.pem"
    client_cas.write_text(pki.ca.read_text() + pki.other_ca.read_text())
    from_other_ca = issue(tmp_path, "other-client", (pki.other_ca, pki.other_ca_key), CLIENT_USAGE)
    credentials = ReloadableServerContext(pki.cert, pki.key, client_cas)
    theirs = client(pki, from_other_ca)
    theirs.maximum_version = version

    async def main() -> None:
        async with listening(credentials) as port:
            answer, session, _ = await asyncio.to_thread(get_healthz_blocking, port, theirs)
            assert answer.endswith(b"ok\n") and session is not None
            # Resumption works at all: otherwise this test would prove nothing.
            answer, _, resumed = await asyncio.to_thread(
                get_healthz_blocking, port, theirs, session
            )
            assert answer.endswith(b"ok\n") and resumed
            client_cas.write_text(pki.ca.read_text())  # the other CA is revoked
            reload(credentials)
            answer, _, resumed = await asyncio.to_thread(
                get_healthz_blocking, port, theirs, session
            )
            assert answer == b"" and not resumed

    run_async(main())
