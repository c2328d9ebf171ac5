"""`migrelay.aio.access`: the token file, X-Forwarded-For, Host and Origin policies.

Every case is hostile input or a rule of the module docstring; none needs a socket.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest

from migrelay.aio.access import (
    MAX_FORWARDED_HOPS,
    TARGET_NAME_RE,
    TokenEntry,
    browser_origin_allowed,
    derived_token_name,
    forwarded_client,
    host_allowed,
    load_token_entries,
    match_token,
    parse_allowed_hosts,
    parse_allowed_origins,
    parse_forwarded_hop,
    parse_host,
    parse_networks,
    parse_origin,
    parse_token_lines,
    valid_target,
)
from migrelay.errors import ConfigError

SECRET = "3b1f9c0e6d4a7b2c8e5f1a9d3c7b6e2f"


def one(line: str) -> TokenEntry:
    entries = parse_token_lines([line])
    assert len(entries) == 1
    return entries[0]


# -- token file: syntax --------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        f"{SECRET}                      # any target",  # the README's example
        f"{SECRET}   # any target",
        f"{SECRET} #note",
        f"{SECRET}\t#note",
        f"{SECRET} #",
        f"{SECRET} ##",
        f"  {SECRET}  ",
        f"{SECRET}\r",
        f"{SECRET} # vm1,vm2 name=x",
    ],
)
def test_comment_after_a_secret_leaves_it_unrestricted(line: str) -> None:
    entry = one(line)
    assert entry.targets is None
    assert entry.secret == SECRET.encode()


@pytest.mark.parametrize(
    ("line", "targets", "name"),
    [
        (f"{SECRET} vm1,vm2", {"vm1", "vm2"}, None),
        (f"{SECRET} vm1,vm2   # only these", {"vm1", "vm2"}, None),
        (f"{SECRET} /", {"/"}, None),
        (f"{SECRET} /,vm1", {"/", "vm1"}, None),
        (f"{SECRET} vm1 name=backup", {"vm1"}, "backup"),
        (f"{SECRET}\tvm1\tname=backup\t#c", {"vm1"}, "backup"),
        (f"{SECRET} name=backup", None, "backup"),
        (f"{SECRET} name=a", None, "a"),
        (f"{SECRET} name={'b' * 64}", None, "b" * 64),
        (f"{SECRET} A_b.c-9", {"A_b.c-9"}, None),
        (f"{SECRET} {'v' * 64}", {"v" * 64}, None),
    ],
)
def test_targets_and_names(line: str, targets: set[str] | None, name: str | None) -> None:
    entry = one(line)
    assert entry.secret == SECRET.encode()
    assert entry.targets == (None if targets is None else frozenset(targets))
    assert entry.name == (name or derived_token_name(SECRET.encode()))


def test_comments_and_blank_lines_are_skipped() -> None:
    lines = ["# comment", "", "   ", "\t# indented comment", "   #", "a", "b vm1,vm2", "c /"]
    entries = parse_token_lines(lines)
    assert [entry.secret for entry in entries] == [b"a", b"b", b"c"]
    assert [entry.targets for entry in entries] == [None, {"vm1", "vm2"}, {"/"}]


@pytest.mark.parametrize(
    "line",
    [
        f"{SECRET}#note",  # neither the secret "...#note" nor a comment
        f"{SECRET}#",
        f"{SECRET}# any target",  # else: the secret "...#" limited to a target "any"
        "ab#cd vm1",
        "ab#cd #c",
        f"{SECRET} vm1,#note",  # never a target named "#note"
        f"{SECRET} vm1#note",
        f"{SECRET} vm1,vm2# only these",
        f"{SECRET} vm1 name=a#b",
        f"{SECRET} vm1 name=a# c",
        f"{SECRET} name=#a",
    ],
)
def test_a_hash_inside_a_field_is_refused(line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_token_lines(["# a comment", "", line], source="tokens")
    assert str(caught.value) == (
        "tokens line 3: '#' inside a field: a comment begins with '#' at the start of the"
        " line or after a space or tab"
    )


def test_a_hash_that_begins_a_field_always_begins_a_comment() -> None:
    assert one(f"{SECRET} #vm1,vm2 name=x").targets is None
    assert one(f"{SECRET} vm1 #vm2 name=x") == TokenEntry(SECRET.encode(), frozenset({"vm1"}))


def test_derived_name_is_a_short_digest() -> None:
    name = derived_token_name(SECRET.encode())
    assert name == "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()[:8]
    assert re.fullmatch(r"sha256:[0-9a-f]{8}", name)
    assert SECRET not in name
    # A derived name cannot collide with a given one: ":" is not in the name syntax.
    assert TARGET_NAME_RE.fullmatch(name) is None


def test_entry_built_directly_gets_a_name() -> None:
    assert TokenEntry(b"x").name == derived_token_name(b"x")
    assert TokenEntry(b"x", None, "given").name == "given"


FIXED_MESSAGES = {
    "expected 'SECRET [TARGET,...] [name=NAME]'",
    "'#' inside a field: a comment begins with '#' at the start of the line or after a space"
    " or tab",
    "empty target name",
    "invalid target name (a target is / or 1 to 64 of A-Z a-z 0-9 _ . -, "
    "starting with a letter or digit, without a leading /)",
    "invalid token name (1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit)",
    "a token is visible ASCII characters only",
    "the token is missing (the line starts with name=)",
}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"{SECRET} vm1 vm2", "expected 'SECRET"),
        (f"{SECRET} vm1 name=a name=b", "expected 'SECRET"),
        (f"{SECRET} name=a vm1", "expected 'SECRET"),
        (f"{SECRET} vm1,", "empty target name"),
        (f"{SECRET} ,vm1", "empty target name"),
        (f"{SECRET} vm1,,vm2", "empty target name"),
        (f"{SECRET} /vm1", "invalid target name"),
        (f"{SECRET} vm/1", "invalid target name"),
        (f"{SECRET} -vm1", "invalid target name"),
        (f"{SECRET} .hidden", "invalid target name"),
        (f"{SECRET} ..", "invalid target name"),
        (f"{SECRET} {'v' * 65}", "invalid target name"),
        (f"{SECRET} vm1;vm2", "invalid target name"),
        (f"{SECRET} vm\u00e9", "invalid target name"),
        (f"{SECRET} vm1,\u0661", "invalid target name"),  # an Arabic-Indic digit
        (f"{SECRET} //", "invalid target name"),
        (f"{SECRET} name=", "invalid token name"),
        (f"{SECRET} name=-x", "invalid token name"),
        (f"{SECRET} name=a:b", "invalid token name"),
        (f"{SECRET} name=sha256:00000000", "invalid token name"),
        (f"{SECRET} name={'n' * 65}", "invalid token name"),
        (f"{SECRET} vm1 name=a/b", "invalid token name"),
        (f"{SECRET}\u00e9", "visible ASCII"),
        (f"{SECRET}\x0b vm1", "visible ASCII"),
        (f"{SECRET}\u00a0vm1", "visible ASCII"),  # NBSP is no separator
        ("name=backup vm1", "token is missing"),
        ("name=backup", "token is missing"),
        (f"{SECRET} vm1,#x", "'#' inside a field"),
        (f"x#{SECRET}", "'#' inside a field"),
    ],
)
def test_invalid_lines(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        parse_token_lines(["# first line", line], source="tokens")
    text = str(caught.value)
    assert text.startswith("tokens line 2: ")
    # Fixed texts only: nothing of the line (secret, names, junk) is echoed.
    assert text.removeprefix("tokens line 2: ") in FIXED_MESSAGES


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([SECRET, f"{SECRET} vm1"], "line 2: the same token as line 1"),
        (["a", "# c", "b name=x", "c name=x"], "line 4: the same token name as line 3"),
        (["a name=x", "a name=y"], "line 2: the same token as line 1"),
        # A given name cannot take a derived one (":" is refused), but two given can meet.
        (["a vm1 name=n", "b / name=n"], "line 2: the same token name as line 1"),
    ],
)
def test_duplicates(lines: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_token_lines(lines)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("bad", ["{s} /vm", "{s} a b c", "{s}\u00ff", "{s} vm1,,", "{s} name="])
def test_secret_never_in_errors(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_token_lines([bad.format(s=SECRET)])
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


def test_secret_never_in_repr() -> None:
    entry = one(f"{SECRET} vm1 name=backup")
    shown = repr(entry)
    assert SECRET not in shown
    assert SECRET[:6] not in shown
    assert "backup" in shown
    assert f"<{len(SECRET)} bytes>" in shown
    assert entry.digest.hex() not in shown
    assert SECRET not in repr([entry, one(SECRET)])


@pytest.mark.parametrize("name", ["vm1", "a", "A.b_c-d", "0", "v" * 64])
def test_target_name_pattern_accepts(name: str) -> None:
    assert TARGET_NAME_RE.fullmatch(name)
    assert valid_target(name)


@pytest.mark.parametrize(
    "name", ["", "-a", "_a", ".a", "a/b", "v" * 65, "a b", "a\n", "é", "\u0661", "/x"]
)
def test_target_name_pattern_refuses(name: str) -> None:
    assert TARGET_NAME_RE.fullmatch(name) is None
    assert not valid_target(name)


def test_root_is_a_valid_target() -> None:
    assert valid_target("/")


# -- token file: loading -------------------------------------------------------------------


def test_load_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# tokens\n{SECRET}   # any target\nb vm1 name=backup\n")
    entries = load_token_entries(path)
    assert [(e.secret, e.targets, e.name) for e in entries] == [
        (SECRET.encode(), None, derived_token_name(SECRET.encode())),
        (b"b", frozenset({"vm1"}), "backup"),
    ]
    assert load_token_entries(None) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"# nothing\n\n", "holds no token"),
        (b"\xff\xfe\n", "not UTF-8"),
        (b"a b c\n", "line 1: expected"),
    ],
)
def test_load_token_file_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_token_entries(path)


def test_load_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_token_entries(tmp_path / "absent")


# -- match_token ---------------------------------------------------------------------------


def test_match_token() -> None:
    entries = parse_token_lines(["a", "bb vm1 name=second", "ccc"])
    assert match_token(b"a", entries) is entries[0]
    assert match_token(b"bb", entries) is entries[1]
    assert match_token(b"ccc", entries) is entries[2]
    for wrong in [b"", b"b", b"cc", b"cccc", b"A", b"a ", b" a", b"bb vm1"]:
        assert match_token(wrong, entries) is None
    assert match_token(b"a", []) is None


def test_match_token_compares_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit at a match: every entry is compared, with fixed-length digests."""
    calls: list[tuple[int, int]] = []

    def compare(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return a == b

    monkeypatch.setattr(hmac, "compare_digest", compare)
    entries = parse_token_lines(["a", "bbbbbbbbbbbbbbbbbbbbbb", "c"])
    assert match_token(b"a", entries) is entries[0]
    assert calls == [(32, 32)] * 3


# -- X-Forwarded-For -----------------------------------------------------------------------

TRUSTED = parse_networks(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("header", "client"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("203.0.113.9, 10.0.0.2", "203.0.113.9"),
        ("198.51.100.1, 203.0.113.9, 10.0.0.2", "203.0.113.9"),
        # Left of the client is the client's own text: never parsed.
        ("unknown, 203.0.113.9", "203.0.113.9"),
        ("1.2.3.4:80, garbage, ², 203.0.113.9", "203.0.113.9"),
        (", , 203.0.113.9", "203.0.113.9"),
        ("  203.0.113.9  ,\t10.0.0.2\t", "203.0.113.9"),
        ("2001:DB8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1], fd00::5", "2001:db8::1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),  # IPv4-mapped: one client, one form
        ("[::ffff:203.0.113.9]", "203.0.113.9"),
        ("::ffff:10.0.0.9, 203.0.113.9", "203.0.113.9"),
        ("203.0.113.9, ::ffff:10.0.0.2", "203.0.113.9"),  # a mapped proxy is trusted
        # All trusted: the rightmost, what our own proxy saw, not the forgeable leftmost.
        ("10.9.9.9, 10.1.2.3", "10.1.2.3"),
        ("127.0.0.1", "127.0.0.1"),
        ("10.0.0.1, fd00::1", "fd00::1"),
        ("::ffff:10.0.0.7", "10.0.0.7"),
        (",".join(["10.0.0.1"] * MAX_FORWARDED_HOPS), "10.0.0.1"),
    ],
)
def test_forwarded_client(header: str, client: str) -> None:
    assert forwarded_client("127.0.0.1", header, TRUSTED) == client


@pytest.mark.parametrize(
    "header",
    [
        "²",  # latin-1 superscript two: a digit to str.isdigit, not to an address
        "1.2.3.²",
        "１.２.３.４",  # fullwidth digits
        "1.2.3.4:80",
        "[2001:db8::1]:80",
        "unknown",
        "_hidden",
        "example.com",
        "localhost",
        "203.0.113.9, ",  # an empty rightmost hop
        "203.0.113.9,,10.0.0.2",  # an empty hop walked before the client
        " ",
        "\t",
        "203.0.113.9 10.0.0.2",
        "203.0.113.9;10.0.0.2",
        "1.2.3",
        "1.2.3.4.5",
        "01.2.3.4",
        "001.002.003.004",
        "256.1.1.1",
        "0x7f.0.0.1",
        "2130706433",
        "[1.2.3.4]",
        "[2001:db8::1",
        "2001:db8::1]",
        "fe80::1%eth0",
        "[fe80::1%25eth0]",
        "2001:db8::1::2",
        ":",
        "1.2.3.4\x00",
        "1.2.3.4\n",
        "1.2.3.4/32",
        "10.0.0.0/8",
        "203.0.113.9, 10.0.0.2, garbage",
        ",".join(["10.0.0.1"] * 1000),
        ",".join(["10.0.0.1"] * (MAX_FORWARDED_HOPS + 1)),
        ",".join(["203.0.113.9"] * (MAX_FORWARDED_HOPS + 1)),  # bounded before walking
    ],
)
def test_forwarded_for_from_a_trusted_proxy_is_strict(header: str) -> None:
    with pytest.raises(ValueError) as caught:
        forwarded_client("127.0.0.1", header, TRUSTED)
    assert isinstance(caught.value, ValueError)
    # The message says which hop, never what the client wrote.
    for word in ("garbage", "unknown", "example", "²", "eth0"):
        assert word not in str(caught.value)


@pytest.mark.parametrize(
    "header", ["²", "unknown", ",".join(["x"] * 1000), "203.0.113.9", "1.2.3.4:80"]
)
@pytest.mark.parametrize("peer", ["203.0.113.50", "192.0.2.1", None, "not-an-ip"])
def test_forwarded_for_from_an_untrusted_peer_is_ignored(header: str, peer: str | None) -> None:
    assert forwarded_client(peer, header, TRUSTED) is None


@pytest.mark.parametrize("header", [None, ""])
def test_absent_forwarded_for(header: str | None) -> None:
    assert forwarded_client("127.0.0.1", header, TRUSTED) is None


def test_forwarded_for_without_trusted_proxies_is_ignored() -> None:
    assert forwarded_client("127.0.0.1", "garbage", ()) is None


@pytest.mark.parametrize("peer", ["::ffff:127.0.0.1", "[::ffff:10.1.1.1]", "fd00::9"])
def test_mapped_and_v6_peers_are_trusted(peer: str) -> None:
    assert forwarded_client(peer, "203.0.113.9", TRUSTED) == "203.0.113.9"


def test_invalid_hop_message_names_the_place() -> None:
    with pytest.raises(ValueError, match="hop 2 from the right of 3"):
        forwarded_client("127.0.0.1", "1.1.1.1, bad, 10.0.0.1", TRUSTED)
    with pytest.raises(ValueError, match=f"more than {MAX_FORWARDED_HOPS} hops"):
        forwarded_client("127.0.0.1", ",".join(["1.1.1.1"] * 40), TRUSTED)


@pytest.mark.parametrize(
    ("hop", "address"),
    [("1.2.3.4", "1.2.3.4"), (" [::1] ", "::1"), ("::FFFF:1.2.3.4", "1.2.3.4")],
)
def test_parse_forwarded_hop(hop: str, address: str) -> None:
    assert str(parse_forwarded_hop(hop)) == address


def test_parse_networks() -> None:
    assert [str(n) for n in parse_networks([" 10.1.2.3/8 ", "::1"])] == ["10.0.0.0/8", "::1/128"]
    with pytest.raises(ValueError, match="not an ip address or network"):
        parse_networks(["example.com"])


# -- Host ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("example.com", ("example.com", None)),
        ("Example.COM:8765", ("example.com", 8765)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]", ("::1", None)),
        ("[0:0:0:0:0:0:0:1]:65535", ("::1", 65535)),
        ("[2001:DB8::1]:443", ("2001:db8::1", 443)),
        ("localhost", ("localhost", None)),
        ("my_host.internal", ("my_host.internal", None)),
        ("bücher.example", ("xn--bcher-kva.example", None)),
        ("BÜCHER.example:80", ("xn--bcher-kva.example", 80)),
        ("123.example", ("123.example", None)),
    ],
)
def test_parse_host(value: str, parsed: tuple[str, int | None]) -> None:
    assert parse_host(value) == parsed


