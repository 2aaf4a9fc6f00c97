"""Declarative descriptions of real DGX machines, for rendering fake sysfs trees.

Every fact carries a source comment with the marks of /work/shared/notes/machines.md:
``[REAL]`` seen in real output, ``[DOC]`` NVIDIA docs, ``[INF]`` inferred. Where the notes say
``[NOT FOUND]`` a plausible value was invented and is marked ``[INF: invented for the fixture]``.
Source names: GDS (GPUDirect Storage configuration guide §4.1), FMG (Fabric Manager User Guide),
H100UG (DGX H100 User Guide, tables 5/6), and GitHub issue addresses.

CPU numbering (all three machines, as in the notes' cpulists): core ``c`` of socket ``s`` is core
``k = s * cores_per_socket + c``; its thread ``t`` is CPU ``k + t * total_cores``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from ..errors import SimulateError
from ..ranges import format_index_list, parse_index_list

KINDS = ("gpu", "nvswitch", "nic", "vf", "nvme", "bridge")
# Driver each kind is bound to on a VM host: GPUs and NVSwitches go to vfio-pci for passthrough.
DRIVERS = {"gpu": "vfio-pci", "nvswitch": "vfio-pci", "nic": "mlx5_core", "nvme": "nvme",
           "bridge": "pcieport", "vf": "vfio-pci"}
# (kind "vf": the SR-IOV virtual functions of the compute HCAs, when they are enabled, are bound
# to vfio-pci for VMs; mlx5_core would otherwise probe them on the host [INF: the host setup for
# VMs, as NVIDIA's SR-IOV guides do before passing VFs to VMs].)
# VFs enabled per compute HCA port when nothing else is asked (`dgxvm simulate --ib-vfs`): as many
# as a DGX node runs VMs at most (8 GPUs -> 8 one-GPU VMs). [INF: a sensible default; the H200
# deployment in devfloor9's SR-IOV write-up runs "8 VFs per Physical Function"]
DEFAULT_IB_VFS = 8
HUGEPAGE_1G_KIB = 1048576
HUGEPAGE_2M_KIB = 2048
# Share of a node's memory put into its 1 GiB pool. [INF: the host setup for VMs]
HUGEPAGE_SHARE = 0.90


@dataclass(frozen=True)
class PciId:
    """What a device reports in config space (``vendor``, ``device``, subsystem ids, ``class``,
    ``revision``)."""

    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int
    revision: int = 0x00              # [INF: invented for the fixture] where a PciId gives none


@dataclass(frozen=True)
class Sriov:
    """The SR-IOV capability of a physical function, as the kernel shows it in sysfs
    (``sriov_totalvfs``, ``sriov_offset``, ``sriov_stride``, ``sriov_vf_device``)."""

    total_vfs: int
    vf_device: int                    # the VFs' PCI device id (vendor = the PF's)
    offset: int = 1                   # First VF Offset, in routing ids after the PF
    stride: int = 1                   # VF Stride

    def vf_bdf(self, pf_bdf: str, index: int) -> str:
        """The address the kernel gives VF ``index`` (0-based): the PF's routing id (bus << 8 |
        device << 3 | function) + offset + index * stride, split back into bus:device.function
        (PCIe SR-IOV spec §2.1.2; drivers/pci/iov.c pci_iov_virtfn_bus/devfn)."""
        dom, bus, rest = pf_bdf.split(":")
        dev, fn = rest.split(".")
        rid = (int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn, 16)) + self.offset + index * self.stride
        return f"{dom}:{rid >> 8:02x}:{(rid >> 3) & 0x1f:02x}.{rid & 7:x}"


@dataclass(frozen=True)
class PciDevice:
    """One PCI function. ``children`` are the functions behind it (bridges only)."""

    bdf: str                          # full address, ``0000:34:00.0``
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int                   # 24 bits: class, subclass, prog-if (``0x030200``)
    kind: str                         # one of KINDS
    numa_node: int
    children: tuple[PciDevice, ...] = ()
    label: str = ""                   # human name: ``GPU0``, ``mlx5_0`` (empty when unknown)
    role: str = ""                    # NICs: ``compute`` | ``storage`` | ``ethernet``
    revision: int = 0x00              # config space offset 8 (sysfs ``revision``)
    sriov: Sriov | None = None        # compute HCAs of DGX A100/H100: SR-IOV capable

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SimulateError(reason=f"device {self.bdf}: unknown kind {self.kind!r}",
                                value=self.kind)
        if self.children and self.kind != "bridge":
            raise SimulateError(reason=f"device {self.bdf}: only bridges have children",
                                value=self.bdf)

    @property
    def driver(self) -> str:
        return DRIVERS[self.kind]


@dataclass(frozen=True)
class PciRoot:
    """A host bridge (``sys/devices/pci0000:2b``) and the root ports on its bus."""

    bus: str                          # ``0000:2b``
    numa_node: int
    ports: tuple[PciDevice, ...]

    @property
    def dirname(self) -> str:
        return f"pci{self.bus}"


@dataclass(frozen=True)
class NumaNode:
    id: int
    socket: int
    cpulist: str                      # Linux syntax, ``0-23,48-71``
    memory_mib: int
    hugepages: Mapping[int, int] = field(default_factory=dict)   # {size_kib: nr_hugepages}

    def __post_init__(self):
        object.__setattr__(self, "hugepages", MappingProxyType(dict(sorted(self.hugepages.items()))))

    @cached_property        # parsed once: the machine's checks ask for it per CPU
    def cpus(self) -> tuple[int, ...]:
        return tuple(sorted(parse_index_list(self.cpulist, what="CPU")))


@dataclass(frozen=True)
class Machine:
    key: str                          # the MACHINES key, ``dgx-a100``
    sys_vendor: str                   # DMI
    product_name: str                 # DMI
    cpu_model: str
    sockets: int
    threads_per_core: int
    nodes: tuple[NumaNode, ...]
    pci_roots: tuple[PciRoot, ...]
    # the driver the NVSwitches are bound to on a VM host: vfio-pci where they go into VMs
    # (DGX-2), nvidia-nvswitch where Fabric Manager drives them from the host (A100, H100)
    nvswitch_driver: str = DRIVERS["nvswitch"]

    def __post_init__(self):
        self._check()

    def driver(self, dev: PciDevice) -> str:
        """The driver ``dev`` is bound to on this machine as a VM host."""
        return self.nvswitch_driver if dev.kind == "nvswitch" else dev.driver

    # -- CPUs -------------------------------------------------------------------------------------
    @cached_property
    def total_cpus(self) -> int:
        return sum(len(n.cpus) for n in self.nodes)

    @property
    def total_cores(self) -> int:
        return self.total_cpus // self.threads_per_core

    @property
    def cores_per_socket(self) -> int:
        return self.total_cores // self.sockets

    def cpu_socket(self, cpu: int) -> int:
        return (cpu % self.total_cores) // self.cores_per_socket

    def cpu_core_id(self, cpu: int) -> int:
        """Index of the CPU's core within its socket."""
        return (cpu % self.total_cores) % self.cores_per_socket

    def cpu_siblings(self, cpu: int) -> tuple[int, ...]:
        core = cpu % self.total_cores
        return tuple(core + t * self.total_cores for t in range(self.threads_per_core))

    def node(self, node_id: int) -> NumaNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise SimulateError(reason=f"{self.key} has no NUMA node {node_id}", value=node_id)

    # -- PCI --------------------------------------------------------------------------------------
    def walk(self) -> Iterator[tuple[PciRoot, tuple[PciDevice, ...], PciDevice]]:
        """Every device, depth first, as ``(root, bridges above it, device)``."""
        def rec(root, parents, dev):
            yield root, parents, dev
            for child in dev.children:
                yield from rec(root, parents + (dev,), child)
        for root in self.pci_roots:
            for port in root.ports:
                yield from rec(root, (), port)

    @property
    def devices(self) -> tuple[PciDevice, ...]:
        return tuple(sorted((d for _, _, d in self.walk()), key=lambda d: d.bdf))

    def device(self, bdf: str) -> PciDevice:
        for d in self.devices:
            if d.bdf == bdf:
                return d
        raise SimulateError(reason=f"{self.key} has no PCI device {bdf!r}", value=bdf)

    def of_kind(self, kind: str) -> tuple[PciDevice, ...]:
        return tuple(d for d in self.devices if d.kind == kind)

    @property
    def gpus(self) -> tuple[PciDevice, ...]:
        """In nvidia-smi order, which is ascending BDF on these machines. [REAL, notes §4]"""
        return self.of_kind("gpu")

    @property
    def nvswitches(self) -> tuple[PciDevice, ...]:
        return self.of_kind("nvswitch")

    def virtual_functions(self, pf: PciDevice, count: int) -> tuple[PciDevice, ...]:
        """The first ``count`` VFs of ``pf`` as the kernel enables them (``sriov_numvfs``): the
        PF's ids and NUMA node, the VF device id, the address of :meth:`Sriov.vf_bdf`."""
        if pf.sriov is None:
            return ()
        if not 0 <= count <= pf.sriov.total_vfs:
            raise SimulateError(reason=f"{count} VFs asked of {pf.bdf}, which has "
                                       f"{pf.sriov.total_vfs} (sriov_totalvfs)", value=count)
        return tuple(PciDevice(bdf=pf.sriov.vf_bdf(pf.bdf, i), vendor=pf.vendor,
                               device=pf.sriov.vf_device, subsystem_vendor=pf.subsystem_vendor,
                               subsystem_device=pf.subsystem_device,   # [INF] as the PF's
                               class_code=pf.class_code, kind="vf", numa_node=pf.numa_node,
                               label=f"{pf.label}v{i}" if pf.label else "", role="vf",
                               revision=pf.revision)
                     for i in range(count))

    def node_guid(self, pf: PciDevice, serial: int = 0) -> str:
        """The HCA's node GUID as sysfs shows it: the Mellanox OUI b8:ce:f6 [INF: from GUIDs in
        public ibstat output], then the machine's ``serial`` (so that simulated nodes of one
        cluster differ, as real HCAs' GUIDs do) and the PF's address [INF: invented for the
        fixture]."""
        bus, rest = pf.bdf.split(":")[1:]
        dev, fn = rest.split(".")
        return f"b8ce:f603:{serial:04x}:{bus}{int(dev, 16) << 3 | int(fn, 16):02x}"

    @staticmethod
    def netdev(pf: PciDevice) -> str:
        """The IPoIB interface's predictable name, ``ibp<bus>s<slot>`` in decimal: ibp12s0 for
        0000:0c:00.0 [REAL: DGX A100 scripts, H100UG table 5 (notes §2.4, §3.4)]."""
        bus, rest = pf.bdf.split(":")[1:]
        dev, fn = rest.split(".")
        return f"ibp{int(bus, 16)}s{int(dev, 16)}" + (f"f{int(fn)}" if fn != "0" else "")

    @property
    def compute_nics(self) -> tuple[PciDevice, ...]:
        return tuple(d for d in self.of_kind("nic") if d.role == "compute")

    # -- consistency ------------------------------------------------------------------------------
    def _check(self) -> None:
        def bad(reason, value):
            raise SimulateError(reason=f"machine {self.key}: {reason}", value=value)

        seen: set[int] = set()
        for n in self.nodes:
            for cpu in n.cpus:
                if cpu in seen:
                    bad(f"CPU {cpu} is in two NUMA nodes", cpu)
                seen.add(cpu)
        if seen != set(range(len(seen))):
            bad("NUMA cpulists do not cover 0..N-1", format_index_list(seen))
        if len(seen) % (self.threads_per_core * self.sockets):
            bad("CPU count does not split into sockets and threads", len(seen))
        for n in self.nodes:
            for cpu in n.cpus:
                if self.cpu_socket(cpu) != n.socket:
                    bad(f"CPU {cpu} of node {n.id} is not on socket {n.socket}", cpu)
        node_ids = {n.id for n in self.nodes}
        bdfs: set[str] = set()
        for root, _, dev in self.walk():
            if dev.bdf in bdfs:
                bad(f"PCI address {dev.bdf} used twice", dev.bdf)
            bdfs.add(dev.bdf)
            if dev.numa_node not in node_ids or root.numa_node not in node_ids:
                bad(f"device {dev.bdf} is on unknown NUMA node {dev.numa_node}", dev.bdf)
        for dev in self.devices:
            if dev.sriov is not None:
                for i in range(dev.sriov.total_vfs):
                    vf = dev.sriov.vf_bdf(dev.bdf, i)
                    if vf in bdfs:
                        bad(f"VF {i} of {dev.bdf} would be at {vf}, which is taken", vf)
                    bdfs.add(vf)


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------
def _bdf(bus: int, dev: int = 0, fn: int = 0) -> str:
    return f"0000:{bus:02x}:{dev:02x}.{fn:x}"


