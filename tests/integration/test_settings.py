"""What ``serve`` and ``connect`` make of their settings, without starting anything.

The policy lives with the settings (`migrelay.aio.service`, `migrelay.aio.source`), not
in the command line, so that a program embedding the relay gets the same checks: each
row is one setting and the one-line error it must give (or the value it must yield).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from tests.pki import PKI, make_pki

from migrelay.aio.service import DEFAULT_DEST_SOCKET, ServeSettings, load_server_config
from migrelay.aio.source import ClientSettings
from migrelay.errors import ConfigError
from migrelay.limits import MIN_MAX_MESSAGE_BYTES, Limits


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nsecret-one\nsecret-two vm1,vm2\n")
    empty = tmp_path / "empty"
    empty.write_text("# nothing but a comment\n")
    bad = tmp_path / "bad"
    bad.write_text("a b c\n")
    return {"tokens": tokens, "empty": empty, "bad": bad, "missing": tmp_path / "missing"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("settings") / "pki")


@pytest.mark.parametrize(
    ("listen", "insecure", "with_tokens", "error"),
    [
        ("127.0.0.1:0", False, False, None),
        ("[::1]:0", False, False, None),
        ("localhost:0", False, False, None),
        ("0.0.0.0:0", False, True, None),
        ("0.0.0.0:0", True, False, None),
        ("0.0.0.0:0", False, False, "refusing to listen on 0.0.0.0 without authentication"),
        ("192.0.2.1:0", False, False, "refusing to listen on 192.0.2.1 without authentication"),
        ("127.0.0.1:http", False, False, "invalid port in '127.0.0.1:http'"),
        ("127.0.0.1:70000", False, False, "invalid port in '127.0.0.1:70000'"),
        ("127.0.0.1:²", False, False, "invalid port in '127.0.0.1:²'"),
    ],
)
def test_serve_listens_beyond_loopback_only_with_authentication_or_insecure(
    listen: str, insecure: bool, with_tokens: bool, error: str | None, files: dict[str, Path]
) -> None:
    settings = ServeSettings(
        listen=listen, insecure=insecure, token_file=files["tokens"] if with_tokens else None
    )
    if error is None:
        config, credentials = load_server_config(settings)
        assert credentials is None
        assert config.target == DEFAULT_DEST_SOCKET  # neither --target nor --target-dir
        assert bool(config.tokens) is with_tokens
    else:
        with pytest.raises(ConfigError, match=f"^{error}"):
            load_server_config(settings)


def test_serve_reads_tokens_with_their_targets(files: dict[str, Path]) -> None:
    config, _ = load_server_config(ServeSettings(token_file=files["tokens"]))
    assert [entry.secret for entry in config.tokens] == [b"secret-one", b"secret-two"]
    assert [entry.targets for entry in config.tokens] == [None, {"vm1", "vm2"}]


@pytest.mark.parametrize(
    ("which", "error"),
    [
        ("missing", r"cannot read .*missing: No such file or directory"),
        ("empty", r".*empty holds no token"),
        ("bad", r".*bad line 1: expected 'SECRET \[TARGET,\.\.\.\] \[name=NAME\]'"),
    ],
)
@pytest.mark.parametrize("option", ["token_file", "metrics_token_file"])
def test_serve_refuses_a_token_file_it_cannot_use(
    which: str, error: str, option: str, files: dict[str, Path]
) -> None:
    changes: dict[str, Any] = {option: files[which]}
    settings = replace(ServeSettings(), **changes)
    with pytest.raises(ConfigError, match=f"^{error}$"):
        load_server_config(settings)


@pytest.mark.parametrize(
    ("pieces", "error"),
    [
        (("cert",), "--tls-cert and --tls-key go together"),
        (("key",), "--tls-cert and --tls-key go together"),
        (("ca",), "--client-ca needs --tls-cert and --tls-key"),
        (("cert", "wrong-key"), "cannot load the TLS certificate: "),
        (("cert", "key", "ca"), None),
        (("cert", "key"), None),
    ],
)
def test_serve_checks_its_tls_files_before_it_starts(
    pieces: tuple[str, ...], error: str | None, pki: PKI
) -> None:
    paths = {"cert": pki.cert, "key": pki.key, "ca": pki.ca}
    settings = ServeSettings(
        tls_cert=paths["cert"] if "cert" in pieces else None,
        tls_key=pki.client_key
        if "wrong-key" in pieces
        else paths["key"]
        if "key" in pieces
        else None,
        client_ca=paths["ca"] if "ca" in pieces else None,
    )
    if error is None:
        config, credentials = load_server_config(settings)
        assert credentials is not None and config.ssl_context is credentials.current
    else:
        with pytest.raises(ConfigError, match=f"^{error}"):
            load_server_config(settings)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("trusted_proxy", ("not-an-address",), "not-an-address"),
        ("path_prefix", "/migrelay?x=1", "a path prefix is a path"),
    ],
)
def test_serve_refuses_a_bad_access_setting_in_one_line(
    field: str, value: object, error: str
) -> None:
    changes: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=error):
        load_server_config(replace(ServeSettings(), **changes))


@pytest.mark.parametrize(
    ("max_message", "expected"),
    [
        ("1M", (1 << 20, 1 << 20)),
        ("256K", (256 << 10, 256 << 10)),
        ("4M", (4 << 20, 1 << 20)),  # reads stay 1 MiB: the bound per channel holds
        (str(MIN_MAX_MESSAGE_BYTES), (MIN_MAX_MESSAGE_BYTES, MIN_MAX_MESSAGE_BYTES)),
    ],
)
def test_max_message_sets_the_limit_and_never_sends_more_than_it_accepts(
    max_message: str, expected: tuple[int, int]
) -> None:
    limits = Limits().with_max_message(max_message, ping_interval=2.0)
    assert (limits.max_message_bytes, limits.read_bytes) == expected
    assert limits.ping_interval == 2.0


@pytest.mark.parametrize(
    ("max_message", "error"),
    [("1023", "--max-message of 1023 bytes is below the minimum of 1024"), ("big", "not a size")],
)
def test_max_message_refuses_what_cannot_work(max_message: str, error: str) -> None:
    with pytest.raises(ConfigError, match=f"^{error}"):
        Limits().with_max_message(max_message)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"url": "http://example/"}, "not a ws:// or wss:// URL: http://example/"),
        ({"header_lines": ("no colon",)}, "header must be 'Name: value', not 'no colon'"),
        ({"header_lines": (": empty name",)}, "header must be 'Name: value'"),
        ({"ca": Path("/nonexistent/ca.pem")}, "cannot load TLS files: "),
        ({"fingerprint": "zz"}, "not a hexadecimal SHA-256 fingerprint"),
        (
            {"fingerprint": "AB" * 32, "ca": Path("/x")},
            "--ca and --fingerprint exclude each other",
        ),
        ({"token_file": Path("/nonexistent/token")}, "cannot read /nonexistent/token"),
        ({"proxy": "ftp://proxy:1"}, "proxy"),
    ],
)
def test_client_settings_refuse_what_cannot_work_in_one_line(
    changes: dict[str, Any], error: str
) -> None:
    settings = replace(ClientSettings(url="ws://127.0.0.1:8765/vm"), **changes)
    with pytest.raises(ConfigError, match=error):
        settings.load()


def test_client_settings_send_the_first_token_and_the_extra_headers_last(
    files: dict[str, Path],
) -> None:
    settings = ClientSettings(
        url="wss://dst.example/vm",
        token_file=files["tokens"],
        header_lines=("X-Gateway: a",),
        extra_headers=(("Migrelay-Migration", "multifd=0,postcopy=0"),),
        proxy="direct",
    )
    config = settings.load()
    assert config.token == "secret-one"
    assert list(config.headers) == [
        ("X-Gateway", "a"),
        ("Migrelay-Migration", "multifd=0,postcopy=0"),
    ]
    assert config.proxy is None and config.ssl_context is None
