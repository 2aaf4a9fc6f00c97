"""The GPU health signals of a simulated PCI device: what its config space, reset and AER files hold.

Shared by the renderer (a fresh tree: every device healthy) and :mod:`.faults` (a changed one).
Path shapes are :mod:`slurm_dgxvm.topology.sysfs`'s ``PCI_CONFIG``, ``PCI_RESET``,
``PCI_RESET_METHOD`` and ``PCI_AER_*``; these are the files' basenames in a device's directory.

config
    256 bytes, binary. The first 64 are the standard header as Linux's ``config`` file reads to a
    reader without CAP_SYS_ADMIN: vendor id (u16, little-endian) at 0, device id at 2, revision at
    8, class code at 9..11 (prog-if, subclass, base class), header type at 0x0e (0 for an endpoint,
    1 for a PCI-to-PCI bridge, bit 7 for a multi-function device), and for an endpoint (type 0
    header) subsystem vendor/device at 0x2c/0x2e. Command, status, BARs, interrupt line and the
    capability pointer read zero, and so does everything after byte 63. A real root reader sees
    the capability list and, for a PCIe device, 4096 bytes: the fixture does not imitate those
    [INF: kept simple for the fixture]. A device that has fallen off the bus reads all ones.
reset
    An empty regular file; writing ``1`` to it is the reset. On the simulated tree the write simply
    succeeds (and leaves ``1`` in the file, which a real, write-only ``reset`` never shows).
reset_method
    The methods the kernel will try, space separated: ``flr bus`` for a GPU, ``bus`` for an
    NVSwitch. Other devices get neither ``reset`` nor ``reset_method``: nothing resets them here.
aer_dev_correctable, aer_dev_nonfatal, aer_dev_fatal
    The kernel's AER counters: one ``NAME COUNT`` line per named error bit, then
    ``TOTAL_ERR_COR`` / ``TOTAL_ERR_NONFATAL`` / ``TOTAL_ERR_FATAL``. Every device of the fixture
    has them (all PCIe devices here are taken to have the AER capability [INF]).
"""

from __future__ import annotations

import os
import struct

from ..topology import sysfs as S

CONFIG = os.path.basename(S.PCI_CONFIG)
RESET = os.path.basename(S.PCI_RESET)
RESET_METHOD = os.path.basename(S.PCI_RESET_METHOD)
AER_CORRECTABLE = os.path.basename(S.PCI_AER_CORRECTABLE)
AER_NONFATAL = os.path.basename(S.PCI_AER_NONFATAL)
AER_FATAL = os.path.basename(S.PCI_AER_FATAL)

CONFIG_SIZE = 256
#: what config space reads on a device that no longer answers (a GPU "fallen off the bus", Xid 79)
FELL_OFF_BUS_CONFIG = b"\xff" * CONFIG_SIZE
_CLASS_PCI_BRIDGE = 0x0604        # base class 06, subclass 04: PCI-to-PCI bridge (type 1 header)

# Reset methods by device kind (sysfs reset_method, kernel >= 5.15). GPUs: function-level reset,
# then a secondary bus reset [INF: A100/H100 advertise FLR; not seen in real reset_method output].
# NVSwitches: bus reset only [INF: no FLR assumed]. Other kinds: no reset files (nothing resets them).
RESET_METHODS = {"gpu": "flr bus", "nvswitch": "bus"}

# The names the kernel prints for each error bit, in bit order, as in drivers/pci/pcie/aer.c
# (aer_correctable_error_string / aer_uncorrectable_error_string) of the Ubuntu 22.04 (5.15)
# kernel, which DGX OS 6 runs [INF: the host's kernel]. Recent mainline kernels name five more
# uncorrectable bits after PoisonTLPBlocked (DMWrReqBlocked, IDECheck, MisIDETLP, PCRC_CHECK,
# TLPXlatBlocked); the fixture keeps the 5.15 list. A bit without a name prints only when its
# count is non-zero (``dev_fatal_errs_bit[N] COUNT``); the fixture never counts one.
AER_CORRECTABLE_BUCKETS = ("RxErr", "BadTLP", "BadDLLP", "Rollover", "Timeout", "NonFatalErr",
                           "CorrIntErr", "HeaderOF")
AER_UNCORRECTABLE_BUCKETS = ("Undefined", "DLP", "SDES", "TLP", "FCP", "CmpltTO", "CmpltAbrt",
                             "UnxCmplt", "RxOF", "MalfTLP", "ECRC", "UnsupReq", "ACSViol",
                             "UncorrIntErr", "BlockedTLP", "AtomicOpBlocked", "TLPBlockedErr",
                             "PoisonTLPBlocked")
#: file basename -> (its buckets, the name of its total line)
AER_FILES = {
    AER_CORRECTABLE: (AER_CORRECTABLE_BUCKETS, "TOTAL_ERR_COR"),
    AER_NONFATAL: (AER_UNCORRECTABLE_BUCKETS, "TOTAL_ERR_NONFATAL"),
    AER_FATAL: (AER_UNCORRECTABLE_BUCKETS, "TOTAL_ERR_FATAL"),
}


def header_type(class_code: int, multifunction: bool) -> int:
    return (0x01 if class_code >> 8 == _CLASS_PCI_BRIDGE else 0x00) | (0x80 if multifunction else 0)


def config_space(*, vendor: int, device: int, revision: int, class_code: int,
                 subsystem_vendor: int, subsystem_device: int, multifunction: bool = False) -> bytes:
    """The 256 bytes of a healthy device's ``config`` (layout in the module docstring)."""
    buf = bytearray(CONFIG_SIZE)
    struct.pack_into("<HH", buf, 0x00, vendor, device)
    buf[0x08] = revision
    buf[0x09:0x0c] = class_code.to_bytes(3, "little")
    htype = header_type(class_code, multifunction)
    buf[0x0e] = htype
    if htype & 0x7f == 0:         # type 0 header: subsystem ids; a bridge keeps its own there
        struct.pack_into("<HH", buf, 0x2c, subsystem_vendor, subsystem_device)
    return bytes(buf)


def aer_text(name: str, counts: dict[str, int] | None = None, total: int = 0) -> str:
    """The text of AER counter file ``name`` (a basename of AER_FILES), newline-terminated."""
    buckets, total_name = AER_FILES[name]
    counts = counts or {}
    lines = [f"{b} {counts.get(b, 0)}" for b in buckets] + [f"{total_name} {total}"]
    return "\n".join(lines) + "\n"


def parse_aer(text: str) -> dict[str, int]:
    """``NAME COUNT`` lines -> ``{NAME: COUNT}`` (the total line included). ValueError if malformed."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, count = line.rpartition(" ")
        if not sep or not name or not count.isdigit():
            raise ValueError(f"not a 'NAME COUNT' line: {line!r}")
        counts[name] = int(count)
    return counts
