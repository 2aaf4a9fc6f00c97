"""Sizing: how many cores and how much memory a VM of k GPUs gets on each NUMA node.

Like nvidia-vm's fixed 1/2/4/8/16-GPU templates, but derived from the machine: a VM gets the share
of each node's usable cores and memory that its GPUs are of that node's GPUs, rounded down to
whole cores and whole huge pages::

    cores(node, k) = floor(usable_cores(node) * k / gpus_on(node))

Because floor(a) + floor(b) <= floor(a + b), any set of disjoint VMs on one node fits in it: a free
aligned block never fails for want of cores or memory when every VM took its template.
Example, DGX-2 (24 cores and 8 GPUs per node, 1 core reserved): 1 GPU -> 2 cores = 4 vCPUs,
2 -> 5 cores = 10 vCPUs, 4 -> 11 cores = 22, 8 -> 23 cores = 46, 16 -> 92.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..topology.model import Core, Host, NumaNode


@dataclass(frozen=True)
class Policy:
    """The placement knobs of the config, as a value (tests build it directly)."""

    alignment: str = "strict"
    reserved_cores_per_node: int = 1
    reserved_memory_mib_per_node: int = 8192
    hugepage_kib: int | None = 1048576
    disk_gib_per_gpu: int = 64
    min_disk_gib: int = 32

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        p = cfg.placement
        return cls(alignment=p.alignment, reserved_cores_per_node=p.reserved_cores_per_node,
                   reserved_memory_mib_per_node=p.reserved_memory_mib_per_node,
                   hugepage_kib=cfg.hugepage_kib, disk_gib_per_gpu=p.disk_gib_per_gpu,
                   min_disk_gib=p.min_disk_gib)


def reserved_cores(host: Host, node: int, policy: Policy) -> tuple[Core, ...]:
    """The host's own cores on ``node``: the lowest-numbered ones."""
    return host.cores_by_node.get(node, ())[:policy.reserved_cores_per_node]


def usable_cores(host: Host, node: int, policy: Policy) -> tuple[Core, ...]:
    return host.cores_by_node.get(node, ())[policy.reserved_cores_per_node:]


def hugepages_for(node: NumaNode, policy: Policy) -> int | None:
    """The huge page size VMs use on ``node``: the configured one if the node has such a pool."""
    if policy.hugepage_kib is None:
        return None
    pool = node.hugepage_pool(policy.hugepage_kib)
    return policy.hugepage_kib if pool is not None and pool.total > 0 else None


def memory_budget_mib(node: NumaNode, policy: Policy) -> int:
    """Memory VMs may take on ``node``: its huge page pool, else its memory less the reserve."""
    size = hugepages_for(node, policy)
    if size is not None:
        pool = node.hugepage_pool(size)
        return pool.total * size // 1024
    return max(0, node.memory_mib - policy.reserved_memory_mib_per_node)


def page_mib(node: NumaNode, policy: Policy) -> int:
    size = hugepages_for(node, policy)
    return max(1, size // 1024) if size else 1


def gpus_on(host: Host, node: int) -> int:
    return len(host.gpus_by_node.get(node, ())) or 1


def template_cores(host: Host, node: int, k: int, policy: Policy) -> int:
    return len(usable_cores(host, node, policy)) * k // gpus_on(host, node)


def template_memory_mib(host: Host, node: int, k: int, policy: Policy) -> int:
    n = host.node(node)
    page = page_mib(n, policy)
    share = memory_budget_mib(n, policy) * k // gpus_on(host, node)
    return share // page * page


def disk_gib(count: int, policy: Policy) -> int:
    return max(policy.min_disk_gib, policy.disk_gib_per_gpu * count)


@dataclass(frozen=True)
class Template:
    gpus: int
    vcpus: int
    memory_mib: int
    disk_gib: int
    numa_nodes: tuple[int, ...]


def templates(host: Host, policy: Policy) -> tuple[Template, ...]:
    """The VM sizes of this host, one per legal block size (computed on its first block)."""
    out = []
    for size, blocks in host.blocks_by_size.items():
        per_node: dict[int, int] = {}
        for i in blocks[0].gpus:
            node = host.gpu(i).numa_node
            if node is not None:
                per_node[node] = per_node.get(node, 0) + 1
        vcpus = sum(template_cores(host, n, k, policy) for n, k in per_node.items()) \
            * host.threads_per_core
        mem = sum(template_memory_mib(host, n, k, policy) for n, k in per_node.items())
        out.append(Template(size, vcpus, mem, disk_gib(size, policy), tuple(sorted(per_node))))
    return tuple(sorted(out, key=lambda t: t.gpus))
