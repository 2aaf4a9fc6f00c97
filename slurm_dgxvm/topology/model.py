"""The frozen host model: what a GPU server is made of, as placement needs it.

Built once by :func:`slurm_dgxvm.topology.discover`; nothing here reads files or decides policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

FULL_PASSTHROUGH = "full-passthrough"   # NVSwitches go into the VM with their GPUs (DGX-2)
SHARED_NVSWITCH = "shared-nvswitch"     # the host's Fabric Manager keeps them (DGX A100/H100)
NO_NVSWITCH = "none"                    # PCIe-only GPU server
NVSWITCH_MODELS = (FULL_PASSTHROUGH, SHARED_NVSWITCH, NO_NVSWITCH)


@dataclass(frozen=True)
class HugePagePool:
    size_kib: int
    total: int
    free: int


@dataclass(frozen=True)
class NumaNode:
    id: int
    socket: int
    cpus: tuple[int, ...]
    memory_mib: int
    hugepages: tuple[HugePagePool, ...] = ()

    def hugepage_pool(self, size_kib: int) -> HugePagePool | None:
        for pool in self.hugepages:
            if pool.size_kib == size_kib:
                return pool
        return None


@dataclass(frozen=True)
class Core:
    """A physical core: all its hardware threads go to one VM or to none."""

    socket: int
    core_id: int
    node: int
    threads: tuple[int, ...]   # host CPU ids, ascending


@dataclass(frozen=True)
class Gpu:
    index: int                 # position in PCI bus order among present GPUs = nvidia-smi = Slurm
    pci: str
    vendor_id: str             # "10de"
    device_id: str             # "1db8"
    numa_node: int | None
    numa_source: str           # where numa_node came from: sysfs, local_cpulist, bridge, catalog
    iommu_group: int | None
    bridges: tuple[str, ...]   # upstream PCI bridges, root port first
    board: int                 # baseboard (0 on single-board machines)
    slot: int                  # position in the catalog's reference list (physical slot)
    module_id: int | None      # Fabric Manager physical/module id, when the machine has one
    driver: str | None
    healthy: bool = True
    nics: tuple[str, ...] = ()  # the NICs behind this GPU's deepest shared PCIe switch
    # InfiniBand HCAs (physical functions) behind a PCIe switch this GPU is also behind, with the
    # number of bridges they share with it: deepest (nearest) first
    hcas: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class MissingGpu:
    """A GPU the machine should have but that is not on the PCI bus (failed to enumerate)."""

    pci: str
    slot: int
    board: int


@dataclass(frozen=True)
class NvSwitch:
    pci: str
    device_id: str
    board: int
    numa_node: int | None


@dataclass(frozen=True)
class VirtualFunction:
    """An SR-IOV virtual function of a NIC, enabled by the host (``sriov_numvfs``)."""

    pci: str
    index: int                 # N of the PF's virtfnN
    device_id: str             # "101c"
    iommu_group: int | None
    driver: str | None         # vfio-pci when it is ready for a VM
    numa_node: int | None


@dataclass(frozen=True)
class Nic:
    pci: str
    vendor_id: str
    device_id: str
    kind: str                  # "infiniband" or "ethernet"
    numa_node: int | None
    bridges: tuple[str, ...]
    near_gpus: tuple[int, ...]  # GPU indices behind the same PCIe switch
    total_vfs: int = 0          # sriov_totalvfs; 0: no SR-IOV
    vfs: tuple[VirtualFunction, ...] = ()   # enabled, by index
    rdma_device: str | None = None   # mlx5_0
    node_guid: str | None = None     # 0xb8cef60300a1b2c4
    netdev: str | None = None        # its network interface (ibp12s0): `ip link set DEV vf N`


@dataclass(frozen=True)
class GpuBlock:
    """A legal set of GPUs for one VM, with what goes with it."""

    gpus: tuple[int, ...]          # GPU indices, ascending
    nvswitches: tuple[str, ...]    # PCI addresses (full-passthrough only)
    fm_partition: int | None       # Fabric Manager partition id (shared-nvswitch only)

    @property
    def size(self) -> int:
        return len(self.gpus)


@dataclass(frozen=True)
class Host:
    machine: str                   # catalog key: dgx2, dgx-a100, dgx-h100, generic
    display_name: str
    product_name: str | None       # DMI product_name as read
    match: str                     # how the catalog entry was chosen, one line
    simulated: str | None          # the machine a simulated sysfs imitates; None on real hardware
    nvswitch_model: str
    numa_nodes: tuple[NumaNode, ...]
    cores: tuple[Core, ...]
    gpus: tuple[Gpu, ...]
    missing_gpus: tuple[MissingGpu, ...]
    nvswitches: tuple[NvSwitch, ...]
    nics: tuple[Nic, ...]
    blocks: tuple[GpuBlock, ...]   # legal blocks made only of present, healthy GPUs
    block_sizes: tuple[int, ...]   # legal sizes on a healthy machine of this model
    notes: tuple[str, ...] = ()    # what discovery had to work around, for people to read

    # -- lookups ----------------------------------------------------------------------------------
    @cached_property
    def _node_by_id(self) -> dict[int, NumaNode]:
        return {n.id: n for n in self.numa_nodes}

    def node(self, node_id: int) -> NumaNode:
        return self._node_by_id[node_id]

    def gpu(self, index: int) -> Gpu:
        return self.gpus[index]

    @cached_property
    def sockets(self) -> tuple[int, ...]:
        return tuple(sorted({n.socket for n in self.numa_nodes}))

    @cached_property
    def threads_per_core(self) -> int:
        return max((len(c.threads) for c in self.cores), default=1)

    @cached_property
    def cores_by_node(self) -> dict[int, tuple[Core, ...]]:
        out: dict[int, list[Core]] = {n.id: [] for n in self.numa_nodes}
        for core in self.cores:
            out.setdefault(core.node, []).append(core)
        return {k: tuple(sorted(v, key=lambda c: c.threads)) for k, v in out.items()}

    @cached_property
    def gpus_by_node(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = {}
        for g in self.gpus:
            if g.numa_node is not None:
                out.setdefault(g.numa_node, []).append(g.index)
        return {k: tuple(v) for k, v in sorted(out.items())}

    @cached_property
    def passthrough_pcis(self) -> tuple[str, ...]:
        """PCI addresses of the devices dgxvm gives to VMs, GPUs first: every GPU, and the
        NVSwitches where they go with their GPUs (full passthrough, DGX-2); on shared-NVSwitch
        machines Fabric Manager keeps the switches on the host's driver."""
        out = [g.pci for g in self.gpus]
        if self.nvswitch_model == FULL_PASSTHROUGH:
            out += [s.pci for s in self.nvswitches]
        return tuple(out)

    @cached_property
    def nic_by_pci(self) -> dict[str, Nic]:
        return {n.pci: n for n in self.nics}

    @cached_property
    def blocks_by_size(self) -> dict[int, tuple[GpuBlock, ...]]:
        out: dict[int, list[GpuBlock]] = {}
        for b in self.blocks:
            out.setdefault(b.size, []).append(b)
        return {k: tuple(v) for k, v in sorted(out.items())}

    @cached_property
    def block_by_gpus(self) -> dict[tuple[int, ...], GpuBlock]:
        return {b.gpus: b for b in self.blocks}

    def to_json(self) -> dict:
        """The ``topology show --json`` interface; these keys are stable."""
        gpus = [
            {"index": g.index, "pci": g.pci, "numa_node": g.numa_node, "board": g.board,
             "healthy": g.healthy, "iommu_group": g.iommu_group, "device_id": g.device_id,
             "module_id": g.module_id, "driver": g.driver}
            for g in self.gpus
        ] + [
            {"index": None, "pci": m.pci, "numa_node": None, "board": m.board, "healthy": False,
             "iommu_group": None, "device_id": None, "module_id": None, "driver": None,
             "missing": True}
            for m in self.missing_gpus
        ]
        return {
            "machine": self.machine,
            "display_name": self.display_name,
            "product_name": self.product_name,
            "match": self.match,
            "simulated": self.simulated,
            "nvswitch_model": self.nvswitch_model,
            "gpus": gpus,
            "nvswitches": [{"pci": s.pci, "board": s.board, "numa_node": s.numa_node}
                           for s in self.nvswitches],
            "numa_nodes": [
                {"id": n.id, "socket": n.socket, "cpus": list(n.cpus), "memory_mib": n.memory_mib,
                 "hugepages": [{"size_kib": p.size_kib, "total": p.total, "free": p.free}
                               for p in n.hugepages]}
                for n in self.numa_nodes
            ],
            "nics": [{"pci": n.pci, "kind": n.kind, "numa_node": n.numa_node,
                      "near_gpus": list(n.near_gpus), "total_vfs": n.total_vfs,
                      "vfs": [vf.pci for vf in n.vfs], "rdma_device": n.rdma_device,
                      "node_guid": n.node_guid} for n in self.nics],
            "blocks": [{"gpus": list(b.gpus), "nvswitches": list(b.nvswitches),
                        "fm_partition": b.fm_partition} for b in self.blocks],
            "notes": list(self.notes),
        }
