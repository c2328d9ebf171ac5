"""Two libvirt "hosts" on one machine, each a real ``libvirtd`` in a mount namespace of
its own, and the migrations between them (issue 16).

A host (`LibvirtHost`) is ``unshare --mount --propagation private`` running a shell that
bind-mounts the host's folders (``ROOT/NAME/etc``, ``run``, ``lib``, ``cache``, ``log``,
``sock``) over ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/cache/libvirt``, ``/var/log/libvirt`` and `SOCKET_DIR`, then execs ``libvirtd``.
So both daemons see the same paths with different contents, as two machines would: the
migration sockets libvirt names in ``--migrateuri`` and ``--disks-uri`` are the same
path on both sides, which is how libvirt wants them. The test process stays in the root
namespace, where each host's folders are plain directories: `LibvirtHost.outside` turns
a path inside a host into the path the test sees, and `LibvirtHost.virsh` talks to the
host's daemon through its socket there. A command can run inside a host's namespace
with `LibvirtHost.nsenter` as its prefix.

What libvirt 9.0 (Debian 12) needs to run this way, as root, without systemd, dbus,
virtlogd or cgroups (issue 16): ``qemu.conf`` with ``user``/``group`` root,
``dynamic_ownership = 0``, ``security_driver = "none"``, ``cgroup_controllers = [ ]``,
``namespaces = [ ]``, ``stdio_handler = "file"``; ``libvirtd.conf`` with a
``host_uuid`` per host (libvirt refuses a migration to "the same host"); and a
``libvirt-qemu`` user and group (``tools/setup`` creates them: the QEMU driver resolves
them before it reads ``qemu.conf``). The mount points are created once in the root
namespace, empty (``/run/libvirt`` and the rest do not exist without
``libvirt-daemon-system``).

A test VM (`domain_xml`) is a TCG domain with no display and no guest: it is created
paused (``virsh create --paused``) and never runs, so its RAM changes only through the
test, as in `migrelay.lab.vm`. Its RAM is a shared file (``memoryBacking`` ``file``,
``access mode='shared'``) under ``/var/lib/libvirt/qemu/ram``, which the test fills
with random bytes through the host's folder (`LibvirtHost.ram_file`) and compares, after
the migration, with the destination's file. A disk, when the case copies storage, is a
raw image of random bytes; the destination gets an empty one of the same size at the
same path, as ``--copy-storage-all`` requires.

Every process a host started is ended by `LibvirtHost.stop`: ``libvirtd``, then every
process still in the host's mount namespace (QEMU, which libvirt daemonizes, and
anything started with `LibvirtHost.nsenter`), after which the namespace and its mounts
are gone.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from migrelay.lab.vm import first_difference
from migrelay.units import MIB
from tests.helpers import FACTOR

#: The programs the harness runs; ``tools/setup`` installs them.
LIBVIRTD = "/usr/sbin/libvirtd"
#: The direct runs' forwarder (a script, run by this interpreter).
ORDERED_FORWARD = Path(__file__).with_name("ordered_forward.py")
REQUIRED_PROGRAMS = ("virsh", "socat", "unshare", "nsenter", "qemu-system-x86_64")

#: The socket directory both hosts have at the same path, with different contents: the
#: migration sockets (``--migrateuri``, ``--disks-uri``) and, on the source, the socket
#: its daemon reaches the destination's through (``--p2p``).
SOCKET_DIR = "/run/migrelay-libvirt"
#: The sockets in it, as the README's libvirt section names them (``serve --target-map``
#: maps /libvirt, /migrate and /nbd to them, /libvirt to `DAEMON_SOCKET`).
LIBVIRT_SOCKET = f"{SOCKET_DIR}/libvirt.sock"
MIGRATION_SOCKET = f"{SOCKET_DIR}/migrate.sock"
NBD_SOCKET = f"{SOCKET_DIR}/nbd.sock"
#: The destination daemon's own read-write socket, inside its namespace.
DAEMON_SOCKET = "/run/libvirt/libvirt-sock"

#: A host's folders (under ``ROOT/NAME``) and the paths they are mounted over.
HOST_FOLDERS: dict[str, str] = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "sock": SOCKET_DIR,
}

#: Until a daemon answers: its first start probes QEMU's capabilities (8 s here for the
#: two emulators; a host started from another's cache answers in 0.3 s).
START_TIMEOUT_S = 60.0 * FACTOR
#: Until a daemon exits after SIGTERM, and until killed processes are gone.
STOP_TIMEOUT_S = 10.0 * FACTOR
#: One virsh command other than a migration.
VIRSH_TIMEOUT_S = 30.0 * FACTOR
#: One ``virsh migrate`` of the tests' 64 MiB VMs (3.6 s direct here).
MIGRATION_TIMEOUT_S = 120.0 * FACTOR
#: Until a forwarder's socket appears.
FORWARDER_START_S = 10.0 * FACTOR
_POLL_S = 0.05

#: The tests' VM sizes: small, so that a case takes seconds on a shared 2-core machine.
RAM_BYTES = 64 * MIB
DISK_BYTES = 64 * MIB
#: At most this much of a running domain's RAM may differ from what the test wrote:
#: SeaBIOS's writes (low memory, and where it relocates itself and puts its tables; 229
#: pages of 4 KiB here). The other 62 MiB of random bytes must arrive as written.
FIRMWARE_BYTES = 2 * MIB
PAGE_BYTES = 4096

QEMU_CONF = """\
# Written by tests/libvirt/harness.py: root QEMU with nothing around it (issue 16).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

