"""What a real kernel does when ``dgxvm host setup`` writes to sysfs, done to a simulated tree.

A plain file tree cannot react to writes: writing a PCI address to ``drivers/vfio-pci/bind``
binds nothing, and raising ``nr_hugepages`` allocates nothing. :class:`SimulatedBinder` and
:class:`SimulatedHugepages` have the methods of the real ones in :mod:`slurm_dgxvm.host.kernel`
and change the tree the way the kernel's own files would change: the device's ``driver`` link
and the driver's ``<bdf>`` link move; ``nr_hugepages`` and ``free_hugepages`` change together.
:func:`as_bare_metal` turns a rendered tree (a prepared VM host) into the host before setup:
GPUs and NVSwitches on NVIDIA's driver, no huge pages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SimulateError
from ..topology import sysfs as S
from .machines import MACHINES

# The host's own drivers on a DGX before it becomes a VM host. [INF: lspci -k on DGX OS]
HOST_DRIVERS = {"gpu": "nvidia", "nvswitch": "nvidia-nvswitch"}
_HUGEPAGE_FILE = S.NODE_HUGEPAGES + "/hugepages-{size}kB/{name}"


class SimulatedBinder:
    """Binds a simulated device to a driver by moving the links the kernel would move."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def driver(self, bdf: str) -> str | None:
        link = self.root / S.PCI_DEVICE.format(bdf=bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def bind(self, bdf: str, driver: str | None) -> None:
        """Unbind ``bdf`` from its driver, then bind it to ``driver`` (None: leave it unbound).
        Raises SimulateError when the device or the driver (its module not loaded) is absent."""
        dev_link = self.root / S.PCI_DEVICE.format(bdf=bdf)
        if not dev_link.exists():
            raise SimulateError(reason=f"no PCI device {bdf}", value=bdf)
        dev = Path(os.path.realpath(dev_link))
        if driver is not None and not (self.root / "sys/bus/pci/drivers" / driver).is_dir():
            raise SimulateError(reason=f"driver {driver} is not loaded (no "
                                       f"sys/bus/pci/drivers/{driver})", value=driver)
        old = self.driver(bdf)
        if old == driver:
            return
        if old is not None:
            (self.root / "sys/bus/pci/drivers" / old / bdf).unlink(missing_ok=True)
            (dev / "driver").unlink()
        if driver is not None:
            drv = self.root / "sys/bus/pci/drivers" / driver
            os.symlink(os.path.relpath(drv, dev), dev / "driver")
            os.symlink(os.path.relpath(dev, drv), drv / bdf)


class SimulatedHugepages:
    """A node's huge page pool in a simulated tree: the kernel gives every page asked for."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _file(self, node: int, size_kib: int, name: str) -> Path:
        return self.root / _HUGEPAGE_FILE.format(node=node, size=size_kib, name=name)

    def get(self, node: int, size_kib: int) -> int:
        return int(self._file(node, size_kib, "nr_hugepages").read_text())

    def set(self, node: int, size_kib: int, count: int) -> int:
        """Make the pool ``count`` pages; returns the pool's size afterwards (as the kernel's
        read-back). The pages in use stay in use: free changes by the difference."""
        nr, free = self._file(node, size_kib, "nr_hugepages"), self._file(node, size_kib,
                                                                          "free_hugepages")
        if not nr.exists():
            raise SimulateError(reason=f"node {node} has no {size_kib} kB huge page pool",
                                value=node)
        old_nr, old_free = int(nr.read_text()), int(free.read_text())
        used = old_nr - old_free
        count = max(count, used)
        nr.write_text(f"{count}\n")
        free.write_text(f"{count - used}\n")
        return count


def as_bare_metal(root: str | os.PathLike) -> None:
    """Make a rendered tree the host before ``dgxvm host setup``: every GPU and NVSwitch bound
    to NVIDIA's driver (the driver loaded), every huge page pool empty."""
    root = Path(root)
    marker = json.loads((root / S.SIMULATED_MARKER).read_text())
    machine = MACHINES[marker["machine"]]
    for driver in HOST_DRIVERS.values():
        (root / "sys/bus/pci/drivers" / driver).mkdir(parents=True, exist_ok=True)
    binder = SimulatedBinder(root)
    for _, _, dev in machine.walk():
        if dev.kind in HOST_DRIVERS and (root / S.PCI_DEVICE.format(bdf=dev.bdf)).exists():
            binder.bind(dev.bdf, HOST_DRIVERS[dev.kind])
    pages = SimulatedHugepages(root)
    for node in machine.nodes:
        for size in node.hugepages:
            pages.set(node.id, size, 0)
