"""Fit to this host: the one explicit transform from the designed domain to one that can boot on
the machine dgxvm really runs on, when that machine is not the one the host model describes (a
simulated DGX on a small test machine).

It never runs silently: it returns the list of changes, the lifecycle stores it in the VM record
and in the domain's <metadata>, and ``dgxvm list`` shows it. On a real DGX node it is not used
(``libvirt.fit_to_host = "auto"`` applies it only to simulated hosts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..errors import SysfsError
from ..ranges import format_index_list, parse_index_list
from ..topology.sysfs import HUGEPAGES, HUGEPAGES_FREE, NODE_ONLINE, SysfsRoot
from .spec import DomainSpec, GuestCell, VcpuPin


@dataclass(frozen=True)
class RealHost:
    """The few facts of the machine we really run on that the transform needs."""

    cpus: tuple[int, ...]
    numa_nodes: tuple[int, ...]
    hugepages_kib: tuple[int, ...]     # page sizes with free pages

    @classmethod
    def probe(cls, sysfs: SysfsRoot | None = None) -> RealHost:
        """Read the real /sys (never the simulated tree): our CPUs, nodes, free hugepages.
        ``sysfs`` is the root to read below (the real ``/`` unless a test gives another)."""
        sysfs = sysfs if sysfs is not None else SysfsRoot("/")
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        try:
            nodes = tuple(parse_index_list(sysfs.read(NODE_ONLINE), what="NUMA node"))
        except SysfsError:
            nodes = (0,)
        pages = []
        try:
            sizes = sysfs.listdir(HUGEPAGES)
        except SysfsError:
            sizes = []
        for d in sizes:
            if not (d.startswith("hugepages-") and d.endswith("kB")):
                continue
            try:
                if sysfs.read_int(HUGEPAGES_FREE, size=d) > 0:
                    pages.append(int(d[len("hugepages-"):-2]))
            except (SysfsError, ValueError):
                continue
        return cls(cpus=cpus, numa_nodes=nodes, hugepages_kib=tuple(pages))


def fit_to_host(spec: DomainSpec, real: RealHost, *, max_vcpus: int,
                max_memory_mib: int) -> tuple[DomainSpec, tuple[str, ...]]:
    """Return (the fitted spec, one line per change). A change list is empty when it fits as is.

    Changes, in this order: drop PCI passthrough (GPUs, NVSwitches, InfiniBand VFs or ports,
    their pxb/root ports and switches, the 64-bit MMIO window); shrink vCPUs to ``max_vcpus``
    and the CPUs really there, folding guest NUMA cells into one; remap vCPU, emulator and I/O
    thread pins onto real CPUs; drop numatune on nodes that do not exist here; drop hugepages
    the host has none of; shrink memory to ``max_memory_mib``; drop parallel preallocation.
    """
    changes: list[str] = []
    s = spec
    if s.hostdevs:
        gpus = [h.pci for h in s.hostdevs if h.kind == "gpu"]
        sws = [h.pci for h in s.hostdevs if h.kind == "nvswitch"]
        what = f"{len(gpus)} GPU(s) {', '.join(gpus)}"
        if sws:
            what += f" and {len(sws)} NVSwitch(es) {', '.join(sws)}"
        ibs = [h.pci for h in s.hostdevs if h.kind in ("ib-vf", "ib-port")]
        if ibs:
            what += f" and {len(ibs)} InfiniBand function(s) {', '.join(ibs)}"
        changes.append(f"dropped PCI passthrough of {what} (not on this machine)")
        s = replace(s, hostdevs=(), root_ports=(), switch_ports=(), expanders=())
    if s.pcihole64_gib:
        s = replace(s, pcihole64_gib=None)

    vcpus = max(1, min(s.vcpus, max_vcpus, len(real.cpus)))
    memory = min(s.memory_mib, max_memory_mib)
    designed_pins = [c for p in s.vcpupins for c in p.cpus]
    missing_nodes = [n for n in s.numa_nodes if n not in real.numa_nodes]
    fits = (vcpus == s.vcpus and memory == s.memory_mib and not missing_nodes
            and set(designed_pins) <= set(real.cpus))
    if not fits:
        if vcpus != s.vcpus or len(s.cells) > 1:
            changes.append(f"vCPUs {s.vcpus} in {len(s.cells)} guest NUMA cell(s) -> {vcpus} "
                           f"in 1 (this machine has {len(real.cpus)} CPU(s))")
        if memory != s.memory_mib:
            changes.append(f"memory {s.memory_mib} MiB -> {memory} MiB")
        pins = tuple(VcpuPin(vcpu=v, cpus=(real.cpus[v % len(real.cpus)],))
                     for v in range(vcpus))
        if designed_pins[:vcpus] != [p.cpus[0] for p in pins]:
            changes.append(f"vCPU pins on host CPUs {format_index_list(designed_pins)} -> "
                           f"{format_index_list(p.cpus[0] for p in pins)}")
        numa_nodes = s.numa_nodes
        if missing_nodes:
            changes.append(f"dropped numatune on host NUMA node(s) "
                           f"{format_index_list(s.numa_nodes)} (this machine has "
                           f"{format_index_list(real.numa_nodes)})")
            numa_nodes = ()
        host_node = numa_nodes[0] if len(numa_nodes) == 1 else None
        s = replace(
            s, vcpus=vcpus, sockets=1, cores=vcpus, threads=1, memory_mib=memory,
            cells=(GuestCell(id=0, host_node=host_node, vcpus=tuple(range(vcpus)),
                             memory_mib=memory),),
            vcpupins=pins,
            numa_nodes=numa_nodes if host_node is not None else (),
        )
        if s.prealloc_threads:
            changes.append(f"dropped parallel preallocation ({s.prealloc_threads} threads)")
            s = replace(s, prealloc_threads=None)
    s = replace(s, emulator_cpus=_remap(s.emulator_cpus, real.cpus, changes, "emulator"),
                iothread_cpus=_remap(s.iothread_cpus, real.cpus, None, "I/O thread"))
    if s.hugepage_kib and s.hugepage_kib not in real.hugepages_kib:
        changes.append(f"dropped {s.hugepage_kib} KiB hugepages (none free on this machine)")
        s = replace(s, hugepage_kib=None,
                    memory_source="memfd" if s.memory_shared else s.memory_source)
    queues = max(1, min(vcpus, max(i.queues for i in s.interfaces) if s.interfaces else 1))
    s = replace(s, interfaces=tuple(replace(i, queues=min(i.queues, queues)) for i in s.interfaces),
                disks=tuple(replace(d, queues=min(d.queues, vcpus)) if d.queues else d
                            for d in s.disks))
    s = replace(s, metadata=replace(s.metadata, fitted=tuple(changes)))
    return s, tuple(changes)


def _remap(cpus: tuple[int, ...], real: tuple[int, ...], changes, what) -> tuple[int, ...]:
    if not cpus or set(cpus) <= set(real):
        return cpus
    if changes is not None:
        changes.append(f"{what} pin on host CPUs {format_index_list(cpus)} -> "
                       f"{format_index_list(real)}")
    return real