LIBVIRTD_CONF = """\
# Written by tests/libvirt/harness.py.
host_uuid = "{host_uuid}"
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

#: A migration's wall time per case, in the order measured: (path, case, seconds), where
#: path is "direct" or "migrelay"; printed at the end of the run (``conftest.py``).
TIMINGS: list[tuple[str, str, float]] = []


class LibvirtHost:
    """A ``libvirtd`` in a mount namespace of its own, standing in for one host.

    Args:
        root: the directory of both hosts' folders (short: socket paths are limited).
        name: the host's name, also its folder's.
    """

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root / name
        self.host_uuid = str(uuid.uuid4())
        self.popen: subprocess.Popen[bytes] | None = None
        #: ``/proc/PID/ns/mnt``'s link of the host's namespace, once it runs.
        self.mount_ns: str | None = None

    # -- paths ---------------------------------------------------------------------

    def outside(self, inside: str) -> Path:
        """The path, in the test's (root) namespace, of ``inside`` in the host's.

        Raises:
            ValueError: ``inside`` is in none of the host's own folders.
        """
        for folder, mount_point in HOST_FOLDERS.items():
            if inside == mount_point or inside.startswith(mount_point + "/"):
                return self.root / folder / inside[len(mount_point) :].lstrip("/")
        raise ValueError(f"{inside} is not in one of {self.name}'s own folders")

    @property
    def daemon_socket(self) -> Path:
        """The daemon's read-write socket, as the test process reaches it."""
        return self.outside(DAEMON_SOCKET)

    @property
    def uri(self) -> str:
        """The daemon's URI from the test process."""
        return f"qemu+unix:///system?socket={self.daemon_socket}"

    @property
    def pid(self) -> int:
        """The daemon's pid (in the root namespace)."""
        if self.popen is None:
            raise AssertionError(f"host {self.name} is not running")
        return self.popen.pid

    def nsenter(self) -> tuple[str, ...]:
        """A command prefix that runs its command in the host's mount namespace (it execs
        the command: its pid is the command's)."""
        return ("nsenter", f"--mount=/proc/{self.pid}/ns/mnt")

    # -- life ----------------------------------------------------------------------

    def start(self, capabilities_from: LibvirtHost | None = None) -> None:
        """Write the configuration, start the daemon and wait until it answers.

        Args:
            capabilities_from: a host whose QEMU capabilities cache this one starts
                with (the same binaries: the probe takes seconds).

        Raises:
            AssertionError: the daemon exited or did not answer in time; the message
                has its log.
        """
        for folder in HOST_FOLDERS:
            (self.root / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / "etc" / "qemu.conf").write_text(QEMU_CONF, encoding="ascii")
        (self.root / "etc" / "libvirtd.conf").write_text(
            LIBVIRTD_CONF.format(host_uuid=self.host_uuid), encoding="ascii"
        )
        if capabilities_from is not None:
            cache = capabilities_from.root / "cache" / "qemu"
            if cache.is_dir():
                shutil.copytree(cache, self.root / "cache" / "qemu", dirs_exist_ok=True)
        lines = ["set -e"]
        # The mount points, empty in the root namespace (mkdir there: the namespace shares
        # the file system); /etc/libvirt exists with the package.
        lines.append("mkdir -p " + " ".join(shlex.quote(p) for p in HOST_FOLDERS.values()))
        for folder, mount_point in HOST_FOLDERS.items():
            source = shlex.quote(str(self.root / folder))
            lines.append(f"mount --bind {source} {shlex.quote(mount_point)}")
        lines.append(f"exec {LIBVIRTD} --pid-file /run/libvirt/libvirtd.pid")
        with (self.root / "libvirtd.out").open("wb") as out:
            self.popen = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "bash", "-c", "\n".join(lines)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"libvirtd of {self.name} exited with {self.popen.returncode}\n{self.logs()}"
                )
            if self.daemon_socket.exists():
                answer = self.virsh("version", check=False)
                if answer.returncode == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"libvirtd of {self.name} did not answer in {START_TIMEOUT_S:g} s\n"
                    f"{self.logs()}"
                )
            time.sleep(_POLL_S)
        self.mount_ns = os.readlink(f"/proc/{self.pid}/ns/mnt")
        assert self.mount_ns != os.readlink("/proc/self/ns/mnt"), "libvirtd is not unshared"

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and kill every process left in its
        namespace (QEMU, relays, forwarders started there); safe to call twice."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.mount_ns is not None:
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while pids := self.processes():
                if time.monotonic() > deadline:
                    raise AssertionError(f"processes of {self.name} outlived SIGKILL: {pids}")
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(_POLL_S)

    def processes(self) -> list[int]:
        """The live processes in the host's mount namespace (zombies do not count)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") != self.mount_ns:
                    continue
                stat = Path(f"/proc/{entry}/stat").read_text(encoding="ascii", errors="replace")
            except OSError:  # gone meanwhile, or a zombie (no namespace links)
                continue
            if stat.rpartition(")")[2].split()[0] != "Z":
                found.append(int(entry))
        return found

    def logs(self, lines: int = 40) -> str:
        """The tail of the daemon's output and log, and of each QEMU's log."""
        parts = []
        files = [self.root / "libvirtd.out", self.outside("/var/log/libvirt/libvirtd.log")]
        files += sorted(self.outside("/var/log/libvirt/qemu").glob("*.log"))
        for path in files:
            with contextlib.suppress(OSError):
                tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
                parts.append(f"----- {self.name}: {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- virsh ---------------------------------------------------------------------

    def virsh(
        self, *args: str, check: bool = True, timeout: float = VIRSH_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c URI ARGS...`` against this host's daemon.

        Raises:
            AssertionError: ``check`` and virsh failed; the message has the logs.
        """
        result = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"virsh {shlex.join(args)} on {self.name} exited with {result.returncode}: "
                f"{result.stderr.strip()}\n{self.logs()}"
            )
        return result

    def domain_state(self, domain: str) -> str | None:
        """``virsh domstate``'s answer (``running``, ``paused``...), None without one."""
        result = self.virsh("domstate", domain, check=False)
        return result.stdout.strip() if result.returncode == 0 else None

    def destroy_all(self) -> None:
        """Destroy every running domain and undefine every defined one."""
        for domain in self.virsh("list", "--name").stdout.split():
            self.virsh("destroy", domain, check=False)
        for domain in self.virsh("list", "--all", "--name").stdout.split():
            self.virsh("undefine", domain, check=False)

    def create_paused(self, xml: str, domain: str) -> None:
        """Start a transient domain from ``xml``, paused (its CPU never runs)."""
        path = self.root / f"{domain}.xml"
        path.write_text(xml, encoding="utf-8")
        self.virsh("create", str(path), "--paused")

    def ram_file(self, domain: str) -> Path:
        """The running domain's RAM file, as the test sees it: libvirt names it
        ``/var/lib/libvirt/qemu/ram/ID-NAME/pc.ram``, NAME cut to 20 characters (its
        "short name")."""
        domain_id = self.virsh("domid", domain).stdout.strip()
        path = self.outside(f"/var/lib/libvirt/qemu/ram/{domain_id}-{domain[:20]}/pc.ram")
        assert path.is_file(), f"{self.name}: no RAM file {path} for {domain}"
        return path


