"""Certificates for the TLS tests, made with the openssl command (installed by tools/setup).

Short-lived P-256 certificates in a test's own directory: a CA, a server certificate for
127.0.0.1 and localhost, a client certificate, and a second CA that signed none of them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

#: subjectAltName of a server certificate that the tests reach as localhost or 127.0.0.1.
SERVER_NAMES = "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
CLIENT_USAGE = "extendedKeyUsage=clientAuth\n"
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


@dataclass(frozen=True)
class PKI:
    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_ca_key: Path

    def fingerprint(self) -> str:
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(self.cert)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip().split("=", 1)[1]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", *EC_KEY, "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


def issue(directory: Path, name: str, ca: tuple[Path, Path], extension: str) -> tuple[Path, Path]:
    """A certificate signed by ``ca`` with one X.509 ``extension`` line: (cert, key)."""
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    cert, ext = directory / f"{name}.pem", directory / f"{name}.ext"
    ext.write_text(extension)
    _openssl("req", *EC_KEY, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> PKI:
    """Create ``directory`` with a CA, server and client certificates, and another CA."""
    directory.mkdir()
    ca = make_ca(directory, "ca")
    other = make_ca(directory, "other-ca")
    server = issue(directory, "server", ca, SERVER_NAMES)
    client = issue(directory, "client", ca, CLIENT_USAGE)
    return PKI(ca[0], ca[1], server[0], server[1], client[0], client[1], other[0], other[1])
