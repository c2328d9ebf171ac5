"""TLS contexts for ``wss://``: the server's (reloadable), the client's (CA or pin).

Certificate pinning: with ``--fingerprint`` the client skips chain and name checks and
instead requires the SHA-256 of the server's certificate (DER) to match, the way
``openssl x509 -fingerprint -sha256`` prints it. That suits self-signed relay
certificates between hypervisor hosts, where no CA is at hand.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from pathlib import Path

from migrelay.errors import ConnectError


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """Return a server context; with ``client_ca``, clients must present a certificate.

    Raises:
        OSError, ssl.SSLError: a file cannot be read, or the key does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No compression, no renegotiation: neither has a place in a bulk tunnel.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


class ReloadableServerContext:
    """The server's TLS settings, replaced whole on SIGHUP while the server listens.

    The relay wraps each accepted connection with :attr:`current` (see
    `migrelay.aio.listener`), so a reload takes effect at the next handshake.
    Loading into the live context instead would be neither atomic (a bad key file
    would leave a certificate without its key) nor complete: a CA removed from the
    client-CA file would stay trusted, and so would every TLS session the old context
    issued (its session cache and ticket keys go with it only when it is replaced
    whole). Open connections keep the context they began with.

    Raises:
        OSError, ssl.SSLError: from `server_context`, for the first load.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.current = server_context(cert, key, client_ca)

    def reload(self) -> ssl.SSLContext:
        """Read the files again and return the new context; on error nothing changes.

        Raises:
            OSError, ssl.SSLError: a file cannot be read, or the key does not match.
        """
        self.current = server_context(self.cert, self.key, self.client_ca)
        return self.current


def normalize_fingerprint(text: str) -> bytes:
    """Parse ``AB:CD:…`` or plain hex (optionally prefixed ``sha256:``) into 32 bytes.

    Raises:
        ValueError: not a SHA-256 fingerprint.
    """
    value = text.strip()
    if value.lower().startswith("sha256:"):
        value = value[7:]
    value = value.replace(":", "").replace(" ", "")
    try:
        digest = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"not a hexadecimal SHA-256 fingerprint: {text}") from None
    if len(digest) != 32:
        raise ValueError(f"a SHA-256 fingerprint has 32 bytes, this one {len(digest)}")
    return digest


def client_context(
    ca: Path | None = None,
    fingerprint: bytes | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> ssl.SSLContext:
    """Return a client context: system trust, a CA file, or a pinned fingerprint.

    ``cert``/``key`` present a client certificate (for servers with ``--client-ca``).
    """
    if fingerprint is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # The pin replaces chain and name checks; check_peer_fingerprint() enforces it.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def check_peer_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: bytes) -> None:
    """Raise ConnectError unless the peer's certificate has the pinned SHA-256."""
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        raise ConnectError("server sent no certificate to check against the pinned fingerprint")
    actual = hashlib.sha256(der).digest()
    if not hmac.compare_digest(actual, expected):
        raise ConnectError(
            "server certificate does not match the pinned fingerprint",
            ValueError(f"its SHA-256 is {actual.hex(':').upper()}"),
        )