def domain_xml(domain: str, ram_bytes: int = RAM_BYTES, disk: str | None = None) -> str:
    """A TCG domain without display, devices or guest; RAM in a shared file, and
    ``disk`` (a raw image's path inside the host) as a virtio disk when given."""
    disk_xml = ""
    if disk is not None:
        disk_xml = f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>"""
    return f"""<domain type='qemu'>
  <name>{domain}</name>
  <memory unit='KiB'>{ram_bytes // 1024}</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
  </memoryBacking>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disk_xml}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def write_random(path: Path, size: int, seed: int, *, in_place: bool = False) -> None:
    """Write ``size`` random bytes (the same for the same ``seed``) to ``path``:
    a new file, or over an existing one's first bytes (``in_place``)."""
    rng = random.Random(seed)
    with path.open("r+b" if in_place else "wb") as file:
        left = size
        while left:
            chunk = min(left, 4 * MIB)
            file.write(rng.randbytes(chunk))
            left -= chunk


class Forwarders:
    """Processes each forwarding one unix socket to another, as libvirt's own migration
    tests do with socat, but keeping the order of connections
    (`tests.libvirt.ordered_forward`); all stopped by `stop_all`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.popens: list[subprocess.Popen[bytes]] = []

    def start(self, listen: Path, target: Path) -> None:
        """Forward every connection to ``listen`` to ``target``; wait until it listens."""
        with (self.log_dir / f"socat-{len(self.popens)}.log").open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, str(ORDERED_FORWARD), str(listen), str(target)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.popens.append(popen)
        deadline = time.monotonic() + FORWARDER_START_S
        while not listen.is_socket():
            if popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the forwarder did not listen on {listen}")
            time.sleep(_POLL_S)

    def stop_all(self) -> None:
        """SIGTERM each forwarder's process group (SIGKILL after a while); reap them."""
        for popen in self.popens:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()