@pytest.mark.parametrize(
    "value",
    [
        "",
        ":8765",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:08765",
        "example.com:+80",
        "example.com:８０",
        "example.com:²",
        "example.com:80:80",
        "example.com.",
        "a..b",
        ".example",
        "-a.example",
        "a-.example",
        "a b",
        "a/b",
        "user@example.com",
        "example.com\x00",
        "127.1",
        "0x7f.0.0.1",
        "2130706433",
        "127.0.0.01",
        "1.2.3.4.5",
        "256.0.0.1",
        "::1",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[1.2.3.4]",
        "[fe80::1%25lo]",
        "[example.com]",
        "x" * 64 + ".example",
        ".".join(["a" * 63] * 5),
    ],
)
def test_parse_host_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_host(value)


LOOPBACK = ("127.0.0.1", 8765)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:8765",
        "127.0.0.1",
        "localhost:8765",
        "LOCALHOST:8765",
        "localhost",
        "[::1]:8765",
        "[::1]",
        "127.0.0.2:8765",
        "[::ffff:127.0.0.1]:8765",
        " localhost:8765 ",
    ],
)
@pytest.mark.parametrize("listener", ["127.0.0.1", "::1", "[::1]", "localhost"])
def test_host_on_a_loopback_listener(host: str, listener: str) -> None:
    assert host_allowed(host, listener, 8765, frozenset())


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "evil.example:8765",  # DNS rebinding
        "evil.example",
        "127.0.0.1.evil.example:8765",
        "localhost.evil.example:8765",
        "sub.localhost:8765",
        "localhost.:8765",
        "127.0.0.1:8766",  # wrong port
        "localhost:80",
        "[::1]:1",
        "192.0.2.1:8765",
        "127.1:8765",
        "2130706433:8765",
        "garbage garbage",
        "127.0.0.1:8765:8765",
        "127.0.0.1:",
        "\u00b2",
        "localhost\r\nX: y",
    ],
)
def test_host_refused_on_a_loopback_listener(host: str | None) -> None:
    assert not host_allowed(host, *LOOPBACK, frozenset())


