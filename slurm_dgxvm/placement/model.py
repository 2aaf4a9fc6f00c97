"""Frozen values of placement: what is asked, what is taken, what was decided."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# partitions.NAME.ib: what of the nearest HCAs a VM gets (config.IB_MODES says the same; this
# module does not import the config: the ledger and `dgxvm run` load it without)
IB_MODES = ("none", "vf", "port")


def _frozen_map(m: Mapping[int, int] | None) -> Mapping[int, int]:
    return MappingProxyType(dict(sorted((m or {}).items())))


@dataclass(frozen=True)
class Occupancy:
    """What other VMs hold right now, as the ledger sees it. Physical identities only.

    GPUs and NVSwitches by PCI address (stable when indices shift on a degraded host), host CPUs
    by id, memory in MiB per NUMA node, Fabric Manager partitions by id, InfiniBand functions
    (SR-IOV VFs, or whole HCA ports) by PCI address.
    """

    gpus: frozenset[str] = frozenset()
    nvswitches: frozenset[str] = frozenset()
    cpus: frozenset[int] = frozenset()
    memory_mib: Mapping[int, int] = field(default_factory=dict)
    fm_partitions: frozenset[int] = frozenset()
    ib_functions: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "memory_mib", _frozen_map(self.memory_mib))

    def _key(self):
        return (self.gpus, self.nvswitches, self.cpus, tuple(self.memory_mib.items()),
                self.fm_partitions, self.ib_functions)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        if not isinstance(other, Occupancy):
            return NotImplemented
        return self._key() == other._key()

    @classmethod
    def union(cls, parts: Iterable[Occupancy]) -> Occupancy:
        gpus: set[str] = set()
        sws: set[str] = set()
        cpus: set[int] = set()
        mem: dict[int, int] = {}
        fms: set[int] = set()
        ibs: set[str] = set()
        for p in parts:
            gpus |= p.gpus
            sws |= p.nvswitches
            cpus |= p.cpus
            fms |= p.fm_partitions
            ibs |= p.ib_functions
            for node, mib in p.memory_mib.items():
                mem[node] = mem.get(node, 0) + mib
        return cls(frozenset(gpus), frozenset(sws), frozenset(cpus), mem, frozenset(fms),
                   frozenset(ibs))


EMPTY = Occupancy()


@dataclass(frozen=True)
class Request:
    """A request for a GPU VM.

    ``count``: GPUs wanted. ``gpu_index``: the first GPU of the block an admin asks for (the
    CLI's ``--gpu-index``).
    ``slurm_gpus``: the indices slurmctld chose (SLURM_JOB_GPUS). Overrides are None for "the
    sizing template's value". ``ib``: one of :data:`IB_MODES` (the partition's ``ib``): "vf"
    gives each GPU an SR-IOV VF of its nearest InfiniBand HCA, "port" the whole HCA.
    """

    count: int
    gpu_index: int | None = None
    slurm_gpus: tuple[int, ...] | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    disk_gib: int | None = None
    ib: str = "none"


@dataclass(frozen=True)
class IbFunction:
    """An InfiniBand function passed into the VM: an SR-IOV VF of an HCA, or the HCA's
    physical function itself (a whole port)."""

    pci: str                       # what goes into the VM
    hca: str                       # the HCA (physical function) it belongs to
    gpu: int                       # the GPU it serves: it sits beside it in the guest
    vf: int | None                 # the VF's index (virtfnN); None for a whole port

    def to_json(self) -> dict:
        return {"pci": self.pci, "hca": self.hca, "gpu": self.gpu, "vf": self.vf}

    @classmethod
    def from_json(cls, d: dict) -> IbFunction:
        vf = d["vf"]
        return cls(pci=str(d["pci"]), hca=str(d["hca"]), gpu=int(d["gpu"]),
                   vf=None if vf is None else int(vf))


@dataclass(frozen=True)
class NumaCell:
    """One guest NUMA cell, mirroring one host node of the placement."""

    host_node: int
    gpus: tuple[int, ...]          # GPU indices on this node
    cpus: tuple[int, ...]          # host CPUs pinned, in vCPU order
    vcpus: tuple[int, ...]         # guest vCPU ids of this cell
    memory_mib: int


@dataclass(frozen=True)
class Placement:
    """The decision for one VM. Built only by :func:`slurm_dgxvm.placement.place`."""

    machine: str
    gpus: tuple[int, ...]              # physical GPU indices (PCI order = nvidia-smi = Slurm)
    gpu_pcis: tuple[str, ...]
    slurm_gpus: tuple[int, ...] | None  # what Slurm chose, when it chose
    aligned: bool                      # the set is a legal block of the machine
    remapped: bool                     # the set differs from Slurm's
    reason: str                        # one line: why this set
    nvswitches: tuple[str, ...]        # PCI addresses passed through with the GPUs
    fm_partition: int | None           # Fabric Manager partition to activate (shared-nvswitch)
    cells: tuple[NumaCell, ...]
    emulator_cpus: tuple[int, ...]     # host-reserved CPUs of the same nodes, for QEMU's threads
    hugepage_kib: int | None
    disk_gib: int
    nics: tuple[str, ...]              # NICs behind the same PCIe switches as the GPUs
    ib_mode: str = "none"              # Request.ib
    ib: tuple[IbFunction, ...] = ()    # InfiniBand functions passed in, in GPU order

    @property
    def numa_nodes(self) -> tuple[int, ...]:
        return tuple(c.host_node for c in self.cells)

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(cpu for c in self.cells for cpu in c.cpus)

    @property
    def vcpus(self) -> int:
        return sum(len(c.vcpus) for c in self.cells)

    @property
    def memory_mib(self) -> int:
        return sum(c.memory_mib for c in self.cells)

    @property
    def memory_per_node(self) -> dict[int, int]:
        return {c.host_node: c.memory_mib for c in self.cells}

    def occupancy(self) -> Occupancy:
        """What this placement takes, for the ledger."""
        return Occupancy(
            gpus=frozenset(self.gpu_pcis),
            nvswitches=frozenset(self.nvswitches),
            cpus=frozenset(self.cpus),
            memory_mib=self.memory_per_node,
            fm_partitions=frozenset({self.fm_partition} if self.fm_partition is not None else ()),
            ib_functions=frozenset(f.pci for f in self.ib),
        )

    def to_json(self) -> dict:
        """The ``plan --json`` interface: keys are stable (scripts and monitoring read them)."""
        return {
            "machine": self.machine,
            "gpus": list(self.gpus),
            "gpu_pcis": list(self.gpu_pcis),
            "slurm_gpus": list(self.slurm_gpus) if self.slurm_gpus is not None else None,
            "aligned": self.aligned,
            "remapped": self.remapped,
            "reason": self.reason,
            "numa_nodes": list(self.numa_nodes),
            "cpus": list(self.cpus),
            "emulator_cpus": list(self.emulator_cpus),
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "memory_mib_per_node": {str(k): v for k, v in self.memory_per_node.items()},
            "hugepage_kib": self.hugepage_kib,
            "disk_gib": self.disk_gib,
            "nvswitches": list(self.nvswitches),
            "fm_partition": self.fm_partition,
            "nics": list(self.nics),
            "cells": [
                {"host_node": c.host_node, "gpus": list(c.gpus), "cpus": list(c.cpus),
                 "vcpus": list(c.vcpus), "memory_mib": c.memory_mib}
                for c in self.cells
            ],
            # only with InfiniBand: a placement without it reads as releases before it wrote it
            **({"ib_mode": self.ib_mode, "ib": [f.to_json() for f in self.ib]}
               if self.ib_mode != "none" else {}),
        }

    @classmethod
    def from_json(cls, data: dict) -> Placement:
        """The inverse of :meth:`to_json` (the derived keys are recomputed from the cells).
        ``ib_mode`` and ``ib`` may be absent (what releases before them wrote): no InfiniBand.

        Raises ValueError, KeyError or TypeError on a document that is not one.
        """
        if not isinstance(data, dict):
            raise ValueError(f"placement must be an object, not {type(data).__name__}")

        def ints(value) -> tuple[int, ...]:
            if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
                raise ValueError(f"expected a list of integers, not {value!r}")
            return tuple(value)

        def strs(value) -> tuple[str, ...]:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"expected a list of strings, not {value!r}")
            return tuple(value)

        cells = tuple(NumaCell(host_node=int(c["host_node"]), gpus=ints(c["gpus"]),
                               cpus=ints(c["cpus"]), vcpus=ints(c["vcpus"]),
                               memory_mib=int(c["memory_mib"]))
                      for c in data["cells"])
        slurm = data["slurm_gpus"]
        fm = data["fm_partition"]
        huge = data["hugepage_kib"]
        return cls(machine=str(data["machine"]), gpus=ints(data["gpus"]),
                   gpu_pcis=strs(data["gpu_pcis"]),
                   slurm_gpus=None if slurm is None else ints(slurm),
                   aligned=bool(data["aligned"]), remapped=bool(data["remapped"]),
                   reason=str(data["reason"]), nvswitches=strs(data["nvswitches"]),
                   fm_partition=None if fm is None else int(fm), cells=cells,
                   emulator_cpus=ints(data["emulator_cpus"]),
                   hugepage_kib=None if huge is None else int(huge),
                   disk_gib=int(data["disk_gib"]), nics=strs(data["nics"]),
                   ib_mode=str(data.get("ib_mode", "none")),
                   ib=tuple(IbFunction.from_json(f) for f in data.get("ib", ())))
