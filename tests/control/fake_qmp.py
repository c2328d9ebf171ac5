"""A small fake QMP server over a real unix socket, for the control plane's error paths.

It speaks enough of the QMP wire protocol for ``qemu.qmp.QMPClient``: the greeting,
``qmp_capabilities``, then one reply per command from a script. Every command received is
recorded, so tests can assert the exact sequence the orchestrator sent.

A command the test did not script gets QEMU 7.2's usual reply from `DEFAULT_REPLIES`,
or ``{}``: the fake agrees with anything, so a behaviour shown only here is shown
against a script, not against QEMU. Each one that real QEMU can show has an e2e test
too (``tests/e2e/``: capability mismatches in ``test_capability_mismatch.py``, postcopy
resume retries, timeouts, Ctrl-C while paused and ``incoming --recover`` in
``test_postcopy_recovery.py``). What stays fake-only, and why:

* an older QEMU's refusals (3.1 without multifd, 4.2 without multifd compression): only
  Debian's QEMU 7.2 installs here;
* a QEMU built without zstd: Debian's is built with it;
* the exact status sequences and command orders of the control plane's error paths,
  which a real QEMU reaches only by chance of timing (a resume refused while QEMU still
  tears down the last attempt, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from migrelay.control.qmp import QMP

#: What QEMU 7.2 sends on connect (trimmed to what qemu.qmp validates).
GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "fake"},
        "capabilities": [],
    }
}


@dataclass(frozen=True)
class QMPFail:
    """A scripted error reply: QEMU's ``error`` member."""

    desc: str
    error_class: str = "GenericError"


#: A scripted reply: a return value, an error, a function of the arguments, or HANG.
Reply = object | QMPFail | Callable[[Mapping[str, object]], object]

#: Never answer this command (to test cancellation and lost connections).
HANG = object()
#: Close the connection instead of answering.
HANGUP = object()


#: The capabilities QEMU 7.2 lists, all off: the reply to ``query-migrate-capabilities``
#: unless a test scripts another (an older QEMU's shorter list, say).
QEMU_7_2_CAPABILITIES = [
    {"capability": name, "state": False}
    for name in (
        "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
        "postcopy-ram", "x-colo", "release-ram", "block", "return-path", "pause-before-switchover",
        "multifd", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
        "x-ignore-shared", "validate-uuid", "background-snapshot", "zero-copy-send",
        "postcopy-preempt",
    )
]  # fmt: skip

#: Replies to commands a test did not script, as QEMU 7.2 would give them (a list is
#: a script of replies, so a reply that is itself a list goes in one).
DEFAULT_REPLIES: dict[str, object] = {
    "query-migrate-capabilities": [QEMU_7_2_CAPABILITIES],
    "query-version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "fake"},
}


@dataclass
class FakeQMP:
    """Script of replies per command; a list is consumed one reply per call (last repeats).

    Attributes:
        replies: command name -> reply or list of replies.
        received: ``(command, arguments)`` in the order received.
        events: events to send right after the reply to a command, by command name.
    """

    replies: dict[str, Reply | list[Reply]] = field(default_factory=dict)
    received: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    events: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    @property
    def commands(self) -> list[str]:
        """The names of the commands received, in order."""
        return [name for name, _ in self.received]

    def _next_reply(self, command: str) -> Reply:
        scripted = self.replies.get(command, DEFAULT_REPLIES.get(command, {}))
        if isinstance(scripted, list):
            items: list[Reply] = scripted
            return items.pop(0) if len(items) > 1 else items[0]
        reply: Reply = scripted
        return reply

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(message: Mapping[str, object]) -> None:
            writer.write(json.dumps(message).encode() + b"\r\n")

        send(GREETING)
        try:
            async for message in _messages(reader):
                command = str(message.get("execute"))
                raw_arguments = message.get("arguments")
                arguments = dict(raw_arguments) if isinstance(raw_arguments, dict) else {}
                reply_id = message.get("id")
                if command == "qmp_capabilities":
                    send({"return": {}, "id": reply_id})
                    continue
                self.received.append((command, arguments))
                reply = self._next_reply(command)
                if reply is HANG:
                    continue
                if reply is HANGUP:
                    break
                if callable(reply):
                    reply = reply(arguments)
                if isinstance(reply, QMPFail):
                    error = {"class": reply.error_class, "desc": reply.desc}
                    send({"error": error, "id": reply_id})
                else:
                    send({"return": reply, "id": reply_id})
                for event in self.events.get(command, []):
                    send({"event": "MIGRATION", "data": event, "timestamp": {}})
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, object]]:
    # qemu.qmp sends each message without a newline (QEMU's parser is a streaming one),
    # so split the byte stream on JSON value boundaries.
    decoder = json.JSONDecoder()
    buffer = ""
    while data := await reader.read(65536):
        buffer += data.decode()
        while buffer.strip():
            try:
                message, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                break  # incomplete: read more
            buffer = buffer.lstrip()[end:]
            yield message


@contextlib.asynccontextmanager
async def serve(fake: FakeQMP, path: Path) -> AsyncIterator[str]:
    """Serve ``fake`` on the unix socket ``path`` for the duration of the block."""
    server = await asyncio.start_unix_server(fake.handle, path=str(path))
    try:
        yield str(path)
    finally:
        server.close()
        await server.wait_closed()


async def against(fake: FakeQMP, sock_dir: Path, body: Callable[[QMP], Awaitable[None]]) -> None:
    """Serve ``fake`` in ``sock_dir``, connect a `QMP` to it and run ``body(qmp)``.

    A test runs it on both loops with ``run_async(against(fake, sock_dir, body))``.
    """
    async with serve(fake, sock_dir / "q.qmp") as path, QMP("vm") as qmp:
        await qmp.connect(path)
        await body(qmp)