def _dev(bus: int, dev: int, fn: int, ids: PciId, kind: str, numa: int, *children: PciDevice,
         label: str = "", role: str = "", sriov: Sriov | None = None) -> PciDevice:
    return PciDevice(bdf=_bdf(bus, dev, fn), vendor=ids.vendor, device=ids.device,
                     subsystem_vendor=ids.subsystem_vendor, subsystem_device=ids.subsystem_device,
                     class_code=ids.class_code, kind=kind, numa_node=numa, children=children,
                     label=label, role=role, revision=ids.revision, sriov=sriov)


def _br(bus: int, dev: int, ids: PciId, numa: int, *children: PciDevice) -> PciDevice:
    return _dev(bus, dev, 0, ids, "bridge", numa, *children)


def _node(node_id: int, socket: int, cpulist: str, memory_gib: int) -> NumaNode:
    return NumaNode(id=node_id, socket=socket, cpulist=cpulist, memory_mib=memory_gib * 1024,
                    hugepages={HUGEPAGE_1G_KIB: int(memory_gib * HUGEPAGE_SHARE),  # [INF: the host setup for VMs]
                               HUGEPAGE_2M_KIB: 0})                               # [INF: the host setup for VMs]


BRIDGE_CLASS = 0x060400           # PCI-to-PCI bridge (standard class code)
NVME_CLASS = 0x010802             # NVMe controller; notes give 0x0108, prog-if 02 is NVMe [INF]
IB_CLASS = 0x020700               # InfiniBand controller [REAL: nccl#1505, GDS lstopo]
ETH_CLASS = 0x020000              # Ethernet controller (standard class code)