@dataclass(frozen=True)
class MigrationCase:
    """One ``virsh migrate`` form."""

    name: str
    #: ``--p2p``: the source daemon reaches the destination's itself, through
    #: `LIBVIRT_SOCKET`; else virsh (the test process) does, through the same socket
    #: (`rpc_socket_for`).
    p2p: bool
    flags: tuple[str, ...] = ()
    #: The domain has a disk, copied with ``--copy-storage-all`` through `NBD_SOCKET`.
    disk: bool = False
    #: The domain runs (libvirt refuses postcopy for a paused one): its firmware finds
    #: no boot device and halts, having written a few hundred pages of its RAM, which
    #: `check_arrived` then allows to differ (`FIRMWARE_BYTES`).
    running: bool = False
    #: Switch to postcopy while the first pass runs (`virsh migrate-postcopy`, as an
    #: operator would), and check that the switch was taken: with an idle guest the
    #: first pass alone would complete the migration, and ``--postcopy-after-precopy``
    #: would never switch. ``--bandwidth`` (MiB/s) on top of the printed command keeps
    #: that pass long enough to be caught.
    switch_to_postcopy: bool = False


#: ``--bandwidth`` of the switching case: 64 MiB take 4 s, the switch comes within 1.
SWITCH_BANDWIDTH_MIB_S = 16
#: How long the switching case tries `virsh migrate-postcopy` (libvirt refuses it until
#: its migration job is running).
SWITCH_TIMEOUT_S = 30.0 * FACTOR


