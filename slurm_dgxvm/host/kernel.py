"""The writes ``dgxvm host setup`` and ``revert`` make to sysfs: binding a PCI device to a
driver, and sizing a NUMA node's huge page pool. The real ones are here; a simulated tree gets
:mod:`slurm_dgxvm.simulate.hostops`'s twins, which have the same methods (:func:`for_roots`
picks). Every OSError becomes a HostError naming the file.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ..errors import HostError
from ..topology import sysfs as S

_DRIVERS = "sys/bus/pci/drivers"


class SysfsBinder:
    """Driver binding by the kernel's documented files (Documentation/ABI/testing/sysfs-bus-pci):
    ``driver_override`` names the only driver that may take the device, ``drivers/<old>/unbind``
    lets it go, ``drivers_probe`` hands it to the driver ``driver_override`` names."""

    def __init__(self, root: str | os.PathLike = "/"):
        self.root = Path(root)

    def driver(self, bdf: str) -> str | None:
        link = self.root / S.PCI_DEVICE.format(bdf=bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def bind(self, bdf: str, driver: str | None) -> None:
        if driver is not None and not (self.root / _DRIVERS / driver).is_dir():
            # vfio-pci is a module; loading it is the one thing binding needs first
            subprocess.run(["modprobe", driver.replace("-", "_")], check=False,
                           capture_output=True, timeout=60)
        dev = self.root / S.PCI_DEVICE.format(bdf=bdf)
        # the host's own driver: no override, so the kernel matches the device by its id again
        _write(dev / "driver_override", (driver if driver == "vfio-pci" else "") + "\n")
        old = self.driver(bdf)
        if old is not None and old != driver:
            _write(self.root / _DRIVERS / old / "unbind", bdf)
        if driver is not None and self.driver(bdf) != driver:
            _write(self.root / "sys/bus/pci/drivers_probe", bdf)
        now = self.driver(bdf)
        if now != driver:
            raise HostError(reason=f"{bdf} is bound to {now or 'no driver'} after binding it "
                                   f"to {driver} (dmesg says why)")


class SysfsHugepages:
    """A NUMA node's pool: ``nodeN/hugepages/hugepages-<size>kB/nr_hugepages`` (kernel
    Documentation/admin-guide/mm/hugetlbpage.rst). The kernel may give fewer pages than asked
    (fragmented memory): :meth:`set` returns what it gave."""

    def __init__(self, root: str | os.PathLike = "/"):
        self.root = Path(root)

    def _nr(self, node: int, size_kib: int) -> Path:
        return self.root / S.NODE_HUGEPAGES.format(node=node) / f"hugepages-{size_kib}kB" \
            / "nr_hugepages"

    def get(self, node: int, size_kib: int) -> int:
        try:
            return int(self._nr(node, size_kib).read_text())
        except (OSError, ValueError) as exc:
            raise HostError(reason=f"cannot read {self._nr(node, size_kib)}: {exc}") from None

    def set(self, node: int, size_kib: int, count: int) -> int:
        _write(self._nr(node, size_kib), f"{count}\n")
        return self.get(node, size_kib)


def _write(path: Path, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise HostError(reason=f"cannot write {text.strip()!r} to {path}: "
                               f"{exc.strerror or exc}") from None


def for_roots(roots):
    """(binder, hugepages) for ``roots``: the simulated ones on a simulated tree."""
    if roots.simulated is not None:
        from ..simulate.hostops import SimulatedBinder, SimulatedHugepages
        return SimulatedBinder(roots.sysfs.root), SimulatedHugepages(roots.sysfs.root)
    return SysfsBinder(roots.sysfs.root), SysfsHugepages(roots.sysfs.root)