# ================================================================================================
# DGX-2: 16x V100-SXM3-32GB, 12x NVSwitch gen1, 2 baseboards (notes §1)
# ================================================================================================
V100_SXM3 = PciId(0x10de, 0x1db8, 0x10de, 0x12ab, 0x030200,  # [REAL/DOC] GDS nvidia-smi --query-gpu on "dgx2>"
                  0xa1)                                       # revision [INF] as the A100/H100's
NVSWITCH1 = PciId(0x10de, 0x1ac2,                             # [DOC/REAL] FMG, GDS lspci -tv
                  0x10de, 0x1ac2,                             # subsystem [INF: invented for the fixture]
                  0x068000,                                   # "Bridge" 0x0680xx; low byte [INF: invented for the fixture]
                  0xa1)                                       # [DOC/REAL] lspci "Device 1ac2 (rev a1)"
CX5_IB = PciId(0x15b3, 0x1017,                                # CX-5 [INF] from the DGX-2 spec (EDR/100GbE)
               0x15b3, 0x0007, IB_CLASS)                      # subsystem [INF: invented for the fixture]
CX5_ETH = PciId(0x15b3, 0x1017, 0x15b3, 0x0008, ETH_CLASS)    # [INF: invented for the fixture]
MICRON_9200 = PciId(0x1344, 0x51c3, 0x1344, 0x0100,           # Micron 9200 PRO [REAL GDS]; ids [INF: invented for the fixture]
                    NVME_CLASS)