#: The forms of issue 16.
CASES = (
    MigrationCase("precopy", p2p=False),
    MigrationCase("p2p", p2p=True),
    MigrationCase("copy-storage-all", p2p=True, flags=("--copy-storage-all",), disk=True),
    MigrationCase("parallel", p2p=True, flags=("--parallel", "--parallel-connections", "2")),
    MigrationCase(
        "postcopy",
        p2p=True,
        flags=("--postcopy", "--postcopy-after-precopy"),
        running=True,
        switch_to_postcopy=True,
    ),
)


def migrate_command(case: MigrationCase, domain: str, rpc_socket: str) -> list[str]:
    """The ``virsh migrate`` arguments of ``case`` (run against the source), in the
    order the README prints them, with the destination daemon reached at ``rpc_socket``.

    Without ``--p2p`` virsh itself connects to the destination daemon, so ``rpc_socket``
    is a path where virsh runs (the test's namespace: `rpc_socket_for`); with it the
    source daemon does, inside its own namespace, at `LIBVIRT_SOCKET`.
    """
    args = ["migrate", "--live", *(["--p2p"] if case.p2p else []), *case.flags, domain]
    args += [f"qemu+unix:///system?socket={rpc_socket}"]
    args += ["--migrateuri", f"unix://{MIGRATION_SOCKET}"]
    if case.disk:
        args += ["--disks-uri", f"unix://{NBD_SOCKET}"]
    return args


def rpc_socket_for(case: MigrationCase, src: LibvirtHost) -> str:
    """Where the process that opens the destination daemon (virsh, or the source daemon
    with ``--p2p``) finds the source's `LIBVIRT_SOCKET`."""
    return LIBVIRT_SOCKET if case.p2p else str(src.outside(LIBVIRT_SOCKET))


def differing_pages(path_a: Path, path_b: Path) -> list[int]:
    """The offsets of the 4 KiB pages that differ between two files of one size."""
    size = path_a.stat().st_size
    assert path_b.stat().st_size == size, f"{path_b} is not {size} bytes"
    pages = []
    with path_a.open("rb") as file_a, path_b.open("rb") as file_b:
        for offset in range(0, size, PAGE_BYTES):
            if file_a.read(PAGE_BYTES) != file_b.read(PAGE_BYTES):
                pages.append(offset)
    return pages


def run_case(
    src: LibvirtHost, dst: LibvirtHost, case: MigrationCase, domain: str, seed: int
) -> float:
    """Migrate a paused domain of random RAM (and disk) from ``src`` to ``dst``; check
    that it arrived byte for byte and left the source; return ``virsh migrate``'s wall
    time in seconds.

    Raises:
        AssertionError: the migration failed, or something differs.
    """
    expected_ram = prepare_domain(src, dst, case, domain, seed)
    start = time.monotonic()
    command = migrate_command(case, domain, rpc_socket_for(case, src))
    if case.switch_to_postcopy:
        migrate_switching_to_postcopy(src, domain, command)
    else:
        src.virsh(*command, timeout=MIGRATION_TIMEOUT_S)
    elapsed = time.monotonic() - start
    check_arrived(src, dst, case, domain, expected_ram)
    return elapsed


