"""TLS contexts for ``wss://``: the server's (reloadable), the client's (CA or pin).

Certificate pinning: with ``--fingerprint`` the client skips chain and name checks and
instead requires the SHA-256 of the server's certificate (DER) to match. That suits
self-signed relay certificates between hypervisor hosts, where no CA is at hand. The
fingerprint is given as ``openssl x509 -noout -fingerprint -sha256 -in cert.pem`` prints
it, whole or from its first hex digit on (`normalize_fingerprint`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from pathlib import Path
from typing import Final

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


#: What ``openssl x509 -noout -fingerprint`` prints before the digest. The name is the
#: digest option as typed: ``sha256 Fingerprint=`` for ``-sha256`` (OpenSSL 3),
#: ``SHA256 Fingerprint=`` for ``-SHA256`` (or by 1.1 for ``-sha256``); without a digest
#: option, ``SHA1 Fingerprint=`` (seen: OpenSSL 3.0.19).
_OPENSSL_LABEL_RE: Final = re.compile(r"([A-Za-z0-9-]+) Fingerprint=")
#: The names of SHA-256 in that label, lower-cased (``-sha2-256`` is OpenSSL 3's alias).
_SHA256_NAMES: Final = frozenset({"sha256", "sha2-256"})
#: ``AB:CD:…`` (openssl's form, either case) or the same digits without colons.
_HEX_RE: Final = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*|[0-9A-Fa-f]+")


def normalize_fingerprint(text: str) -> bytes:
    """Parse a SHA-256 certificate fingerprint into its 32 bytes.

    Accepted: exactly what ``openssl x509 -noout -fingerprint -sha256`` prints
    (``sha256 Fingerprint=AB:CD:…``, or ``SHA256 Fingerprint=`` from OpenSSL 1.1), the hex
    digits alone with or without the colons, and ``sha256:`` followed by them. Spaces
    and a newline around the whole are ignored.

    Raises:
        ValueError: not a SHA-256 fingerprint; the message says what is wrong with it.
    """
    value = text.strip()
    label = _OPENSSL_LABEL_RE.match(value)
    if label is not None:
        algorithm = label.group(1)
        if algorithm.lower() not in _SHA256_NAMES:
            raise ValueError(
                f"a {algorithm} fingerprint, not a SHA-256 one: print it with"
                " openssl x509 -noout -fingerprint -sha256"
            )
        value = value[label.end() :]
    elif value[:7].lower() == "sha256:":
        value = value[7:]
    if not _HEX_RE.fullmatch(value):
        raise ValueError(f"not a hexadecimal SHA-256 fingerprint: {text.strip()!r}")
    digits = value.replace(":", "")
    if len(digits) != 64:
        raise ValueError(f"a SHA-256 fingerprint has 64 hex digits, this one {len(digits)}")
    return bytes.fromhex(digits)


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