@pytest.mark.parametrize(
    ("host", "allowed", "ok"),
    [
        ("relay.example:8765", {"relay.example"}, True),
        ("relay.example:443", {"relay.example"}, True),  # a bare name: any port
        ("relay.example", {"relay.example"}, True),
        ("RELAY.example", {"Relay.Example"}, True),
        ("relay.example:443", {"relay.example:443"}, True),
        ("relay.example:8765", {"relay.example:443"}, False),  # only the named port
        ("relay.example", {"relay.example:443"}, False),
        ("other.example:8765", {"relay.example"}, False),
        ("sub.relay.example", {"relay.example"}, False),
        ("192.0.2.7:9000", {"192.0.2.7:9000"}, True),
        ("[2001:db8::7]:9000", {"[2001:DB8::7]"}, True),
        ("bücher.example", {"xn--bcher-kva.example"}, True),
        ("xn--bcher-kva.example", {"Bücher.example"}, True),
        ("relay.example", {"not valid!", "relay.example"}, True),
        ("evil.example:8765", {"not valid!"}, False),
    ],
)
def test_host_allow_list(host: str, allowed: set[str], ok: bool) -> None:
    assert host_allowed(host, *LOOPBACK, frozenset(allowed)) is ok
    assert host_allowed(host, "0.0.0.0", 8765, frozenset(allowed)) is ok


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("192.0.2.10:8765", True),
        ("192.0.2.10", True),
        ("[::ffff:192.0.2.10]:8765", True),
        ("192.0.2.10:8000", False),
        ("192.0.2.11:8765", False),
        ("127.0.0.1:8765", False),  # a specific, non-loopback listener
        ("localhost:8765", False),
        ("evil.example:8765", False),
    ],
)
def test_host_on_an_address_listener(host: str, ok: bool) -> None:
    assert host_allowed(host, "192.0.2.10", 8765, frozenset()) is ok


