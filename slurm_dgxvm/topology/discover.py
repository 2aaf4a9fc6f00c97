"""Build the host model from sysfs, NVML (when present) and the machine catalog."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import TopologyError
from .catalog import GENERIC, PROFILES, CatalogBlock, MachineProfile
from .model import (NO_NVSWITCH, Core, Gpu, GpuBlock, HugePagePool, Host, MissingGpu, Nic, NumaNode,
                    NvSwitch, VirtualFunction)
from .nvml import NvmlFacts
from .sysfs import (CPU_ONLINE, CPU_TOPOLOGY, DMI_PRODUCT_NAME, NODE_CPULIST, PCI_DEVICE,
                    PCI_IB_NODE_GUID, PCI_INFINIBAND, PCI_NET, PCI_PHYSFN, PCI_SRIOV_NUMVFS,
                    PCI_SRIOV_TOTALVFS, PCI_VIRTFN, SysfsRoot)

NVIDIA = "0x10de"
CLASS_DISPLAY = 0x03          # base class: display controller (0x0300 VGA, 0x0302 3D)
CLASS_BRIDGE_OTHER = 0x0680   # NVSwitches gen1-3 show up as "Bridge: other" [DOC FMG]
CLASS_ETHERNET = 0x0200
CLASS_INFINIBAND = 0x0207


@dataclass(frozen=True)
class _Pci:
    bdf: str
    vendor: str
    device: str
    cls: int
    numa_node: int | None
    numa_source: str
    iommu_group: int | None
    bridges: tuple[str, ...]
    driver: str | None
    is_vf: bool = False       # an SR-IOV virtual function (it has a physfn link)


def discover(sysfs: SysfsRoot, *, machine: str | None = None,
             module_ids: tuple[int, ...] | None = None,
             nvml: Callable[[], NvmlFacts] | None = None) -> Host:
    """Read the host at ``sysfs.root`` into a frozen :class:`Host`.

    ``machine`` forces a catalog profile (``dgx2``, ``dgx-a100``, ``dgx-h100``, ``generic``);
    ``module_ids`` gives the Fabric Manager module id of each GPU slot (config ``host.module_ids``);
    ``nvml`` is called for NVLink facts on a real host (never on a simulated one).

    Raises SysfsError for an unreadable file, TopologyError for a host that makes no sense
    (no CPUs, an unknown forced machine, module ids that are not a permutation).
    """
    notes: list[str] = []
    product = sysfs.read_optional(DMI_PRODUCT_NAME)
    marker = sysfs.simulated()
    simulated = marker.get("machine", "unknown") if marker else None

    nodes, cpu_node = _numa_nodes(sysfs, notes)
    cores = _cores(sysfs, cpu_node)
    nodes = tuple(NumaNode(n.id, _socket_of(n, cores), n.cpus, n.memory_mib, n.hugepages)
                  for n in nodes)

    devices = [_read_pci(sysfs, bdf, cpu_node, len(nodes), notes) for bdf in sysfs.pci_addresses()]
    by_bdf = {d.bdf: d for d in devices}
    _resolve_numa_from_bridges(devices, by_bdf, notes)
    gpu_devs = [d for d in devices if d.vendor == NVIDIA and d.cls >> 16 == CLASS_DISPLAY]
    sw_devs = [d for d in devices if d.vendor == NVIDIA and d.cls >> 8 == CLASS_BRIDGE_OTHER]
    # VFs are the NICs' own (Nic.vfs), not NICs of the host
    nic_devs = [d for d in devices if d.cls >> 8 in (CLASS_ETHERNET, CLASS_INFINIBAND)
                and not d.is_vf]

    profile, match = _match(product, gpu_devs, machine)
    nvml_facts = None
    if simulated is None and nvml is not None:
        nvml_facts = nvml()
        notes.append(nvml_facts.note)
    if profile is not None:
        slots = _slots(profile, gpu_devs, notes)
        if slots is None:
            match += f"; falling back to {GENERIC}"
            profile = None
    if profile is None:
        return _generic_host(product, match, simulated, nodes, cores, gpu_devs, sw_devs, nic_devs,
                             notes)

    ids = _module_ids(profile, module_ids, nvml_facts, notes)
    gpus = []
    for index, d in enumerate(gpu_devs):
        slot = slots[d.bdf]
        gpus.append(Gpu(index=index, pci=d.bdf, vendor_id=d.vendor[2:], device_id=d.device[2:],
                        numa_node=d.numa_node, numa_source=d.numa_source,
                        iommu_group=d.iommu_group, bridges=d.bridges,
                        board=profile.gpu_boards[slot], slot=slot,
                        module_id=ids[slot] if ids else None, driver=d.driver))
    present_slots = set(slots.values())
    missing = tuple(MissingGpu(pci=profile.reference_gpus[s], slot=s, board=profile.gpu_boards[s])
                    for s in range(profile.gpu_count) if s not in present_slots)
    for m in missing:
        notes.append(f"GPU {m.pci} (slot {m.slot}) is missing from the PCI bus: "
                     "blocks containing it are not offered")
    nics, gpus = _nics(nic_devs, gpus, _sriov(sysfs, nic_devs, by_bdf))
    switches, sw_slot = _switches(profile, sw_devs, notes)
    blocks = _blocks(profile.blocks(ids), {g.slot: g.index for g in gpus}, sw_slot)
    return Host(machine=profile.key, display_name=profile.display_name, product_name=product,
                match=match, simulated=simulated, nvswitch_model=profile.nvswitch_model,
                numa_nodes=nodes, cores=cores, gpus=tuple(gpus), missing_gpus=missing,
                nvswitches=switches, nics=nics, blocks=blocks,
                block_sizes=profile.block_sizes, notes=tuple(notes))


# -- CPUs and memory -------------------------------------------------------------------------------
def _numa_nodes(sysfs: SysfsRoot, notes: list[str]):
    ids = sysfs.node_ids()
    online = sysfs.read_cpulist(CPU_ONLINE)
    if not online:
        raise TopologyError(reason=f"no online CPUs in {sysfs.path(CPU_ONLINE)}")
    if not ids:
        notes.append("no NUMA information in sysfs: treating the host as one node")
        return (NumaNode(0, 0, online, 0),), {c: 0 for c in online}
    nodes, cpu_node = [], {}
    for n in ids:
        cpus = sysfs.read_cpulist(NODE_CPULIST, node=n)
        for c in cpus:
            cpu_node[c] = n
        pools = tuple(HugePagePool(size, total, free)
                      for size, (total, free) in sorted(sysfs.node_hugepages(n).items()))
        nodes.append(NumaNode(n, 0, cpus, sysfs.node_memtotal_kib(n) // 1024, pools))
    return tuple(nodes), cpu_node


def _cores(sysfs: SysfsRoot, cpu_node: dict[int, int]) -> tuple[Core, ...]:
    groups: dict[tuple[int, int], list[int]] = {}
    for cpu in sysfs.read_cpulist(CPU_ONLINE):
        socket = sysfs.read_int(CPU_TOPOLOGY + "/physical_package_id", cpu=cpu)
        core_id = sysfs.read_int(CPU_TOPOLOGY + "/core_id", cpu=cpu)
        groups.setdefault((socket, core_id), []).append(cpu)
    cores = []
    for (socket, core_id), threads in sorted(groups.items()):
        node = cpu_node.get(threads[0], 0)
        cores.append(Core(socket, core_id, node, tuple(sorted(threads))))
    return tuple(cores)


def _socket_of(node: NumaNode, cores: tuple[Core, ...]) -> int:
    first = set(node.cpus[:1])
    for core in cores:
        if first & set(core.threads):
            return core.socket
    return 0


# -- PCI -------------------------------------------------------------------------------------------
def _read_pci(sysfs: SysfsRoot, bdf: str, cpu_node: dict[int, int], n_nodes: int,
              notes: list[str]) -> _Pci:
    # read_int / read_cpulist: a malformed value is a SysfsError naming the file, not a ValueError
    cls = sysfs.read_int(PCI_DEVICE + "/class", base=16, bdf=bdf)
    raw = sysfs.pci_attr_optional(bdf, "numa_node")
    numa: int | None = (sysfs.read_int(PCI_DEVICE + "/numa_node", bdf=bdf)
                        if raw not in (None, "") else -1)
    source = "sysfs"
    if numa is not None and numa < 0:
        # NOTE: BIOSes without a proper SRAT/_PXM report numa_node=-1; local_cpulist still tells.
        numa, source = None, "unknown"
        if sysfs.pci_attr_optional(bdf, "local_cpulist"):
            cpus = sysfs.read_cpulist(PCI_DEVICE + "/local_cpulist", bdf=bdf)
            nodes = {cpu_node.get(c) for c in cpus}
            if len(nodes) == 1 and None not in nodes:
                numa, source = nodes.pop(), "local_cpulist"
        if numa is None and n_nodes == 1:
            numa, source = 0, "single-node host"
    group = sysfs.pci_link_name(bdf, "iommu_group")
    return _Pci(bdf=bdf, vendor=sysfs.pci_attr(bdf, "vendor").lower(),
                device=sysfs.pci_attr(bdf, "device").lower(), cls=cls, numa_node=numa,
                numa_source=source, iommu_group=int(group) if group and group.isdigit() else None,
                bridges=sysfs.pci_upstream(bdf), driver=sysfs.pci_link_name(bdf, "driver"),
                is_vf=sysfs.pci_link_name(bdf, PCI_PHYSFN) is not None)


def _resolve_numa_from_bridges(devices: list[_Pci], by_bdf: dict[str, _Pci], notes: list[str]):
    for i, d in enumerate(devices):
        if d.numa_source == "sysfs":
            continue
        if d.numa_node is None:
            for b in reversed(d.bridges):
                up = by_bdf.get(b)
                if up is not None and up.numa_source == "sysfs":
                    d = devices[i] = replace(d, numa_node=up.numa_node, numa_source="bridge")
                    break
        if d.numa_node is None:
            notes.append(f"{d.bdf}: numa_node is -1 and nothing else tells its node")
        elif d.cls >> 16 == CLASS_DISPLAY or d.cls >> 8 == CLASS_BRIDGE_OTHER:
            notes.append(f"{d.bdf}: numa_node is -1 in sysfs; node {d.numa_node} from {d.numa_source}")


# -- catalog matching ------------------------------------------------------------------------------
def _match(product: str | None, gpus: list[_Pci], forced: str | None):
    ids = {f"{d.vendor[2:]}:{d.device[2:]}" for d in gpus}
    if forced:
        if forced == GENERIC:
            return None, "forced by config: generic PCIe GPU server"
        if forced not in PROFILES:
            raise TopologyError(reason=f"unknown machine {forced!r} in config host.machine "
                                       f"(known: {', '.join([*PROFILES, GENERIC])})")
        return PROFILES[forced], f"forced by config (host.machine = {forced!r})"
    for p in PROFILES.values():
        if p.matches_dmi(product):
            if ids and not ids <= set(p.gpu_ids):
                return None, (f"DMI product name {product!r} is {p.display_name} but its GPUs are "
                              f"{', '.join(sorted(ids))}: unknown machine, generic PCIe GPU server")
            return p, f"DMI product name {product!r}"
    for p in PROFILES.values():
        if ids and ids <= set(p.gpu_ids) and {d.bdf for d in gpus} <= set(p.reference_gpus):
            return p, f"GPU PCI ids {', '.join(sorted(ids))} at the reference bus addresses"
    return None, (f"unknown machine (DMI product name {product!r}, GPUs "
                  f"{', '.join(sorted(ids)) or 'none'}): generic PCIe GPU server, blocks by NUMA node")


def _slots(profile: MachineProfile, gpus: list[_Pci], notes: list[str]) -> dict[str, int] | None:
    """Physical slot of each present GPU, or None when it cannot be told."""
    ref = {bdf: i for i, bdf in enumerate(profile.reference_gpus)}
    if all(d.bdf in ref for d in gpus):
        return {d.bdf: ref[d.bdf] for d in gpus}
    if len(gpus) == profile.gpu_count:
        notes.append(f"GPU bus addresses differ from the reference {profile.display_name}; "
                     "slots assigned in PCI order")
        return {d.bdf: i for i, d in enumerate(gpus)}
    notes.append(f"{len(gpus)} GPUs where {profile.display_name} has {profile.gpu_count}, at "
                 "bus addresses unlike the reference unit: cannot tell which GPU is missing")
    return None


def _module_ids(profile: MachineProfile, configured: tuple[int, ...] | None,
                facts: NvmlFacts | None, notes: list[str]) -> tuple[int, ...]:
    if not profile.fm_partitions:
        return ()
    expected = sorted(profile.default_module_ids)
    if configured:
        if sorted(configured) != expected:
            raise TopologyError(reason=f"host.module_ids {list(configured)} is not a permutation "
                                       f"of {expected} for {profile.display_name}")
        notes.append(f"Fabric Manager module ids from config: {list(configured)}")
        return tuple(configured)
    if facts and facts.gpus and all(g.module_id for g in facts.gpus):
        by_pci = {g.pci: g.module_id for g in facts.gpus}
        ids = tuple(by_pci.get(bdf) for bdf in profile.reference_gpus)
        if None not in ids and sorted(ids) == expected:
            notes.append(f"Fabric Manager module ids from NVML: {list(ids)}")
            return ids  # type: ignore[return-value]
    notes.append("Fabric Manager module ids assumed in PCI order (not published for this "
                 "machine; set host.module_ids from `nvidia-smi -q` Module Id)")
    return profile.default_module_ids


def _switches(profile: MachineProfile, devs: list[_Pci], notes: list[str]):
    ref = {bdf: i for i, bdf in enumerate(profile.reference_nvswitches)}
    if all(d.bdf in ref for d in devs):
        slot_of = {d.bdf: ref[d.bdf] for d in devs}
    else:
        notes.append("NVSwitch bus addresses differ from the reference unit; boards assigned "
                     "in PCI order")
        slot_of = {d.bdf: i for i, d in enumerate(devs)}
    switches = tuple(NvSwitch(pci=d.bdf, device_id=d.device[2:],
                              board=profile.nvswitch_boards[min(slot_of[d.bdf],
                                                                len(profile.nvswitch_boards) - 1)],
                              numa_node=d.numa_node) for d in devs)
    present = set(slot_of.values())
    missing = [bdf for bdf, i in ref.items() if i not in present]
    for bdf in missing:
        notes.append(f"NVSwitch {bdf} is missing from the PCI bus: blocks that need it are "
                     "not offered")
    return switches, {i: bdf for bdf, i in slot_of.items()}


def _blocks(blocks: tuple[CatalogBlock, ...], index_of_slot: dict[int, int],
            switch_of_slot: dict[int, str]) -> tuple[GpuBlock, ...]:
    out = []
    for b in blocks:
        if not all(s in index_of_slot for s in b.slots):
            continue
        if not all(s in switch_of_slot for s in b.nvswitch_slots):
            continue
        out.append(GpuBlock(gpus=tuple(sorted(index_of_slot[s] for s in b.slots)),
                            nvswitches=tuple(switch_of_slot[s] for s in b.nvswitch_slots),
                            fm_partition=b.fm_partition))
    return tuple(sorted(out, key=lambda b: (-b.size, b.gpus)))


# -- NICs ------------------------------------------------------------------------------------------
def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _sriov(sysfs: SysfsRoot, devs: list[_Pci], by_bdf: dict[str, _Pci]) -> dict[str, dict]:
    """Per NIC address: its SR-IOV capability and enabled VFs (``sriov_totalvfs``, the
    ``virtfnN`` links), its RDMA device, node GUID and network interface; only NICs that have
    any of them."""
    out: dict[str, dict] = {}
    for d in devs:
        info: dict = {}
        if sysfs.exists(PCI_SRIOV_TOTALVFS, bdf=d.bdf):
            info["total_vfs"] = sysfs.read_int(PCI_SRIOV_TOTALVFS, bdf=d.bdf)
            vfs = []
            for i in range(sysfs.read_int(PCI_SRIOV_NUMVFS, bdf=d.bdf)):
                name = sysfs.pci_link_name(d.bdf, PCI_VIRTFN.format(index=i))
                vf = by_bdf.get(name or "")
                if vf is None:          # enabled but not (yet) on the bus: not offered
                    continue
                vfs.append(VirtualFunction(pci=vf.bdf, index=i, device_id=vf.device[2:],
                                           iommu_group=vf.iommu_group, driver=vf.driver,
                                           numa_node=vf.numa_node))
            info["vfs"] = tuple(vfs)
        if sysfs.exists(PCI_INFINIBAND, bdf=d.bdf):
            for ibdev in sysfs.listdir(PCI_INFINIBAND, bdf=d.bdf)[:1]:
                guid = sysfs.read(PCI_IB_NODE_GUID, bdf=d.bdf, ibdev=ibdev)
                info["rdma_device"] = ibdev
                info["node_guid"] = "0x" + guid.replace(":", "").lower()
        if sysfs.exists(PCI_NET, bdf=d.bdf):
            for name in sysfs.listdir(PCI_NET, bdf=d.bdf)[:1]:
                info["netdev"] = name
        if info:
            out[d.bdf] = info
    return out


def _nics(devs: list[_Pci], gpus: list[Gpu],
          sriov: dict[str, dict]) -> tuple[tuple[Nic, ...], tuple[Gpu, ...]]:
    """Pair NICs and GPUs through the PCIe tree.

    Nearness is the length of the shared bridge chain; sharing only the root port is not "near"
    (at least a switch's upstream port must be common: length >= 2). Each NIC lists the GPUs
    nearest to it; each GPU gets the NICs nearest to it, so a storage card on a first-level
    switch does not count for a GPU whose own second-level switch has a compute NIC, and every
    InfiniBand HCA it shares a switch with, nearest first (``hcas``; placement picks from them).
    ``sriov``: what :func:`_sriov` read. Returns the NICs and the GPUs with those filled in.
    """
    depth = {(d.bdf, g.index): _common_prefix(d.bridges + (d.bdf,), g.bridges + (g.pci,))
             for d in devs for g in gpus}
    nics = []
    for d in devs:
        best = max((depth[d.bdf, g.index] for g in gpus), default=0)
        near = tuple(g.index for g in gpus if best >= 2 and depth[d.bdf, g.index] == best)
        kind = "infiniband" if d.cls >> 8 == CLASS_INFINIBAND else "ethernet"
        nics.append(Nic(pci=d.bdf, vendor_id=d.vendor[2:], device_id=d.device[2:], kind=kind,
                        numa_node=d.numa_node, bridges=d.bridges, near_gpus=near,
                        **sriov.get(d.bdf, {})))
    ib = [d for d in devs if d.cls >> 8 == CLASS_INFINIBAND]
    with_nics = []
    for g in gpus:
        best = max((depth[d.bdf, g.index] for d in devs), default=0)
        mine = tuple(d.bdf for d in devs if best >= 2 and depth[d.bdf, g.index] == best)
        hcas = sorted(((d.bdf, depth[d.bdf, g.index]) for d in ib if depth[d.bdf, g.index] >= 2),
                      key=lambda h: (-h[1], h[0]))
        with_nics.append(replace(g, nics=mine, hcas=tuple(hcas)))
    return tuple(nics), tuple(with_nics)


# -- generic PCIe GPU server -----------------------------------------------------------------------
def _generic_host(product, match, simulated, nodes, cores, gpu_devs, sw_devs, nic_devs, notes):
    gpus = [Gpu(index=i, pci=d.bdf, vendor_id=d.vendor[2:], device_id=d.device[2:],
                numa_node=d.numa_node, numa_source=d.numa_source, iommu_group=d.iommu_group,
                bridges=d.bridges, board=0, slot=i, module_id=None, driver=d.driver)
            for i, d in enumerate(gpu_devs)]
    if sw_devs:
        notes.append(f"{len(sw_devs)} NVSwitch(es) found on an unknown machine: they are left to "
                     "the host (no NVLink partitioning)")
    nics, gpus = _nics(nic_devs, gpus, {})
    blocks = _generic_blocks(gpus, nodes)
    return Host(machine=GENERIC, display_name="generic PCIe GPU server", product_name=product,
                match=match, simulated=simulated, nvswitch_model=NO_NVSWITCH, numa_nodes=nodes,
                cores=cores, gpus=gpus, missing_gpus=(), nvswitches=(),
                nics=nics, blocks=blocks,
                block_sizes=tuple(sorted({b.size for b in blocks})), notes=tuple(notes))


def _generic_blocks(gpus: list[Gpu], nodes) -> tuple[GpuBlock, ...]:
    """Blocks on a machine we know nothing about: stay inside a NUMA node.

    Per node: power-of-two aligned runs of its GPUs and the whole node; across nodes: all GPUs of
    a socket, and all GPUs. GPUs of unknown node form a group of their own.
    """
    groups: dict[object, list[int]] = {}
    for g in gpus:
        groups.setdefault(g.numa_node if g.numa_node is not None else "unknown", []).append(g.index)
    sets: set[tuple[int, ...]] = set()
    for members in groups.values():
        size = 1
        while size <= len(members):
            for start in range(0, len(members) - size + 1, size):
                sets.add(tuple(members[start:start + size]))
            size *= 2
        sets.add(tuple(members))
    socket_of = {n.id: n.socket for n in nodes}
    by_socket: dict[int, list[int]] = {}
    for g in gpus:
        if g.numa_node is not None:
            by_socket.setdefault(socket_of.get(g.numa_node, 0), []).append(g.index)
    sets |= {tuple(sorted(v)) for v in by_socket.values()}
    if gpus:
        sets.add(tuple(g.index for g in gpus))
    blocks = [GpuBlock(gpus=tuple(sorted(s)), nvswitches=(), fm_partition=None) for s in sets]
    return tuple(sorted(blocks, key=lambda b: (-b.size, b.gpus)))