def migrate_switching_to_postcopy(src: LibvirtHost, domain: str, command: list[str]) -> None:
    """Run ``virsh migrate`` (``command``, at `SWITCH_BANDWIDTH_MIB_S`) and switch it to
    postcopy while it runs.

    Raises:
        AssertionError: the switch was not taken before the migration ended, or the
            migration failed.
    """
    rate = str(SWITCH_BANDWIDTH_MIB_S)
    argv = ["virsh", "-q", "-c", src.uri, *command, "--bandwidth", rate]
    # The postcopy phase at the same rate: long enough (seconds) to be seen.
    argv += ["--postcopy-bandwidth", rate]
    migrate = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        refusals: list[str] = []
        while migrate.poll() is None and time.monotonic() < deadline:
            answer = src.virsh("migrate-postcopy", domain, check=False)
            if answer.returncode == 0:
                break
            refusals.append(answer.stderr.strip())  # no migration job yet
            time.sleep(_POLL_S)
        else:
            raise AssertionError(
                f"virsh migrate-postcopy {domain} was never accepted while the migration"
                f" ran: {refusals[-3:]}\n{src.logs()}"
            )
        # The source is paused in postcopy until the destination has every page.
        states: list[str] = []
        while migrate.poll() is None and time.monotonic() < deadline + MIGRATION_TIMEOUT_S:
            states.append(src.virsh("domstate", "--reason", domain, check=False).stdout.strip())
            time.sleep(_POLL_S)
        _out, err = migrate.communicate(timeout=MIGRATION_TIMEOUT_S)
        assert any("post-copy" in state for state in states), (states, src.logs())
    finally:
        if migrate.poll() is None:
            migrate.kill()
            migrate.wait()
    assert migrate.returncode == 0, (
        f"virsh migrate exited {migrate.returncode}: {err}\n{src.logs()}"
    )


def disk_image(domain: str) -> str:
    """The path, inside both hosts, of ``domain``'s disk image."""
    return f"/var/lib/libvirt/images/{domain}.raw"


def prepare_domain(
    src: LibvirtHost, dst: LibvirtHost, case: MigrationCase, domain: str, seed: int
) -> Path:
    """Start a paused domain of random RAM (and disk, with an empty image of its size on
    ``dst``) on ``src``; return the file of the RAM it holds (for `check_arrived`)."""
    image = disk_image(domain)
    if case.disk:
        for host in (src, dst):
            host.outside(image).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_random(src.outside(image), DISK_BYTES, seed + 1)
        # libvirt copies storage only into an image that exists, of the same size.
        with dst.outside(image).open("wb") as file:
            file.truncate(DISK_BYTES)
    src.create_paused(domain_xml(domain, disk=image if case.disk else None), domain)
    expected_ram = src.root / f"{domain}.expected-ram"
    write_random(expected_ram, RAM_BYTES, seed)
    # Through the file QEMU maps shared: the guest's RAM now holds these bytes.
    with expected_ram.open("rb") as source, src.ram_file(domain).open("r+b") as ram:
        shutil.copyfileobj(source, ram, 4 * MIB)
    assert first_difference(expected_ram, src.ram_file(domain)) is None
    if case.running:
        src.virsh("resume", domain)
    return expected_ram


def check_arrived(
    src: LibvirtHost, dst: LibvirtHost, case: MigrationCase, domain: str, expected_ram: Path
) -> None:
    """Check that ``domain`` left ``src`` and arrived on ``dst`` byte for byte.

    Raises:
        AssertionError: it did not, or something differs.
    """
    image = disk_image(domain)
    assert dst.domain_state(domain) == ("running" if case.running else "paused"), dst.logs()
    assert src.domain_state(domain) is None, "the transient domain is still on the source"
    if case.running:
        pages = differing_pages(expected_ram, dst.ram_file(domain))
        assert len(pages) * PAGE_BYTES <= FIRMWARE_BYTES, f"{len(pages)} pages differ"
    else:
        difference = first_difference(expected_ram, dst.ram_file(domain))
        assert difference is None, f"destination RAM differs at byte {difference}"
    if case.disk:
        difference = first_difference(src.outside(image), dst.outside(image))
        assert difference is None, f"destination disk differs at byte {difference}"
    expected_ram.unlink()


@contextlib.contextmanager
def host_pair(root: Path) -> Iterator[tuple[LibvirtHost, LibvirtHost]]:
    """A source and a destination host under ``root``, stopped on exit."""
    src, dst = LibvirtHost(root, "src"), LibvirtHost(root, "dst")
    try:
        src.start()
        dst.start(capabilities_from=src)
        yield src, dst
    finally:
        try:
            dst.stop()
        finally:
            src.stop()
