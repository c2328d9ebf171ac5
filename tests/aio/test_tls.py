"""`migrelay.aio.tls`: ``--fingerprint`` in the forms openssl prints, and the pin it makes.

The fingerprints are the literal output of the real ``openssl x509 -fingerprint`` over a
certificate made by the real ``openssl req`` (installed by tools/setup), not strings
written to look like it.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import subprocess
from pathlib import Path

import pytest

from migrelay.aio.tls import (
    check_peer_fingerprint,
    client_context,
    normalize_fingerprint,
    server_context,
)
from migrelay.errors import ConnectError


def openssl(*args: str, cwd: Path) -> str:
    """Run openssl; its standard output, as printed (newline included)."""
    return subprocess.run(
        ["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def make_cert(directory: Path, name: str = "dst1") -> tuple[Path, Path]:
    """A self-signed P-256 certificate, made as the README makes one: (cert, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "2", "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
            "-addext", f"subjectAltName=DNS:{name}.example", cwd=directory)  # fmt: skip
    return cert, key


def printed_fingerprint(cert: Path, *digest: str) -> str:
    """What ``openssl x509 -noout -fingerprint [DIGEST] -in CERT`` prints, unchanged."""
    return openssl("x509", "-noout", "-fingerprint", *digest, "-in", cert.name, cwd=cert.parent)


def der_sha256(cert: Path) -> bytes:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).digest()


@pytest.fixture
def cert(tmp_path: Path) -> Path:
    return make_cert(tmp_path)[0]


# -- what openssl prints is accepted as printed ---------------------------------------------


@pytest.mark.parametrize("option", ["-sha256", "-SHA256", "-sha2-256"])
def test_openssl_output_is_accepted_as_printed(cert: Path, option: str) -> None:
    printed = printed_fingerprint(cert, option)
    # The form this test stands for: "<digest as typed> Fingerprint=AA:BB:...\n".
    assert re.fullmatch(r"\S+ Fingerprint=([0-9A-F]{2}:){31}[0-9A-F]{2}\n", printed)
    assert normalize_fingerprint(printed) == der_sha256(cert)
    assert normalize_fingerprint(printed.strip()) == der_sha256(cert)


def test_openssl_3_prints_lower_case_sha256(cert: Path) -> None:
    # The README's command; the issue quoted this form and it used to be refused.
    assert printed_fingerprint(cert, "-sha256").startswith("sha256 Fingerprint=")


def test_every_shorter_form_of_the_same_output_is_accepted(cert: Path) -> None:
    printed = printed_fingerprint(cert, "-sha256").strip()
    colons = printed.split("=", 1)[1]
    bare = colons.replace(":", "")
    forms = [colons, colons.lower(), bare, bare.lower(), f"sha256:{colons}", f"SHA256:{bare}"]
    forms += [f"  {colons}\n", printed.replace("sha256 ", "SHA256 ")]
    for form in forms:
        assert normalize_fingerprint(form) == der_sha256(cert), form


@pytest.mark.parametrize(
    ("digest", "name"),
    [((), "SHA1"), (("-sha1",), "sha1"), (("-sha3-256",), "sha3-256"), (("-sha512",), "sha512")],
)
def test_another_digest_is_refused_by_name(cert: Path, digest: tuple[str, ...], name: str) -> None:
    # sha3-256 has 64 hex digits too: only the label tells it from SHA-256.
    printed = printed_fingerprint(cert, *digest)
    with pytest.raises(ValueError) as caught:
        normalize_fingerprint(printed)
    assert str(caught.value) == (
        f"a {name} fingerprint, not a SHA-256 one:"
        " print it with openssl x509 -noout -fingerprint -sha256"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a hexadecimal SHA-256 fingerprint: ''"),
        ("zz", "not a hexadecimal SHA-256 fingerprint: 'zz'"),
        ("AB:CD:", "not a hexadecimal SHA-256 fingerprint"),
        (":AB:CD", "not a hexadecimal SHA-256 fingerprint"),
        ("ABC:D" + ":AB" * 30, "not a hexadecimal SHA-256 fingerprint"),
        ("AB::CD" + ":AB" * 30, "not a hexadecimal SHA-256 fingerprint"),
        ("AB CD" + " AB" * 30, "not a hexadecimal SHA-256 fingerprint"),
        ("sha256 Fingerprint=", "not a hexadecimal SHA-256 fingerprint"),
        ("sha256 Fingerprint = " + "AB" * 32, "not a hexadecimal SHA-256 fingerprint"),
        ("Fingerprint=" + "AB" * 32, "not a hexadecimal SHA-256 fingerprint"),
        ("sha256:sha256:" + "AB" * 32, "not a hexadecimal SHA-256 fingerprint"),
        ("AB" * 31, "a SHA-256 fingerprint has 64 hex digits, this one 62"),
        ("A" * 63, "a SHA-256 fingerprint has 64 hex digits, this one 63"),
        ("AB" * 33, "a SHA-256 fingerprint has 64 hex digits, this one 66"),
        ("sha256 Fingerprint=" + ":".join(["AB"] * 20), "this one 40"),
    ],
)
def test_malformed_fingerprints_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        normalize_fingerprint(text)


# -- the parsed pin is the one a TLS connection checks --------------------------------------


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS handshake between the two contexts in memory; the client's end."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_end = client.wrap_bio(client_in, client_out, server_hostname="dst1.example")
    server_end = server.wrap_bio(server_in, server_out, server_side=True)
    pending = [client_end, server_end]
    for _ in range(10):
        for end in list(pending):
            try:
                end.do_handshake()
                pending.remove(end)
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if not pending:
            return client_end
    raise AssertionError("the TLS handshake did not complete")


def test_the_printed_fingerprint_pins_the_certificate_served(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    pin = normalize_fingerprint(printed_fingerprint(cert, "-sha256"))
    client = handshake(server_context(cert, key), client_context(fingerprint=pin))
    check_peer_fingerprint(client, pin)  # no error: the pin matches


def test_the_printed_fingerprint_of_another_certificate_is_refused(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    other, _ = make_cert(tmp_path, "other")
    pin = normalize_fingerprint(printed_fingerprint(other, "-sha256"))
    client = handshake(server_context(cert, key), client_context(fingerprint=pin))
    with pytest.raises(ConnectError, match="does not match the pinned fingerprint") as caught:
        check_peer_fingerprint(client, pin)
    # The error names the certificate served, in openssl's form.
    assert der_sha256(cert).hex(":").upper() in str(caught.value)
