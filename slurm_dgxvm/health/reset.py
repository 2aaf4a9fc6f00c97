"""Reset devices through sysfs: in parallel, each timed, the whole bounded.

Writing ``1`` to ``sys/bus/pci/devices/<bdf>/reset`` makes the kernel reset the function with
the first method of ``reset_method`` that works (``flr``, ``bus``, ...; a GPU bound to vfio-pci
with no VM using it can be reset this way). The write returns when the reset is done, or fails
with the kernel's errno. A write that never returns (a device that hangs the reset) is not waited
for past ``timeout_s``: its thread is left behind (a daemon thread: it never keeps the process
alive) and the reset counts as failed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SysfsError
from ..topology import sysfs as S
from ..topology.sysfs import SysfsRoot, os_reason


@dataclass(frozen=True)
class ResetResult:
    """One device's reset: ``ok``, its seconds (the timeout when it did not finish), the
    methods the kernel offered (``reset_method``; None when the file is absent) and why it
    failed."""

    pci: str
    ok: bool
    seconds: float
    method: str | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return {"ok": self.ok, "s": self.seconds, "method": self.method, "error": self.error}


def reset_devices(sysfs: SysfsRoot, pcis: Iterable[str], *, timeout_s: float
                  ) -> dict[str, ResetResult]:
    """Reset every device of ``pcis`` at once; return each one's result, in ``pcis``' order.
    Waits at most ``timeout_s`` for them all."""
    pcis = list(dict.fromkeys(pcis))
    results: dict[str, ResetResult] = {}
    lock = threading.Lock()
    start = time.monotonic()

    def one(pci: str) -> None:
        res = _reset_one(sysfs, pci)
        with lock:
            results.setdefault(pci, res)

    threads = [threading.Thread(target=one, args=(pci,), name=f"reset {pci}", daemon=True)
               for pci in pcis]
    for t in threads:
        t.start()
    deadline = start + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        for pci in pcis:
            results.setdefault(pci, ResetResult(
                pci=pci, ok=False, seconds=round(timeout_s, 3), method=_method(sysfs, pci),
                error=f"the reset did not finish within {timeout_s:g}s"))
        return {pci: results[pci] for pci in pcis}


def _reset_one(sysfs: SysfsRoot, pci: str) -> ResetResult:
    t0 = time.monotonic()
    method = _method(sysfs, pci)
    path = sysfs.path(S.PCI_RESET, bdf=pci)
    error = None
    if not sysfs.exists(S.PCI_DEVICE, bdf=pci):
        error = "not on the PCI bus"
    elif not path.exists():
        error = f"{path} does not exist (the kernel offers no reset for it)"
    else:
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError as exc:
            error = f"writing {path}: {os_reason(exc)}"
    return ResetResult(pci=pci, ok=error is None, seconds=round(time.monotonic() - t0, 3),
                       method=method, error=error)


def _method(sysfs: SysfsRoot, pci: str) -> str | None:
    try:
        return sysfs.read_optional(S.PCI_RESET_METHOD, bdf=pci) or None
    except SysfsError:
        return None
