"""``serve --client-ca``: a client without a certificate the CA vouches for is refused in
the TLS handshake, and that refusal, like every other, is one log line and counted.

Real TLS handshakes over loopback, TLS 1.2 and 1.3, on both loops. With TLS 1.3 the
client's side of the handshake ends before the server has judged its certificate: the
client learns of the refusal on its first read, the server in its handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests import helpers
from tests.integration.served import Served, serving
from tests.loops import AsyncRunner
from tests.pki import CLIENT_USAGE, PKI, issue, make_pki

from migrelay.aio.tls import ReloadableServerContext

PROMPT_S = 5.0 * helpers.FACTOR
REFUSAL_PREFIX = "TLS handshake with 127.0.0.1 failed: "


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("tls") / "pki")


@dataclass(frozen=True)
class Case:
    id: str
    version: ssl.TLSVersion
    #: "none", "other-ca" (signed by a CA serve does not trust)
    certificate: str
    line: str


CASES = [
    Case(
        "no-certificate-tls1.3",
        ssl.TLSVersion.TLSv1_3,
        "none",
        "no client certificate (--client-ca requires one)",
    ),
    Case(
        "no-certificate-tls1.2",
        ssl.TLSVersion.TLSv1_2,
        "none",
        "no client certificate (--client-ca requires one)",
    ),
    Case(
        "other-ca-tls1.3",
        ssl.TLSVersion.TLSv1_3,
        "other-ca",
        "client certificate not accepted: unable to get local issuer certificate",
    ),
    Case(
        "other-ca-tls1.2",
        ssl.TLSVersion.TLSv1_2,
        "other-ca",
        "client certificate not accepted: unable to get local issuer certificate",
    ),
]


def tls_client(
    pki: PKI, version: ssl.TLSVersion, cert: tuple[Path, Path] | None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.minimum_version = context.maximum_version = version
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


async def get(port: int, context: ssl.SSLContext, path: str) -> bytes:
    """GET ``path`` over TLS; b"" when the server ends the connection instead."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"),
            PROMPT_S,
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), PROMPT_S)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def refusal_lines(served: Served) -> list[str]:
    return [line for line in served.lines() if line.startswith("TLS handshake with")]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_client_without_a_trusted_certificate_is_refused_in_one_log_line(
    case: Case,
    run_async: AsyncRunner,
    pki: PKI,
    sock_dir: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    credentials = ReloadableServerContext(pki.cert, pki.key, pki.ca)
    trusted = tls_client(pki, case.version, (pki.client_cert, pki.client_key))
    cert = None
    if case.certificate == "other-ca":
        cert = issue(sock_dir, "stranger", (pki.other_ca, pki.other_ca_key), CLIENT_USAGE)
    stranger = tls_client(pki, case.version, cert)

    async def main() -> None:
        async with serving(sock_dir, logs, ssl_context=credentials.current) as served:
            # The migrelay WebSocket upgrade itself: never answered.
            assert await get(served.port, stranger, "/vm1") == b""
            await helpers.wait_until(
                lambda: bool(refusal_lines(served)), PROMPT_S, "the refusal's log line"
            )
            # The server keeps serving a client the CA vouches for, and counted one refusal.
            metrics = await get(served.port, trusted, "/metrics")
            assert metrics.startswith(b"HTTP/1.1 200 "), metrics
            counted = 'migrelay_refusals_total{reason="tls_handshake",status="400"} 1.0'
            assert counted in metrics.decode(), metrics
            assert refusal_lines(served) == [REFUSAL_PREFIX + case.line]
            assert not [line for line in served.lines() if " opened: " in line]

    run_async(main())
