"""What the host itself can see of a GPU or NVSwitch bound to vfio-pci: the facts, no judgement.

A device passed through to a VM has no host driver, so ``nvidia-smi`` and NVML see nothing of it.
What is left is the PCI layer, read through :class:`~slurm_dgxvm.topology.SysfsRoot` (the real
``/sys`` or a simulated tree):

* present: the device is on the bus (``sys/bus/pci/devices/<bdf>`` exists);
* config space: its first bytes read, and the vendor id at offset 0. A device that has fallen off
  the bus (a GPU's Xid 79) answers every config read with all ones, so the vendor reads 0xffff;
* AER counters: ``aer_dev_correctable``, ``aer_dev_nonfatal``, ``aer_dev_fatal`` (the kernel's
  totals, ``TOTAL_ERR_COR`` / ``TOTAL_ERR_NONFATAL`` / ``TOTAL_ERR_FATAL``; kernel
  Documentation/ABI/testing/sysfs-bus-pci-devices-aer_stats). They count since the host booted
  and never go down while it runs.

Nothing here comes from a guest: a tenant, root in its VM, cannot write any of it (the threat
model's "a tenant must not get a GPU quarantined by what its own guest reports").
:mod:`.policy` turns these facts into a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SysfsError
from ..topology import sysfs as S
from ..topology.sysfs import SysfsRoot

CONFIG_BYTES = 64          # the standard header: what an unprivileged read of `config` returns
AER_FILES = {"correctable": (S.PCI_AER_CORRECTABLE, "TOTAL_ERR_COR"),
             "nonfatal": (S.PCI_AER_NONFATAL, "TOTAL_ERR_NONFATAL"),
             "fatal": (S.PCI_AER_FATAL, "TOTAL_ERR_FATAL")}


@dataclass(frozen=True)
class AerCounts:
    """A device's AER totals since the host booted."""

    correctable: int = 0
    nonfatal: int = 0
    fatal: int = 0

    def to_json(self) -> dict:
        return {"correctable": self.correctable, "nonfatal": self.nonfatal, "fatal": self.fatal}

    @classmethod
    def from_json(cls, doc) -> AerCounts:
        return cls(**{k: int(doc[k]) for k in ("correctable", "nonfatal", "fatal")})


@dataclass(frozen=True)
class DeviceFacts:
    """One device, as read now. ``vendor`` None: config space unreadable (``config_error``
    says why); ``aer`` None: the device (or the kernel) has no AER statistics."""

    pci: str
    present: bool
    vendor: int | None = None
    config_error: str | None = None
    aer: AerCounts | None = None


def probe(sysfs: SysfsRoot, pci: str) -> DeviceFacts:
    """Read ``pci``'s facts. Never raises for the device's own faults: an unreadable file is
    a fact (``config_error``), not an error."""
    if not sysfs.exists(S.PCI_DEVICE, bdf=pci):
        return DeviceFacts(pci=pci, present=False)
    vendor, config_error = None, None
    try:
        head = sysfs.read_bytes(S.PCI_CONFIG, CONFIG_BYTES, bdf=pci)
        if len(head) < 2:
            config_error = f"config space read {len(head)} byte(s)"
        else:
            vendor = int.from_bytes(head[0:2], "little")
    except SysfsError as exc:
        config_error = exc.reason
    return DeviceFacts(pci=pci, present=True, vendor=vendor, config_error=config_error,
                       aer=_aer(sysfs, pci))


def _aer(sysfs: SysfsRoot, pci: str) -> AerCounts | None:
    counts = {}
    for key, (shape, total) in AER_FILES.items():
        try:
            text = sysfs.read_optional(shape, bdf=pci)
        except SysfsError:
            text = None
        if text is None:
            return None
        counts[key] = _total(text, total)
        if counts[key] is None:
            return None
    return AerCounts(**counts)


def _total(text: str, name: str) -> int | None:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name and parts[1].isdigit():
            return int(parts[1])
    return None
