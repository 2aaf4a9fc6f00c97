"""Render a machine description as a fake sysfs tree that SysfsRoot reads like a real host.

Shapes are those of :mod:`slurm_dgxvm.topology.sysfs`. Every symlink is relative, so the tree can
be moved. Every PCI device also gets the health signals of :mod:`.signals` (config space, AER
counters; GPUs and NVSwitches a ``reset`` and ``reset_method``), all healthy. The output
directory is only ever replaced when it holds our marker (``SIMULATED_MARKER``): a user's
non-empty directory is refused, never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..errors import SimulateError
from ..ranges import format_index_list
from ..topology import sysfs as S
from . import signals as SIG
from .faults import check_kind, inject_all
from .machines import DEFAULT_IB_VFS, HUGEPAGE_2M_KIB, MACHINES, Machine, PciDevice

NOTE = "simulated by dgxvm simulate; not a real host"
# Memory the OS itself uses on each node, outside the hugepage pools. [INF: invented for the fixture]
_OS_USED_KIB = 2 * 1024 * 1024
_SHORT_BDF_RE = re.compile(r"^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
# Beside sys/, the few files of a prepared VM host that `dgxvm host check` reads elsewhere: the
# kernel command line and CPU vendor (proc/), the KVM device (dev/kvm), and the modules a VM
# host has loaded (sys/module/). [INF: the host setup for VMs]
PROC_CMDLINE = "proc/cmdline"
PROC_CPUINFO = "proc/cpuinfo"
DEV_KVM = "dev/kvm"
_VM_HOST_MODULES = ("vfio", "vfio_pci", "vfio_iommu_type1", "kvm")


def render(machine: str | Machine, out: str | os.PathLike, *, missing_gpus: Iterable[str] = (),
           unknown_numa: Iterable[str] = (),
           faults: Iterable[tuple[str | int, str]] = (), ib_vfs: int = DEFAULT_IB_VFS,
           serial: int = 0) -> Path:
    """Write ``machine``'s sysfs tree under ``out`` and return ``out`` as a Path.

    ``ib_vfs``: SR-IOV virtual functions enabled on each SR-IOV capable HCA (the compute HCAs of
    the DGX A100 and H100; ``sriov_numvfs``), each bound to vfio-pci in an IOMMU group of its
    own; 0 leaves SR-IOV off. The DGX-2's HCAs have no SR-IOV here.

    ``serial``: the machine's serial number, 0..65535, which its HCAs' GUIDs carry: the nodes
    of one simulated cluster need different ones (a real fabric's GUIDs are unique).

    ``missing_gpus``: GPU addresses left out entirely (failed to enumerate). ``unknown_numa``:
    device addresses whose ``numa_node`` reads ``-1`` (BIOS quirk). ``faults``: ``(gpu, kind)``
    pairs applied in order to the fresh tree by :func:`.faults.inject_all` (GPU indices count
    the GPUs rendered, after ``missing_gpus``, before any fault). Raises SimulateError for an
    unknown machine, an address that is not a GPU / device of the machine, a bad fault, or an
    ``out`` that is non-empty and was not written by us; ``out`` is then left as it was.
    """
    m = _machine(machine)
    by_bdf = {d.bdf: d for _, _, d in m.walk()}
    missing = _bdfs(missing_gpus, "missing_gpus", m,
                    lambda b: b in by_bdf and by_bdf[b].kind == "gpu", "a GPU")
    unknown = _bdfs(unknown_numa, "unknown_numa", m, lambda b: b in by_bdf, "a PCI device")
    faults = _faults(faults, m, missing)
    most = max((d.sriov.total_vfs for d in m.devices if d.sriov), default=0)
    if isinstance(ib_vfs, bool) or not isinstance(ib_vfs, int) or ib_vfs < 0 or (most and ib_vfs > most):
        raise SimulateError(reason=f"ib_vfs: {ib_vfs!r} VFs per HCA port is not 0..{most} "
                                   f"(sriov_totalvfs of {m.key}'s HCAs)", value=ib_vfs)
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 <= serial <= 0xFFFF:
        raise SimulateError(reason=f"serial: {serial!r} is not 0..65535", value=serial)

    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)                               # mkdtemp makes it 0700
        _write_tree(m, tmp, missing, unknown, ib_vfs, serial)
        inject_all(tmp, faults)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- arguments -------------------------------------------------------------------------------------
def _machine(machine) -> Machine:
    if isinstance(machine, Machine):
        return machine
    if isinstance(machine, str) and machine in MACHINES:
        return MACHINES[machine]
    raise SimulateError(reason=f"unknown machine {machine!r} (known: {', '.join(sorted(MACHINES))})",
                        value=machine)


def _bdfs(values: Iterable[str], option: str, m: Machine, ok, what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    result: set[str] = set()
    for value in values:
        bdf = str(value).strip().lower()
        if _SHORT_BDF_RE.match(bdf):
            bdf = "0000:" + bdf
        if not S.BDF_RE.match(bdf) or not ok(bdf):
            raise SimulateError(reason=f"{option}: {value!r} is not {what} of {m.key}", value=value)
        result.add(bdf)
    return tuple(sorted(result))


def _faults(faults: Iterable[tuple[str | int, str]], m: Machine,
            missing: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(gpu, kind)`` -> ``(bdf, kind)``, every index counted among the GPUs rendered."""
    gpus = [g.bdf for g in m.gpus if g.bdf not in missing]
    result = []
    for gpu, kind in faults:
        check_kind(kind)
        text = str(gpu).strip().lower()
        bdf = gpus[int(text)] if text.isdigit() and int(text) < len(gpus) else (
            "0000:" + text if _SHORT_BDF_RE.match(text) else text)
        if bdf not in gpus:
            listing = ", ".join(f"{i}={b}" for i, b in enumerate(gpus))
            raise SimulateError(reason=f"faults: unknown GPU {gpu!r} of {m.key} (GPUs by index or "
                                       f"PCI address: {listing})", value=gpu)
        result.append((bdf, kind))
    return result


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SimulateError(reason=f"output {str(out)!r} exists and is not a directory",
                            value=str(out))
    if out.is_dir() and any(out.iterdir()) and not (out / S.SIMULATED_MARKER).is_file():
        raise SimulateError(reason=f"output directory {str(out)!r} is not empty and holds no "
                                   f"{S.SIMULATED_MARKER} marker; refusing to overwrite it",
                            value=str(out))


def _swap(tmp: Path, out: Path) -> None:
    """Put the freshly written tree in place; the old simulated tree (if any) goes after."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- the tree --------------------------------------------------------------------------------------
class _Writer:
    def __init__(self, root: Path):
        self.root = root
        self._dirs: set[str] = set()

    def mkdir(self, rel: str) -> str:
        if rel not in self._dirs:
            os.makedirs(os.path.join(self.root, rel), exist_ok=True)
            self._dirs.add(rel)
        return rel

    def file(self, rel: str, text: str) -> None:
        self.mkdir(os.path.dirname(rel))
        with open(os.path.join(self.root, rel), "w", encoding="ascii") as f:
            f.write(text + "\n")

    def binary(self, rel: str, data: bytes) -> None:
        self.mkdir(os.path.dirname(rel))
        with open(os.path.join(self.root, rel), "wb") as f:
            f.write(data)

    def link(self, rel: str, target_rel: str) -> None:
        """Relative symlink ``rel`` -> ``target_rel`` (both relative to the root)."""
        parent = os.path.dirname(rel)
        self.mkdir(parent)
        os.symlink(os.path.relpath(target_rel, parent or "."), os.path.join(self.root, rel))


def _write_tree(m: Machine, root: Path, missing: tuple[str, ...], unknown: tuple[str, ...],
                ib_vfs: int, serial: int) -> None:
    w = _Writer(root)
    w.file(S.DMI_PRODUCT_NAME, m.product_name)
    w.file(S.DMI_SYS_VENDOR, m.sys_vendor)
    _write_nodes(w, m)
    _write_cpus(w, m)
    _write_pci(w, m, set(missing), set(unknown), ib_vfs, serial)
    _write_host(w, m)
    marker = {"machine": m.key, "product_name": m.product_name, "missing_gpus": list(missing),
              "unknown_numa": list(unknown), "note": NOTE}
    (root / S.SIMULATED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _write_host(w: _Writer, m: Machine) -> None:
    intel = "intel" in m.cpu_model.lower()
    vendor, iommu, kvm = (("GenuineIntel", "intel_iommu=on", "kvm_intel") if intel
                          else ("AuthenticAMD", "amd_iommu=on", "kvm_amd"))
    w.file(PROC_CMDLINE, f"BOOT_IMAGE=/boot/vmlinuz root=/dev/md0 ro {iommu} iommu=pt")
    w.file(PROC_CPUINFO, f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: {m.cpu_model}")
    w.binary(DEV_KVM, b"")
    os.chmod(os.path.join(w.root, DEV_KVM), 0o666)
    for name in (*_VM_HOST_MODULES, kvm):
        w.mkdir(S.MODULE.format(name=name))


def _write_nodes(w: _Writer, m: Machine) -> None:
    w.file(S.NODE_ONLINE, format_index_list(n.id for n in m.nodes))
    for n in m.nodes:
        w.file(S.NODE_CPULIST.format(node=n.id), n.cpulist)
        total = n.memory_mib * 1024
        used = min(total, sum(size * nr for size, nr in n.hugepages.items()) + _OS_USED_KIB)
        default_pool = n.hugepages.get(HUGEPAGE_2M_KIB, 0)       # HugePages_* count the default (2 MiB) size
        w.file(S.NODE_MEMINFO.format(node=n.id), "\n".join((
            f"Node {n.id} MemTotal:       {total:8d} kB",
            f"Node {n.id} MemFree:        {total - used:8d} kB",
            f"Node {n.id} MemUsed:        {used:8d} kB",
            f"Node {n.id} HugePages_Total: {default_pool:5d}",
            f"Node {n.id} HugePages_Free:  {default_pool:5d}",
            f"Node {n.id} HugePages_Surp:  {0:5d}",
        )))
        base = S.NODE_HUGEPAGES.format(node=n.id)
        for size, nr in n.hugepages.items():
            w.file(f"{base}/hugepages-{size}kB/nr_hugepages", str(nr))
            w.file(f"{base}/hugepages-{size}kB/free_hugepages", str(nr))
            w.file(f"{base}/hugepages-{size}kB/surplus_hugepages", "0")


def _write_cpus(w: _Writer, m: Machine) -> None:
    all_cpus = f"0-{m.total_cpus - 1}"
    for name in ("online", "possible", "present"):
        w.file(f"sys/devices/system/cpu/{name}", all_cpus)
    for cpu in range(m.total_cpus):
        topo = S.CPU_TOPOLOGY.format(cpu=cpu)
        siblings = format_index_list(m.cpu_siblings(cpu))
        w.file(f"{topo}/physical_package_id", str(m.cpu_socket(cpu)))
        w.file(f"{topo}/core_id", str(m.cpu_core_id(cpu)))
        w.file(f"{topo}/thread_siblings_list", siblings)
        w.file(f"{topo}/core_cpus_list", siblings)


def _write_pci(w: _Writer, m: Machine, missing: set[str], unknown: set[str], ib_vfs: int,
               serial: int) -> None:
    placed: list[tuple[PciDevice, str]] = []          # (device, its dir relative to the root)
    vfs_of: dict[str, tuple[PciDevice, ...]] = {}     # PF address -> its enabled VFs

    def rec(dev: PciDevice, parent_dir: str) -> None:
        if dev.bdf in missing:                         # failed to enumerate: nothing at all
            return
        d = f"{parent_dir}/{dev.bdf}"
        placed.append((dev, d))
        for child in dev.children:
            rec(child, d)
        if dev.sriov is not None:                      # VFs sit beside their PF, on its bus
            vfs_of[dev.bdf] = m.virtual_functions(dev, ib_vfs)
            placed.extend((vf, f"{parent_dir}/{vf.bdf}") for vf in vfs_of[dev.bdf])

    for pci_root in m.pci_roots:
        w.mkdir(f"sys/devices/{pci_root.dirname}")
        for port in pci_root.ports:
            rec(port, f"sys/devices/{pci_root.dirname}")

    for driver in sorted({m.driver(dev) for dev, _ in placed}):
        w.mkdir(f"sys/bus/pci/drivers/{driver}")
    w.mkdir(S.PCI_DEVICES)
    w.mkdir(S.IOMMU_GROUPS)
    placed.sort(key=lambda item: item[0].bdf)
    # "0000:61:00" -> how many functions; VFs do not make their PF's header multi-function
    functions = Counter(dev.bdf[:-2] for dev, _ in placed if dev.kind != "vf")
    for group, (dev, d) in enumerate(placed):          # one group per device, in bus order
        w.file(f"{d}/vendor", f"0x{dev.vendor:04x}")
        w.file(f"{d}/device", f"0x{dev.device:04x}")
        w.file(f"{d}/subsystem_vendor", f"0x{dev.subsystem_vendor:04x}")
        w.file(f"{d}/subsystem_device", f"0x{dev.subsystem_device:04x}")
        w.file(f"{d}/class", f"0x{dev.class_code:06x}")
        w.file(f"{d}/revision", f"0x{dev.revision:02x}")
        _write_signals(w, dev, d, multifunction=functions[dev.bdf[:-2]] > 1)
        w.file(f"{d}/numa_node", "-1" if dev.bdf in unknown else str(dev.numa_node))
        w.file(f"{d}/local_cpulist", m.node(dev.numa_node).cpulist)
        group_dir = f"{S.IOMMU_GROUPS}/{group}"
        w.link(f"{d}/iommu_group", group_dir)
        w.link(f"{group_dir}/devices/{dev.bdf}", d)
        driver_dir = f"sys/bus/pci/drivers/{m.driver(dev)}"
        w.link(f"{d}/driver", driver_dir)
        w.link(f"{driver_dir}/{dev.bdf}", d)
        w.link(S.PCI_DEVICE.format(bdf=dev.bdf), d)
    _write_sriov(w, m, {dev.bdf: (dev, d) for dev, d in placed}, vfs_of, serial)


def _attr(shape: str) -> str:
    """A device attribute's path below the device's directory (``sriov_numvfs``)."""
    return shape.removeprefix(S.PCI_DEVICE + "/")


def _write_sriov(w: _Writer, m: Machine, by_bdf: dict[str, tuple[PciDevice, str]],
                 vfs_of: dict[str, tuple[PciDevice, ...]], serial: int) -> None:
    """A PF's SR-IOV files, its ``virtfnN`` links and RDMA device (node GUID); each VF's
    ``physfn`` link (kernel Documentation/ABI/testing/sysfs-bus-pci)."""
    for pf_bdf, vfs in vfs_of.items():
        pf, d = by_bdf[pf_bdf]
        iov = pf.sriov
        w.file(f"{d}/{_attr(S.PCI_SRIOV_TOTALVFS)}", str(iov.total_vfs))
        w.file(f"{d}/{_attr(S.PCI_SRIOV_NUMVFS)}", str(len(vfs)))
        w.file(f"{d}/{_attr(S.PCI_SRIOV_OFFSET)}", str(iov.offset))
        w.file(f"{d}/{_attr(S.PCI_SRIOV_STRIDE)}", str(iov.stride))
        w.file(f"{d}/{_attr(S.PCI_SRIOV_VF_DEVICE)}", f"{iov.vf_device:x}")
        if pf.label:
            w.file(f"{d}/{_attr(S.PCI_IB_NODE_GUID).format(ibdev=pf.label)}",
                   m.node_guid(pf, serial))
            w.mkdir(f"{d}/{_attr(S.PCI_NET)}/{m.netdev(pf)}")
        for i, vf in enumerate(vfs):
            vf_dir = by_bdf[vf.bdf][1]
            w.link(f"{d}/{S.PCI_VIRTFN.format(index=i)}", vf_dir)
            w.link(f"{vf_dir}/{S.PCI_PHYSFN}", d)


def _write_signals(w: _Writer, dev: PciDevice, d: str, *, multifunction: bool) -> None:
    """A healthy device's config space, AER counters and (GPUs, NVSwitches) reset files."""
    w.binary(f"{d}/{SIG.CONFIG}", SIG.config_space(
        vendor=dev.vendor, device=dev.device, revision=dev.revision, class_code=dev.class_code,
        subsystem_vendor=dev.subsystem_vendor, subsystem_device=dev.subsystem_device,
        multifunction=multifunction))
    for name in SIG.AER_FILES:
        w.file(f"{d}/{name}", SIG.aer_text(name).rstrip("\n"))
    method = SIG.RESET_METHODS.get(dev.kind)
    if method is not None:
        w.binary(f"{d}/{SIG.RESET}", b"")
        w.file(f"{d}/{SIG.RESET_METHOD}", method)