SKX_ROOT_PORT = PciId(0x8086, 0x2030, 0x8086, 0x0000, BRIDGE_CLASS)  # Xeon SP root port [INF: invented for the fixture]
DGX2_SWITCH = PciId(0x10b5, 0x9797, 0x10b5, 0x9797, BRIDGE_CLASS)    # PLX PEX9797 ports; DGX-2 switch ids [NOT FOUND] -> [INF: invented for the fixture]


def _dgx2_second_level(port_dev: int, down_bus: int, up_bus: int, gpu_a: int, gpu_b: int,
                       numa: int, first_gpu_index: int, nic_label: str) -> PciDevice:
    """First-level downstream port -> second-level switch with 2 GPUs and a NIC slot.

    GDS lspci -tv: ``04.0-[32-36] 00.0-[33-36] +00.0-[34] GPU \\10.0-[36] GPU`` [REAL/DOC];
    GDS text: "each second-level switch has ... a PCIe slot ... NIC or RAID card, and two GPUs"
    [DOC]; the NIC at the free bus between the two GPUs is [INF: invented for the fixture].
    """
    inner = up_bus + 1
    return _br(down_bus, port_dev, DGX2_SWITCH, numa,
               _br(up_bus, 0x00, DGX2_SWITCH, numa,
                   _br(inner, 0x00, DGX2_SWITCH, numa,
                       _dev(gpu_a, 0, 0, V100_SXM3, "gpu", numa, label=f"GPU{first_gpu_index}")),
                   _br(inner, 0x08, DGX2_SWITCH, numa,                      # [INF: invented for the fixture]
                       _dev(gpu_a + 1, 0, 0, CX5_IB, "nic", numa,           # [INF: invented for the fixture]
                            label=nic_label, role="compute")),
                   _br(inner, 0x10, DGX2_SWITCH, numa,
                       _dev(gpu_b, 0, 0, V100_SXM3, "gpu", numa, label=f"GPU{first_gpu_index + 1}"))))


def _dgx2_nvswitches(down_bus: int, up_bus: int, numa: int) -> PciDevice:
    """``\\10.0-[5f-67] 00.0-[60-67] +02.0-[61] +03.0-[62] +04.0-[63] +0a.0-[65] +0b.0-[66]
    \\0c.0-[67]`` (GDS lspci -tv) [REAL/DOC]."""
    inner = up_bus + 1
    ports = ((0x02, 2), (0x03, 3), (0x04, 4), (0x0a, 6), (0x0b, 7), (0x0c, 8))  # port dev, bus offset
    return _br(down_bus, 0x10, DGX2_SWITCH, numa,
               _br(up_bus, 0x00, DGX2_SWITCH, numa,
                   *(_br(inner, dev, DGX2_SWITCH, numa,
                         _dev(up_bus + off, 0, 0, NVSWITCH1, "nvswitch", numa))
                     for dev, off in ports)))


