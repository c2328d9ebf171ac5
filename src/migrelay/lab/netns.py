"""Two "hosts" on one machine: network namespaces joined by a veth pair (iproute2).

Used by ``migrelay bench --link RATE`` and the fault tests: the source side (QEMU and
``connect``) runs in one namespace, the destination side (``serve`` and QEMU) in the
other, so every migration byte crosses a real link that can be shaped with ``tc tbf``
and cut with ``ip link set … down``. Unix sockets (QMP, the relays' QEMU side) live in
the filesystem and work across namespaces. Needs root (CAP_NET_ADMIN).

The addresses are inside namespaces this object creates; nothing leaves the machine.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from types import TracebackType
from typing import Final

from migrelay.errors import RelayError
from migrelay.units import parse_link_rate

#: A subnet for the link between the two namespaces; it exists only inside them.
SUBNET_PREFIX: Final = "10.213.7"
_counter = itertools.count()


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RelayError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


class LinkedNamespaces:
    """A source namespace and a destination namespace joined by a veth pair.

    Args:
        rate: shape both directions to this rate with ``tc tbf`` (``"10gbit"``), or
            None for the veth's own speed.
    """

    def __init__(self, rate: str | None = None) -> None:
        tag = f"{os.getpid() % 100000}x{next(_counter)}"
        self.source_ns = f"mrs{tag}"
        self.dest_ns = f"mrd{tag}"
        # veth names are limited to 15 characters.
        self.source_dev = f"vs{tag}"[:15]
        self.dest_dev = f"vd{tag}"[:15]
        self.source_addr = f"{SUBNET_PREFIX}.1"
        self.dest_addr = f"{SUBNET_PREFIX}.2"
        self.rate = rate
        self._created = False

    def __enter__(self) -> LinkedNamespaces:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def create(self) -> None:
        """Create both namespaces, the link, the addresses and the shaping."""
        try:
            _ip("netns", "add", self.source_ns)
            self._created = True
            _ip("netns", "add", self.dest_ns)
            _ip("link", "add", self.source_dev, "type", "veth", "peer", "name", self.dest_dev)
            for dev, ns, addr in (
                (self.source_dev, self.source_ns, self.source_addr),
                (self.dest_dev, self.dest_ns, self.dest_addr),
            ):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                if self.rate:
                    self._shape(ns, dev, self.rate)
        except BaseException:
            self.destroy()
            raise

    @staticmethod
    def _shape(ns: str, dev: str, rate: str) -> None:
        bits = parse_link_rate(rate)
        # tbf needs a bucket of at least rate/HZ bytes; 10 ms of traffic is ample, with
        # a floor so slow links still take a jumbo burst.
        burst = max(bits // 8 // 100, 256 * 1024)
        result = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
             "rate", rate, "burst", str(burst), "latency", "50ms"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RelayError(f"tc tbf on {dev} failed: {result.stderr.strip()}")

    def prefix(self, namespace: str) -> tuple[str, ...]:
        """The command prefix that runs a program in ``namespace``."""
        return ("ip", "netns", "exec", namespace)

    def set_link(self, up: bool) -> None:
        """Cut (``up=False``) or restore the link, on the source side."""
        _ip("-n", self.source_ns, "link", "set", self.source_dev, "up" if up else "down")

    def destroy(self) -> None:
        """Delete both namespaces (the veth pair goes with them). Safe to call twice."""
        if not self._created:
            return
        for ns in (self.source_ns, self.dest_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._created = False