@pytest.mark.parametrize("listener", ["0.0.0.0", "::", "[::]", ""])
@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:8765", True),
        ("localhost:8765", True),
        ("[::1]:8765", True),
        ("localhost:9999", False),
        ("192.0.2.10:8765", False),  # our address? a wildcard listener cannot know
        ("0.0.0.0:8765", False),
        ("[::]:8765", False),
        ("evil.example:8765", False),
    ],
)
def test_host_on_a_wildcard_listener(listener: str, host: str, ok: bool) -> None:
    assert host_allowed(host, listener, 8765, frozenset()) is ok


@pytest.mark.parametrize(
    ("host", "ok"),
    [("dst1.example:8765", True), ("DST1.example", True), ("dst2.example:8765", False)],
)
def test_host_on_a_named_listener(host: str, ok: bool) -> None:
    assert host_allowed(host, "dst1.example", 8765, frozenset()) is ok


def test_parse_allowed_hosts() -> None:
    assert parse_allowed_hosts([" Relay.Example ", "relay.example:443", "[::1]:80"]) == {
        "relay.example",
        "relay.example:443",
        "[::1]:80",
    }
    with pytest.raises(ValueError, match="not a host"):
        parse_allowed_hosts(["https://relay.example"])


# -- Origin --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "parsed"),
    [
        ("https://console.example", "https://console.example"),
        ("HTTPS://Console.Example:443", "https://console.example"),
        ("https://console.example:8443", "https://console.example:8443"),
        ("http://console.example:80", "http://console.example"),
        ("http://console.example:443", "http://console.example:443"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://127.0.0.1", "http://127.0.0.1"),
        ("chrome-extension://abcdef", "chrome-extension://abcdef"),
        ("null", "null"),
        (" https://a.example ", "https://a.example"),
    ],
)
def test_parse_origin(origin: str, parsed: str) -> None:
    assert parse_origin(origin) == parsed