def _dgx2_root(root: int, numa: int, pairs, nvme: tuple[int, int], *, nvswitch_up: int | None = None,
               ethernet: int | None = None) -> PciRoot:
    """``[0000:2b] 00.0-[2c-3b] 00.0-[2d-3b] +00.0-[2e] NVMe +01.0-[2f] NVMe +04.0 ... \\0c.0``
    (GDS lspci -tv): root port, first-level switch, its downstream ports on bus root+2 [REAL/DOC]."""
    first, down = root + 1, root + 2
    ports = [_br(down, 0x00, DGX2_SWITCH, numa, _dev(nvme[0], 0, 0, MICRON_9200, "nvme", numa)),
             _br(down, 0x01, DGX2_SWITCH, numa, _dev(nvme[1], 0, 0, MICRON_9200, "nvme", numa))]
    for port_dev, up_bus, gpu_a, gpu_b, index, nic in pairs:
        ports.append(_dgx2_second_level(port_dev, down, up_bus, gpu_a, gpu_b, numa, index, nic))
    if ethernet is not None:
        # 2 more NICs on socket 1 (nccl-tests#78: mlx5_4..9 SYS to GPU0-7) [REAL]; one dual-port
        # Ethernet card in a free first-level slot [INF: invented for the fixture]
        ports.append(_br(down, 0x08, DGX2_SWITCH, numa,
                         _dev(ethernet, 0, 0, CX5_ETH, "nic", numa, role="ethernet"),
                         _dev(ethernet, 0, 1, CX5_ETH, "nic", numa, role="ethernet")))
    if nvswitch_up is not None:
        ports.append(_dgx2_nvswitches(down, nvswitch_up, numa))
    ports.sort(key=lambda d: d.bdf)
    return PciRoot(bus=f"0000:{root:02x}", numa_node=numa,
                   ports=(_br(root, 0x00, SKX_ROOT_PORT, numa,
                              _br(first, 0x00, DGX2_SWITCH, numa, *ports)),))


DGX2 = Machine(
    key="dgx2",
    sys_vendor="NVIDIA",                      # [REAL] dmidecode, lablup/backend.ai#113
    product_name="NVIDIA DGX-2",              # [REAL] same source
    cpu_model="Intel Xeon Platinum 8168",     # [INF] public spec (24C)
    sockets=2,                                # [REAL] GDS "two CPU sockets"
    threads_per_core=2,                       # [REAL] affinity 0-23,48-71 (nccl-tests#78)
    nodes=(
        _node(0, 0, "0-23,48-71", 768),       # [REAL] nccl-tests#78 GPU0-7 affinity; 1.5 TB / 2 [INF]
        _node(1, 1, "24-47,72-95", 768),      # [INF] the matching half
    ),
    # Roots 2b, 4e on socket 0 (GPUs 0-7, NUMA 0) [REAL topo]; ae, d7 on socket 1 [INF].
    # GPU BDFs [REAL] IT4I nvidia-smi + GDS; tree [REAL/DOC] GDS lspci -tv.
    pci_roots=(
        _dgx2_root(0x2b, 0, ((0x04, 0x32, 0x34, 0x36, 0, "mlx5_0"),
                             (0x0c, 0x37, 0x39, 0x3b, 2, "mlx5_1")), (0x2e, 0x2f)),
        _dgx2_root(0x4e, 0, ((0x04, 0x55, 0x57, 0x59, 4, "mlx5_2"),
                             (0x0c, 0x5a, 0x5c, 0x5e, 6, "mlx5_3")), (0x51, 0x52),
                   nvswitch_up=0x5f),         # NVSwitches 61-67, baseboard A [REAL GDS]
        _dgx2_root(0xae, 1, ((0x04, 0xb5, 0xb7, 0xb9, 8, ""),
                             (0x0c, 0xba, 0xbc, 0xbe, 10, "")), (0xb1, 0xb2),
                   nvswitch_up=0xbf),         # NVSwitches c1-c7, baseboard B [REAL GDS]
        _dgx2_root(0xd7, 1, ((0x04, 0xde, 0xe0, 0xe2, 12, ""),
                             (0x0c, 0xe3, 0xe5, 0xe7, 14, "")), (0xda, 0xdb),
                   ethernet=0xdc),            # [INF: invented for the fixture]
    ),
)

# ================================================================================================
# DGX A100: 8x A100-SXM4-80GB, 6x NVSwitch gen2, 1 baseboard (notes §2)
# ================================================================================================
A100_SXM4_80 = PciId(0x10de, 0x20b2, 0x10de, 0x1463, 0x030200,  # [REAL/DOC] GDS lstopo "0302 [10de:20b2] [10de:1463]
                     0xa1)                                      # a1" [REAL/DOC] same lstopo pci_type
NVSWITCH2 = PciId(0x10de, 0x1af1,                               # [DOC/REAL] FMG lspci, nccl#1505
                  0x10de, 0x1af1,                               # subsystem [INF: invented for the fixture]
                  0x068000,                                     # [REAL] nccl#1505 tclass="0x068000"
                  0xa1)                                         # revision [INF] as gen1's
