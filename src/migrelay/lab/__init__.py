"""The lab: test VMs, two-host network namespaces and the migration benchmark.

This is harness, not product (as QEMU keeps ``qemu.machine`` apart from ``qemu.qmp``):
it starts disposable QEMUs (`vm`), joins two network namespaces with a shaped veth
(`netns`) and times migrations against direct TCP (`bench`, behind ``migrelay bench``).
The relay (`migrelay.core`, `migrelay.aio`) and the control layer (`migrelay.control`)
never import it; ``tests/test_layering.py`` checks that.
"""

from __future__ import annotations
