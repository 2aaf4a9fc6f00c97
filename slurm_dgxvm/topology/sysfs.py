"""The one place that reads /sys.

A :class:`SysfsRoot` holds a root directory (``/`` on a real host, the output of ``dgxvm simulate``
otherwise) and turns every ``OSError`` or malformed value into a :class:`SysfsError` that names the
file. Path shapes are the named constants below; the fixture renderer writes the same shapes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import SysfsError
from ..ranges import parse_index_list

# Path shapes, relative to the root. ``{bdf}`` is a full PCI address (``0000:34:00.0``).
DMI_PRODUCT_NAME = "sys/class/dmi/id/product_name"
DMI_SYS_VENDOR = "sys/class/dmi/id/sys_vendor"
PCI_DEVICES = "sys/bus/pci/devices"              # one symlink per device into sys/devices/pci*/...
PCI_DEVICE = "sys/bus/pci/devices/{bdf}"
NODE_ONLINE = "sys/devices/system/node/online"
NODE_DIR = "sys/devices/system/node/node{node}"
NODE_CPULIST = NODE_DIR + "/cpulist"
NODE_MEMINFO = NODE_DIR + "/meminfo"
NODE_HUGEPAGES = NODE_DIR + "/hugepages"         # hugepages-<size>kB/{nr,free}_hugepages
CPU_ONLINE = "sys/devices/system/cpu/online"
CPU_TOPOLOGY = "sys/devices/system/cpu/cpu{cpu}/topology"
IOMMU_GROUPS = "sys/kernel/iommu_groups"
HUGEPAGES = "sys/kernel/mm/hugepages"            # the host's pools: hugepages-<size>kB/
HUGEPAGES_FREE = HUGEPAGES + "/{size}/free_hugepages"
MODULE = "sys/module/{name}"                     # a loaded (or built-in) kernel module
# A device's health signals and its reset (what the host can see of a GPU bound to vfio-pci).
# config: the config space (vendor id at offset 0, all ones when the device has fallen off the
# bus); reset: write "1" for a function-level or bus reset; reset_method: the methods the kernel
# will try, space separated ("flr bus"); aer_dev_*: AER counters, one "NAME COUNT" per line
# ending with TOTAL_ERR_COR / TOTAL_ERR_NONFATAL / TOTAL_ERR_FATAL (kernel
# Documentation/ABI/testing/sysfs-bus-pci-devices-aer_stats).
PCI_CONFIG = PCI_DEVICE + "/config"
PCI_RESET = PCI_DEVICE + "/reset"
PCI_RESET_METHOD = PCI_DEVICE + "/reset_method"
PCI_AER_CORRECTABLE = PCI_DEVICE + "/aer_dev_correctable"
PCI_AER_NONFATAL = PCI_DEVICE + "/aer_dev_nonfatal"
PCI_AER_FATAL = PCI_DEVICE + "/aer_dev_fatal"
# SR-IOV (kernel Documentation/ABI/testing/sysfs-bus-pci): a physical function's capability and
# the virtual functions enabled on it. sriov_vf_device is the VFs' device id in hex without 0x
# ("101c"); virtfn<N> links to VF N's device directory, and each VF's physfn back to its PF.
PCI_SRIOV_TOTALVFS = PCI_DEVICE + "/sriov_totalvfs"
PCI_SRIOV_NUMVFS = PCI_DEVICE + "/sriov_numvfs"
PCI_SRIOV_OFFSET = PCI_DEVICE + "/sriov_offset"
PCI_SRIOV_STRIDE = PCI_DEVICE + "/sriov_stride"
PCI_SRIOV_VF_DEVICE = PCI_DEVICE + "/sriov_vf_device"
PCI_VIRTFN = "virtfn{index}"                     # link attribute of a PF, one per enabled VF
PCI_PHYSFN = "physfn"                            # link attribute of a VF
# An InfiniBand HCA function's RDMA device (``mlx5_0``) and its node GUID, as four groups of four
# hex digits (``b8ce:f603:00a1:b2c4``; drivers/infiniband/core/sysfs.c).
PCI_INFINIBAND = PCI_DEVICE + "/infiniband"
PCI_NET = PCI_DEVICE + "/net"                    # the function's network interface(s): ibp12s0
PCI_IB_NODE_GUID = PCI_INFINIBAND + "/{ibdev}/node_guid"
# Written by `dgxvm simulate` beside sys/, never present on a real host: says which machine the
# tree imitates, so every output can declare that it is simulated.
SIMULATED_MARKER = ".dgxvm-simulated"

BDF_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_MEMTOTAL_RE = re.compile(r"MemTotal:\s+(\d+)\s*kB")
_HUGEPAGES_DIR_RE = re.compile(r"^hugepages-(\d+)kB$")


class SysfsRoot:
    """Reads sysfs files below ``root``; every failure is a SysfsError naming the file."""

    def __init__(self, root: str | os.PathLike = "/"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SysfsError(path=str(self.root), reason="not a directory")

    def path(self, shape: str, **fields) -> Path:
        return self.root / shape.format(**fields)

    # -- primitive readers ------------------------------------------------------------------------
    def read(self, shape: str, **fields) -> str:
        p = self.path(shape, **fields)
        try:
            return p.read_text(encoding="ascii", errors="strict").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SysfsError(path=str(p), reason=os_reason(exc)) from exc

    def read_bytes(self, shape: str, size: int, **fields) -> bytes:
        """The first ``size`` bytes of a binary attribute (a device's ``config``)."""
        p = self.path(shape, **fields)
        try:
            with open(p, "rb") as f:
                return f.read(size)
        except OSError as exc:
            raise SysfsError(path=str(p), reason=os_reason(exc)) from exc

    def read_optional(self, shape: str, **fields) -> str | None:
        """Like read(), but a file that does not exist is None (other errors still raise)."""
        p = self.path(shape, **fields)
        if not p.exists():
            return None
        return self.read(shape, **fields)

    def read_int(self, shape: str, base: int = 10, **fields) -> int:
        text = self.read(shape, **fields)
        try:
            return int(text, base)
        except ValueError:
            raise SysfsError(path=str(self.path(shape, **fields)),
                             reason=f"expected an integer, found {text!r}") from None

    def read_cpulist(self, shape: str, **fields) -> tuple[int, ...]:
        text = self.read(shape, **fields)
        try:
            return tuple(sorted(parse_index_list(text, what="CPU", allow_empty=True)))
        except Exception as exc:  # noqa: BLE001 - CpuListError: re-raised naming the file
            raise SysfsError(path=str(self.path(shape, **fields)), reason=str(exc)) from None

    def listdir(self, shape: str, **fields) -> list[str]:
        p = self.path(shape, **fields)
        try:
            return sorted(os.listdir(p))
        except OSError as exc:
            raise SysfsError(path=str(p), reason=os_reason(exc)) from exc

    def exists(self, shape: str, **fields) -> bool:
        return self.path(shape, **fields).exists()

    # -- composite readers ------------------------------------------------------------------------
    def simulated(self) -> dict | None:
        """The simulation marker's content, or None on a real host."""
        p = self.root / SIMULATED_MARKER
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise SysfsError(path=str(p), reason=os_reason(exc)) from exc

    def pci_addresses(self) -> list[str]:
        return [a for a in self.listdir(PCI_DEVICES) if BDF_RE.match(a)]

    def pci_attr(self, bdf: str, attr: str) -> str:
        return self.read(PCI_DEVICE + "/" + attr, bdf=bdf)

    def pci_attr_optional(self, bdf: str, attr: str) -> str | None:
        return self.read_optional(PCI_DEVICE + "/" + attr, bdf=bdf)

    def pci_upstream(self, bdf: str) -> tuple[str, ...]:
        """PCI addresses of the bridges above ``bdf``, root port first (from the device symlink).

        ``sys/bus/pci/devices/0000:34:00.0 -> ../../../devices/pci0000:2b/0000:2b:00.0/.../0000:34:00.0``
        gives ``("0000:2b:00.0", ..., "0000:33:00.0")``.
        """
        p = self.path(PCI_DEVICE, bdf=bdf)
        try:
            real = Path(os.path.realpath(p))
        except OSError as exc:
            raise SysfsError(path=str(p), reason=os_reason(exc)) from exc
        parts = [x for x in real.parts if BDF_RE.match(x)]
        if not parts or parts[-1] != bdf:
            raise SysfsError(path=str(p), reason=f"does not resolve into a PCI tree ({real})")
        return tuple(parts[:-1])

    def pci_link_name(self, bdf: str, link: str) -> str | None:
        """Basename of a symlink attribute (``iommu_group`` -> ``"42"``, ``driver`` -> ``"vfio-pci"``)."""
        p = self.path(PCI_DEVICE + "/" + link, bdf=bdf)
        if not p.is_symlink():
            return None
        try:
            return os.path.basename(os.readlink(p))
        except OSError as exc:
            raise SysfsError(path=str(p), reason=os_reason(exc)) from exc

    def node_ids(self) -> tuple[int, ...]:
        if not self.exists(NODE_ONLINE):
            return ()
        return self.read_cpulist(NODE_ONLINE)

    def node_memtotal_kib(self, node: int) -> int:
        text = self.read(NODE_MEMINFO, node=node)
        m = _MEMTOTAL_RE.search(text)
        if not m:
            raise SysfsError(path=str(self.path(NODE_MEMINFO, node=node)),
                             reason="no 'MemTotal: N kB' line")
        return int(m.group(1))

    def node_hugepages(self, node: int) -> dict[int, tuple[int, int]]:
        """``{size_kib: (nr_hugepages, free_hugepages)}`` for every pool on the node."""
        if not self.exists(NODE_HUGEPAGES, node=node):
            return {}
        pools: dict[int, tuple[int, int]] = {}
        for name in self.listdir(NODE_HUGEPAGES, node=node):
            m = _HUGEPAGES_DIR_RE.match(name)
            if not m:
                continue
            base = NODE_HUGEPAGES + "/" + name
            pools[int(m.group(1))] = (self.read_int(base + "/nr_hugepages", node=node),
                                      self.read_int(base + "/free_hugepages", node=node))
        return pools


def os_reason(exc: BaseException) -> str:
    """What went wrong, in the words a SysfsError or a reset report shows: an OSError's own
    strerror, lower case; else the exception's text or its type."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