CX6_COMPUTE = PciId(0x15b3, 0x101b, 0x15b3, 0x0007, IB_CLASS)   # [REAL] nccl#1505, GDS lstopo
CX6_STORAGE = PciId(0x15b3, 0x101b, 0x15b3, 0x0009, IB_CLASS)   # [REAL] nccl#1505 (subsys 0009, numaid 0)
# SR-IOV of the compute HCAs. VF device id 101c "MT28908 Family [ConnectX-6 Virtual Function]"
# [DOC: PCI ID repository, pci-ids.ucw.cz/read/PC/15b3/101c]. Total VFs is what the site's
# firmware setting says (mlxconfig SRIOV_EN=1 NUM_OF_VFS=N, NVIDIA BasePOD deployment guide
# "SR-IOV", docs.nvidia.com/dgx-basepod/deployment-guide-dgx-basepod/latest/sriov.html) [DOC];
# 16 is [INF: invented for the fixture]. First VF offset 1, stride 1 for a single-function PF
# [INF: what lspci -vvv shows for ConnectX single-port cards; not seen on a DGX].
CX6_SRIOV = Sriov(total_vfs=16, vf_device=0x101c)
PM173X = PciId(0x144d, 0xa824, 0x144d, 0xa801, NVME_CLASS)      # [REAL] GDS lstopo (Samsung PM173x)
PEX_HOST = PciId(0x1000, 0xc010, 0x1000, 0xa096, BRIDGE_CLASS)  # [REAL] nccl#1505, GDS lstopo (host-side ports)
PEX_HGX = PciId(0x1000, 0xc010, 0x10de, 0x13b8, BRIDGE_CLASS)   # [REAL] GDS lstopo (switch on the HGX baseboard)
ROME_ROOT_PORT = PciId(0x1022, 0x1483, 0x1022, 0x1453, BRIDGE_CLASS)  # EPYC GPP bridge [INF: invented for the fixture]


def _a100_pair(root: int, numa: int, gpu_a: int, gpu_b: int, nic_a: int, nic_b: int,
               index: int, nic_labels: tuple[str, str], nvme: tuple[int, ...] = (),
               nvswitch_up: int | None = None) -> PciRoot:
    """One GPU pair's switch complex, following GDS lstopo around GPU0/GPU1 (notes §2.5) [REAL]:

    ``01:00.0 -> 02:00.0 -> 03:00.0 -> 04:00.0 -> 05:00.0 -> 06:00.0 -> 07 GPU0``, ``04:10.0/14.0 ->
    NVMe``, ``02:04.0 -> 0a:00.0 -> 0b:00.0 -> 0c NIC``, ``0b:10.0 -> 0d:00.0 -> 0e:00.0 -> 0f GPU1``.
    Repeated for each pair [INF]; the second NIC's branch (``02:0c.0``), the NVSwitch branch, the
    root port and root bus are [INF: invented for the fixture].
    """
    up = gpu_a - 6                   # host switch upstream port (01:00.0)
    down = gpu_a - 5                 # its downstream ports (02:xx.0)
    gpu_branch = _br(down, 0x00, PEX_HOST, numa,
                     _br(gpu_a - 4, 0x00, PEX_HOST, numa,
                         _br(gpu_a - 3, 0x00, PEX_HOST, numa,
                             _br(gpu_a - 2, 0x00, PEX_HGX, numa,
                                 _br(gpu_a - 1, 0x00, PEX_HGX, numa,
                                     _dev(gpu_a, 0, 0, A100_SXM4_80, "gpu", numa, label=f"GPU{index}")))),
                         *(_br(gpu_a - 3, port, PEX_HOST, numa, _dev(bus, 0, 0, PM173X, "nvme", numa))
                           for port, bus in zip((0x10, 0x14), nvme))))
    nic_a_branch = _br(down, 0x04, PEX_HOST, numa,
                       _br(nic_a - 2, 0x00, PEX_HOST, numa,
                           _br(nic_a - 1, 0x00, PEX_HOST, numa,
                               _dev(nic_a, 0, 0, CX6_COMPUTE, "nic", numa,
                                    label=nic_labels[0], role="compute", sriov=CX6_SRIOV)),
                           _br(nic_a - 1, 0x10, PEX_HOST, numa,
                               _br(gpu_b - 2, 0x00, PEX_HGX, numa,
                                   _br(gpu_b - 1, 0x00, PEX_HGX, numa,
                                       _dev(gpu_b, 0, 0, A100_SXM4_80, "gpu", numa,
                                            label=f"GPU{index + 1}"))))))
    branches = [gpu_branch, nic_a_branch]
    if nvswitch_up is not None:      # NVSwitch parent path [NOT FOUND] -> [INF: invented for the fixture]
        branches.append(_br(down, 0x08, PEX_HOST, numa,
                            _br(nvswitch_up, 0x00, PEX_HGX, numa,
                                *(_br(nvswitch_up + 1, i, PEX_HGX, numa,
                                      _dev(nvswitch_up + 2 + i, 0, 0, NVSWITCH2, "nvswitch", numa))
                                  for i in range(6)))))
    branches.append(_br(down, 0x0c, PEX_HOST, numa,
                        _br(nic_b - 2, 0x00, PEX_HOST, numa,
                            _br(nic_b - 1, 0x00, PEX_HOST, numa,
                                _dev(nic_b, 0, 0, CX6_COMPUTE, "nic", numa,
                                     label=nic_labels[1], role="compute", sriov=CX6_SRIOV)))))
    return PciRoot(bus=f"0000:{root:02x}", numa_node=numa,
                   ports=(_dev(root, 0x01, 1, ROME_ROOT_PORT, "bridge", numa,
                               _br(up, 0x00, PEX_HOST, numa, *branches)),))


