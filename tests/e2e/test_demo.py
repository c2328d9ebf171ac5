"""The README's first command, ``tools/demo``, run exactly as printed (no options: the
default 512 MiB VMs), from the checkout's root, as CI runs ``tools/test`` on a fresh clone.

It runs ``tools/setup`` (a no-op where everything is installed), migrates a VM between
two local QEMUs through ``serve``/``connect``/``incoming``/``migrate`` and compares the
RAM of both. The test holds it to what it prints when it worked: exit 0, ``migrate``'s
"completed in" summary and the byte-for-byte comparison of all 512 MiB. About 23 s here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from migrelay.units import MIB
from tests.helpers import FACTOR

pytestmark = pytest.mark.e2e

CHECKOUT = Path(__file__).resolve().parents[2]
#: The demo's default guest RAM (``tools/demo.py --ram``), which the test does not change.
DEMO_RAM_BYTES = 512 * MIB
#: 23 s on 2 shared cores (set-up check 5 s, QEMU start 10 s, migration 5 s); generous.
DEMO_TIMEOUT_S = 150.0 * FACTOR


def test_tools_demo_as_printed_migrates_and_finds_the_ram_identical() -> None:
    result = subprocess.run(
        ["tools/demo"],
        cwd=CHECKOUT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    told = f"exit {result.returncode}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
    assert result.returncode == 0, told
    # migrate's summary line, as the README shows it: the migration completed.
    assert re.search(
        r"^completed in [\d.]+ s: .* source stopped \(postmigrate\)$", result.stdout, re.M
    ), told
    # The relays' logs say the channel ended normally on both sides (who ended it first:
    # a relay cannot tell a completed migration from a cancelled one).
    assert result.stdout.count("closed: ended by the ") == 2, told
    # The comparison of every byte of RAM, source against destination.
    assert re.search(
        rf"^identical: {DEMO_RAM_BYTES} bytes \(\S+/src\.ram == \S+/dst\.ram\)$",
        result.stdout,
        re.M,
    ), told
    assert "RAM differs" not in result.stderr, told