@pytest.mark.parametrize(
    "origin",
    [
        "",
        "console.example",
        "https://",
        "https://console.example/",
        "https://console.example/path",
        "https://console.example?x",
        "https://user@console.example",
        "https://console.example:0",
        "https://console.example:99999",
        "https:console.example",
        "1http://console.example",
        "NULL",
        "null ",
        "https://console.example\r\n",
        "https://exa mple",
        "file://",
        "https://[::1",
    ],
)
def test_parse_origin_refuses(origin: str) -> None:
    if origin == "null ":
        assert parse_origin(origin) == "null"  # surrounding spaces are header whitespace
        return
    with pytest.raises(ValueError):
        parse_origin(origin)


ALLOWED = frozenset({"https://console.example"})


@pytest.mark.parametrize(
    ("origin", "allowed", "tokens", "ok"),
    [
        # Not a browser: allowed, whatever the mode.
        (None, frozenset(), False, True),
        (None, frozenset(), True, True),
        (None, ALLOWED, False, True),
        # Without tokens, a browser needs an explicit allow-list entry.
        ("https://console.example", frozenset(), False, False),
        ("http://127.0.0.1:8765", frozenset(), False, False),
        ("null", frozenset(), False, False),
        ("https://console.example", ALLOWED, False, True),
        ("https://console.example:443", ALLOWED, False, True),
        ("https://evil.example", ALLOWED, False, False),
        ("http://console.example", ALLOWED, False, False),
        ("https://console.example:8443", ALLOWED, False, False),
        ("null", ALLOWED, False, False),
        # With tokens, an empty list accepts any well-formed origin.
        ("https://evil.example", frozenset(), True, True),
        ("null", frozenset(), True, True),
        ("https://console.example", ALLOWED, True, True),
        ("https://evil.example", ALLOWED, True, False),
        # Malformed: refused in every mode.
        ("garbage", frozenset(), True, False),
        ("https://console.example/x", ALLOWED, True, False),
        ("https://console.example\n", frozenset(), True, False),
        # Allow-list entries in any of the spellings an operator may write.
        ("https://console.example", frozenset({"https://console.example:443/"}), False, True),
        ("https://console.example", frozenset({"HTTPS://CONSOLE.EXAMPLE"}), False, True),
        ("https://console.example", frozenset({"not an origin"}), False, False),
        ("null", frozenset({"null"}), False, True),
    ],
)
def test_browser_origin_allowed(
    origin: str | None, allowed: frozenset[str], tokens: bool, ok: bool
) -> None:
    assert browser_origin_allowed(origin, allowed, tokens) is ok


def test_parse_allowed_origins() -> None:
    assert parse_allowed_origins(["https://A.example:443/", "http://b.example:8080"]) == {
        "https://a.example",
        "http://b.example:8080",
    }
    with pytest.raises(ValueError, match="not an origin"):
        parse_allowed_origins(["a.example"])


def test_parsed_allow_lists_feed_the_checks() -> None:
    hosts = parse_allowed_hosts(["Relay.Example:443", "[2001:DB8::1]", "bücher.example"])
    assert host_allowed("relay.example:443", "0.0.0.0", 8765, hosts)
    assert host_allowed("[2001:db8::1]:9", "0.0.0.0", 8765, hosts)
    assert host_allowed("xn--bcher-kva.example", "0.0.0.0", 8765, hosts)
    assert not host_allowed("relay.example:8765", "0.0.0.0", 8765, hosts)
    origins = parse_allowed_origins(["https://Console.Example:443/", "null"])
    assert browser_origin_allowed("https://console.example", origins, tokens_required=False)
    assert browser_origin_allowed("null", origins, tokens_required=False)
    assert not browser_origin_allowed("https://evil.example", origins, tokens_required=False)