DGX_A100 = Machine(
    key="dgx-a100",
    nvswitch_driver="nvidia-nvswitch",   # [INF: FMG Shared NVSwitch mode, dgxvm's on this machine]
    sys_vendor="NVIDIA",                          # [REAL] dmidecode (notes §2.1)
    product_name="DGXA100 920-23687-2531-001",    # [REAL] dmidecode (notes §2.1)
    cpu_model="AMD EPYC 7742",                    # [INF] public spec; Rome per nccl#1505 XML [REAL]
    sockets=2,                                    # [INF] public spec
    threads_per_core=2,                           # [INF] 256 CPUs, consistent with topo CPU 240-255
    # NPS4: 8 nodes, node n = 16n..16n+15,128+16n..128+16n+15 [REAL for 0,1,3,5,7; INF for 2,4,6];
    # nodes 0-3 socket 0 [INF]; 1 TB / 8 = 128 GiB per node [INF]
    nodes=tuple(_node(n, n // 4, f"{16 * n}-{16 * n + 15},{128 + 16 * n}-{128 + 16 * n + 15}", 128)
                for n in range(8)),
    # GPU BDFs/NUMA [REAL] charmed-kubernetes nvidia-dgx.md, pc2/cc-slurm-sync, nccl#1505, DCGM#149.
    # Compute NIC BDFs [INF] from ibpNNs0 names (0c [REAL] GDS, nccl#1505); pairing by topo PXB [REAL].
    pci_roots=(
        _a100_pair(0x00, 3, 0x07, 0x0f, 0x0c, 0x12, 0, ("mlx5_0", "mlx5_1"),
                   nvme=(0x08, 0x09)),             # NVMe 08/09 [REAL] GDS lstopo
        _a100_pair(0x40, 1, 0x47, 0x4e, 0x4b, 0x54, 2, ("mlx5_2", "mlx5_3")),
        # storage NIC 61:00.0/.1 = mlx5_4/5, NUMA 0 [REAL] nccl#1505; root port [INF: invented for the fixture]
        PciRoot(bus="0000:60", numa_node=0,
                ports=(_dev(0x60, 0x01, 1, ROME_ROOT_PORT, "bridge", 0,
                            _dev(0x61, 0, 0, CX6_STORAGE, "nic", 0, label="mlx5_4", role="storage"),
                            _dev(0x61, 0, 1, CX6_STORAGE, "nic", 0, label="mlx5_5", role="storage")),)),
        _a100_pair(0x80, 7, 0x87, 0x90, 0x8d, 0x94, 4, ("mlx5_6", "mlx5_7"),
                   nvme=(0x88, 0x89)),             # [INF: invented for the fixture]
        # NVSwitches c4..c9 [REAL] nccl#1505; NUMA 5 and parent [INF]
        _a100_pair(0xb0, 5, 0xb7, 0xbd, 0xba, 0xcc, 6, ("mlx5_8", "mlx5_9"), nvswitch_up=0xc2),
    ),
)

# ================================================================================================
# DGX H100: 8x H100-SXM5-80GB, 4x NVSwitch gen3, 1 baseboard (notes §3)
# ================================================================================================
H100_SXM5 = PciId(0x10de, 0x2330, 0x10de, 0x16c1, 0x030200,   # [REAL] FMG lspci, config hexdump (landontclipp.github.io)
                  0xa1)                                        # [REAL] same hexdump "00a1 0302"
NVSWITCH3 = PciId(0x10de, 0x22a3,                              # [DOC] FMG lspci
                  0x10de, 0x22a3,                              # subsystem [INF: invented for the fixture]
                  0x068000,                                    # "Bridge" 0x0680xx; low byte [INF: invented for the fixture]
                  0xa1)                                        # revision [INF] as gen1's
CX7_COMPUTE = PciId(0x15b3, 0x1021,                            # [INF] nccl-tests#213 (HGX H800); MT4129 [REAL] on DGX H100
                    0x15b3, 0x0023, IB_CLASS)                  # subsys [REAL, other box] nccl-tests#213
CX7_STORAGE_IB = PciId(0x15b3, 0x1021, 0x15b3, 0x0023, IB_CLASS)    # port 1 ibpNNs0f0 [DOC H100UG]; ids [INF]
CX7_STORAGE_ETH = PciId(0x15b3, 0x1021, 0x15b3, 0x0023, ETH_CLASS)  # port 2 enpNNs0f1np1 [DOC H100UG]; ids [INF]
# VF device id 101e "ConnectX Family mlx5Gen Virtual Function" (the one VF id of ConnectX-6 Dx
# and later, CX-7 included) [DOC: PCI ID repository, pci-ids.ucw.cz/read/PC/15b3/101e]; total
# VFs, offset and stride as CX6_SRIOV [INF].
CX7_SRIOV = Sriov(total_vfs=16, vf_device=0x101e)
PEX89 = PciId(0x1000, 0xc030, 0x1000, 0x100b, BRIDGE_CLASS)    # [REAL, other box] nccl-tests#213; on DGX H100 [INF]
SPR_ROOT_PORT = PciId(0x8086, 0x352a, 0x8086, 0x0000, BRIDGE_CLASS)  # Xeon root port [INF: invented for the fixture]


def _h100_pair(gpu: int, nic: int, numa: int, index: int, nic_label: str) -> PciRoot:
    """One PCIe switch per GPU/NIC pair: NIC bus = GPU bus - 3 (notes §3.3) [INF]; the whole tree
    (root bus = GPU bus - 6, root port, second switch level) is [INF: invented for the fixture]."""
    assert nic == gpu - 3
    root, up, down = gpu - 6, gpu - 5, gpu - 4
    return PciRoot(bus=f"0000:{root:02x}", numa_node=numa, ports=(
        _br(root, 0x01, SPR_ROOT_PORT, numa,
            _br(up, 0x00, PEX89, numa,
                _br(down, 0x00, PEX89, numa,
                    _dev(nic, 0, 0, CX7_COMPUTE, "nic", numa, label=nic_label, role="compute",
                         sriov=CX7_SRIOV)),
                _br(down, 0x01, PEX89, numa,
                    _br(gpu - 2, 0x00, PEX89, numa,
                        _br(gpu - 1, 0x00, PEX89, numa,
                            _dev(gpu, 0, 0, H100_SXM5, "gpu", numa, label=f"GPU{index}")))))),))


def _h100_storage(bus: int, numa: int, labels: tuple[str, str]) -> PciRoot:
    """Dual-port CX-7 storage card; root port [INF: invented for the fixture]."""
    return PciRoot(bus=f"0000:{bus - 1:02x}", numa_node=numa, ports=(
        _br(bus - 1, 0x01, SPR_ROOT_PORT, numa,
            _dev(bus, 0, 0, CX7_STORAGE_IB, "nic", numa, label=labels[0], role="storage"),
            _dev(bus, 0, 1, CX7_STORAGE_ETH, "nic", numa, label=labels[1], role="storage")),))


DGX_H100 = Machine(
    key="dgx-h100",
    nvswitch_driver="nvidia-nvswitch",   # [INF: FMG Shared NVSwitch mode, dgxvm's on this machine]
    sys_vendor="NVIDIA",                  # [INF] consistent with DGX-2/A100
    product_name="DGXH100",               # [INF] UNVERIFIED: Redfish model in a DGX H100 simulator; no real dmidecode found
    cpu_model="Intel Xeon Platinum 8480C",  # [REAL] /proc/cpuinfo on a DGX OS host (notes §3.2)
    sockets=2,                            # [REAL] dmidecode CPU0/CPU1
    threads_per_core=2,                   # [REAL] siblings 112, cpu cores 56
    nodes=(
        _node(0, 0, "0-55,112-167", 1024),    # [REAL on HGX] nccl#1264, DeepEP#145; [INF] for DGX; 2 TB / 2 [INF]
        _node(1, 1, "56-111,168-223", 1024),  # same
    ),
    # GPU BDFs [REAL] nvidia-smi, FMG; NUMA 0 for GPUs 0-3, 1 for 4-7 [INF] H100UG "CPU 0/1".
    # GPU<->NIC pairing [DOC] H100UG table 6; NIC BDFs/mlx5 names [DOC] H100UG table 5.
    pci_roots=(
        # 4 NVSwitches 07-0a [DOC] FMG lspci; NUMA 0 [INF]; parent path [INF: invented for the fixture]
        PciRoot(bus="0000:00", numa_node=0, ports=(
            _br(0x00, 0x02, SPR_ROOT_PORT, 0,
                _br(0x05, 0x00, PEX89, 0,
                    *(_br(0x06, i, PEX89, 0, _dev(0x07 + i, 0, 0, NVSWITCH3, "nvswitch", 0))
                      for i in range(4)))),)),
        _h100_pair(0x1b, 0x18, 0, 0, "mlx5_0"),
        _h100_storage(0x29, 0, ("mlx5_1", "mlx5_2")),   # Slot2 [DOC] H100UG; NUMA 0 [INF]
        _h100_pair(0x43, 0x40, 0, 1, "mlx5_3"),
        _h100_pair(0x52, 0x4f, 0, 2, "mlx5_4"),
        _h100_pair(0x61, 0x5e, 0, 3, "mlx5_5"),
        _h100_pair(0x9d, 0x9a, 1, 4, "mlx5_6"),
        _h100_storage(0xaa, 1, ("mlx5_7", "mlx5_8")),   # Slot1 [DOC] H100UG; NUMA 1 [INF]
        _h100_pair(0xc3, 0xc0, 1, 5, "mlx5_9"),
        _h100_pair(0xd1, 0xce, 1, 6, "mlx5_10"),
        _h100_pair(0xdf, 0xdc, 1, 7, "mlx5_11"),
    ),
)

MACHINES: dict[str, Machine] = {"dgx2": DGX2, "dgx-a100": DGX_A100, "dgx-h100": DGX_H100}
