"""Placement: a pure function from (host, what is taken, request, policy) to a Placement."""

from __future__ import annotations

from ..errors import NoFit, RequestError
from ..ranges import format_index_list
from ..topology.model import FULL_PASSTHROUGH, GpuBlock, Host
from .ib import choose as choose_ib
from .model import NumaCell, Occupancy, Placement, Request
from .sizing import (Policy, disk_gib, hugepages_for, memory_budget_mib, page_mib, reserved_cores,
                     template_cores, template_memory_mib, usable_cores)


DEFAULT_POLICY = Policy()      # frozen: one shared default is safe


def place(host: Host, taken: Occupancy, request: Request,
          policy: Policy = DEFAULT_POLICY) -> Placement:
    """Choose the GPUs, NVSwitches or FM partition, cores and memory for one VM.

    Order of choice:
      1. ``request.gpu_index`` (an admin's ``--gpu-index``): exactly the legal block of
         ``request.count`` GPUs that starts there, or an error;
      2. ``request.slurm_gpus`` when they already form a legal, free block that fits;
      3. otherwise the best-fit free legal block: the one whose taking spoils the fewest free
         blocks of larger sizes (largest first), so big blocks stay free; ties go to the block
         sharing most GPUs with Slurm's choice, then to the lowest index;
      4. no legal block free although enough GPUs are: ``policy.alignment == "prefer"`` takes an
         unaligned set (Slurm's own when free, else GPUs packed on the fewest NUMA nodes) without
         NVSwitches or FM partition; ``strict`` raises NoFit(resource="aligned-block").

    Cores: whole cores (every hardware thread) on the GPUs' NUMA nodes, lowest free first, never
    a reserved or taken one; vCPU i runs on host CPU ``cpus[i]``. Memory on the same nodes, in
    huge pages when the node has a pool of the configured size. See sizing.py for the templates.

    InfiniBand (``request.ib``, see :func:`.ib.choose`): the HCA functions beside the GPUs;
    a block whose HCAs have nothing free is passed over like one without free cores.

    Raises RequestError when the request can never be met on this host (bad count, index,
    overrides beyond a node's capacity, an ib mode no HCA can serve) and NoFit when it cannot
    be met now. An error about
    one of the request's quantities names it by the quantity (``vcpus 5``, ``gpu index 3``) and
    carries it as ``quantity``/``value``: only the caller knows whether it was a CLI flag or a
    Slurm partition's default, and renames it (``naming``).

    Example: 4 GPUs on a DGX-2 with Slurm's choice 5,6,7,11 -> GPUs 4-7 (one baseboard, NUMA 0),
    NVSwitches 0000:65/66/67:00.0, 11 cores = 22 vCPUs from node 0, aligned, remapped.
    """
    _validate(host, request)
    free_gpus = frozenset(g.index for g in host.gpus if g.healthy and g.pci not in taken.gpus)
    slurm = tuple(sorted(request.slurm_gpus)) if request.slurm_gpus is not None else None

    if request.gpu_index is not None:
        block = _admin_block(host, request)
        busy = [i for i in block.gpus if i not in free_gpus]
        if busy or not _block_free(block, free_gpus, taken):
            what = (f"GPU(s) {format_index_list(busy)} are in use" if busy
                    else "its NVSwitches or Fabric Manager partition are in use")
            raise NoFit(count=request.count, resource="gpus", quantity="gpu_index",
                        value=request.gpu_index, where=f"block {format_index_list(block.gpus)}",
                        reason=what)
        return _build(host, taken, request, policy, block.gpus, block, slurm,
                      f"gpu index {request.gpu_index}: block {format_index_list(block.gpus)}")

    free_blocks = [b for b in host.blocks_by_size.get(request.count, ())
                   if _block_free(b, free_gpus, taken)]
    first_error: NoFit | None = None
    if slurm is not None:
        block = host.block_by_gpus.get(slurm)
        if block is not None and block in free_blocks:
            try:
                return _build(host, taken, request, policy, block.gpus, block, slurm,
                              "Slurm's GPUs form an aligned free block")
            except NoFit as exc:
                first_error = exc
    for block in _ranked(host, free_blocks, free_gpus, taken, slurm):
        try:
            why = ("best-fit aligned block" if slurm is None else
                   f"Slurm's GPUs {format_index_list(slurm)} are not an aligned free block; "
                   "best-fit aligned block instead")
            return _build(host, taken, request, policy, block.gpus, block, slurm, why)
        except NoFit as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error

    if len(free_gpus) < request.count:
        raise NoFit(count=request.count, resource="gpus",
                    reason=f"only {len(free_gpus)} GPU(s) free"
                           + (f" ({format_index_list(free_gpus)})" if free_gpus else ""))
    if policy.alignment != "prefer":
        raise NoFit(count=request.count, resource="aligned-block",
                    reason=f"{len(free_gpus)} GPUs are free ({format_index_list(free_gpus)}) but "
                           f"no aligned {request.count}-GPU block is (fragmentation; "
                           "placement.alignment = strict)")
    gpus = _unaligned(host, free_gpus, request.count, slurm)
    return _build(host, taken, request, policy, gpus, None, slurm,
                  f"no aligned free {request.count}-GPU block (fragmentation); unaligned set "
                  "under placement.alignment = prefer: no NVLink partition")


# -- validation ------------------------------------------------------------------------------------
def _validate(host: Host, r: Request) -> None:
    n = len(host.gpus)
    if r.count < 1:
        raise RequestError(reason=f"GPU count {r.count} must be at least 1")
    if r.count > n:
        raise RequestError(reason=f"{r.count} GPUs asked but this host has {n}"
                                  + (f" ({len(host.missing_gpus)} missing)" if host.missing_gpus
                                     else ""))
    if r.count not in host.block_sizes:
        raise RequestError(reason=f"{r.count} is not a VM size on {host.display_name} "
                                  f"(sizes: {', '.join(map(str, host.block_sizes))})")
    if r.gpu_index is not None and not 0 <= r.gpu_index < n:
        raise RequestError(quantity="gpu_index", value=r.gpu_index,
                           reason=f"does not exist (GPUs 0-{n - 1})")
    for i in r.slurm_gpus or ():
        if not 0 <= i < n:
            raise RequestError(reason=f"Slurm GPU {i} does not exist (GPUs 0-{n - 1})")
    if r.slurm_gpus is not None:
        if len(set(r.slurm_gpus)) != len(r.slurm_gpus):
            raise RequestError(reason=f"Slurm GPU list {list(r.slurm_gpus)} repeats a GPU")
        if len(r.slurm_gpus) != r.count:
            raise RequestError(reason=f"Slurm gave {len(r.slurm_gpus)} GPU(s) "
                                      f"({format_index_list(r.slurm_gpus)}) for {r.count}")
    if r.vcpus is not None and r.vcpus < 1:
        raise RequestError(quantity="vcpus", value=r.vcpus, reason="must be at least 1")
    if r.memory_mib is not None and r.memory_mib < 1:
        raise RequestError(quantity="memory_mib", value=r.memory_mib,
                           reason="must be at least 1 MiB")
    if r.disk_gib is not None and r.disk_gib < 1:
        raise RequestError(quantity="disk_gib", value=r.disk_gib, reason="must be at least 1 GiB")


def _admin_block(host: Host, r: Request) -> GpuBlock:
    for b in host.blocks_by_size.get(r.count, ()):
        if b.gpus[0] == r.gpu_index:
            return b
    starts = sorted({b.gpus[0] for b in host.blocks_by_size.get(r.count, ())})
    raise RequestError(quantity="gpu_index", value=r.gpu_index,
                       reason=f"is not aligned for {r.count} GPUs on {host.display_name}: "
                              f"{r.count}-GPU blocks start at "
                              f"{', '.join(map(str, starts)) or 'no index (none is healthy)'}")


# -- GPU choice ------------------------------------------------------------------------------------
def _block_free(b: GpuBlock, free_gpus: frozenset[int], taken: Occupancy) -> bool:
    return (all(i in free_gpus for i in b.gpus)
            and not any(s in taken.nvswitches for s in b.nvswitches)
            and (b.fm_partition is None or b.fm_partition not in taken.fm_partitions))


def _ranked(host: Host, candidates: list[GpuBlock], free_gpus: frozenset[int], taken: Occupancy,
            slurm: tuple[int, ...] | None) -> list[GpuBlock]:
    """Candidates, best first: spoil the fewest free larger blocks, largest sizes weigh most."""
    if len(candidates) <= 1:
        return candidates
    size = candidates[0].size
    larger = [(b.size, _mask(b.gpus)) for s, bs in host.blocks_by_size.items() if s > size
              for b in bs if _block_free(b, free_gpus, taken)]
    sizes = sorted({s for s, _ in larger}, reverse=True)
    slurm_mask = _mask(slurm or ())

    def key(b: GpuBlock):
        m = _mask(b.gpus)
        spoiled = tuple(sum(1 for s2, lm in larger if s2 == s and lm & m) for s in sizes)
        return spoiled, -bin(m & slurm_mask).count("1"), b.gpus

    return sorted(candidates, key=key)


def _mask(indices) -> int:
    m = 0
    for i in indices:
        m |= 1 << i
    return m


def _unaligned(host: Host, free: frozenset[int], count: int,
               slurm: tuple[int, ...] | None) -> tuple[int, ...]:
    if slurm is not None and all(i in free for i in slurm):
        return slurm
    per_node: dict[object, list[int]] = {}
    for i in sorted(free):
        per_node.setdefault(host.gpu(i).numa_node, []).append(i)
    # fullest nodes first, so the set spans as few NUMA nodes as possible
    order = sorted(per_node.values(), key=lambda v: (-len(v), v[0]))
    chosen = [i for group in order for i in group][:count]
    return tuple(sorted(chosen))


# -- cores, memory, the rest -----------------------------------------------------------------------
def _build(host: Host, taken: Occupancy, r: Request, policy: Policy, gpus: tuple[int, ...],
           block: GpuBlock | None, slurm: tuple[int, ...] | None, reason: str) -> Placement:
    per_node: dict[int, list[int]] = {}
    homeless = None   # computed once, only if some GPU's node is unknown
    for i in gpus:
        node = host.gpu(i).numa_node
        if node is None:
            homeless = _roomiest_node(host, taken, policy) if homeless is None else homeless
            node = homeless
        per_node.setdefault(node, []).append(i)
    nodes = sorted(per_node)
    cores_wanted = _split_cores(r.vcpus, nodes, per_node, host, policy, r.count)
    mem_wanted = _split_memory(r.memory_mib, nodes, per_node, host, policy, r.count)

    cells, vcpu = [], 0
    for node in nodes:
        want = cores_wanted[node]
        free = [c for c in usable_cores(host, node, policy)
                if not any(t in taken.cpus for t in c.threads)]
        if len(free) < want:
            raise NoFit(count=r.count, resource="cores",
                        reason=f"GPUs {format_index_list(gpus)} need {want} free core(s) on NUMA "
                               f"node {node}, {len(free)} are free")
        if mem_wanted[node] < 1:
            n = host.node(node)
            raise NoFit(count=r.count, resource="memory",
                        reason=f"NUMA node {node} has no memory for VMs: "
                               f"{_budget_words(n, policy)}")
        budget = memory_budget_mib(host.node(node), policy) - taken.memory_mib.get(node, 0)
        if mem_wanted[node] > budget:
            raise NoFit(count=r.count, resource="memory",
                        reason=f"GPUs {format_index_list(gpus)} need {mem_wanted[node]} MiB on "
                               f"NUMA node {node}, {max(budget, 0)} MiB are free")
        cpus = tuple(t for c in free[:want] for t in c.threads)
        cells.append(NumaCell(host_node=node, gpus=tuple(per_node[node]), cpus=cpus,
                              vcpus=tuple(range(vcpu, vcpu + len(cpus))),
                              memory_mib=mem_wanted[node]))
        vcpu += len(cpus)

    emulator = tuple(t for node in nodes for c in reserved_cores(host, node, policy)
                     for t in c.threads)
    pages = {hugepages_for(host.node(n), policy) for n in nodes}
    hugepage = pages.pop() if len(pages) == 1 else None
    nics = tuple(sorted({pci for i in gpus for pci in host.gpu(i).nics}))
    ib = choose_ib(host, taken, r.ib, tuple(gpus))
    aligned = block is not None
    return Placement(
        machine=host.machine,
        gpus=tuple(gpus),
        gpu_pcis=tuple(host.gpu(i).pci for i in gpus),
        slurm_gpus=slurm,
        aligned=aligned,
        remapped=slurm is not None and tuple(gpus) != slurm,
        reason=reason,
        nvswitches=block.nvswitches if aligned and host.nvswitch_model == FULL_PASSTHROUGH else (),
        fm_partition=block.fm_partition if aligned else None,
        cells=tuple(cells),
        emulator_cpus=emulator or tuple(t for c in cells for t in c.cpus),
        hugepage_kib=hugepage,
        disk_gib=r.disk_gib if r.disk_gib is not None else disk_gib(r.count, policy),
        nics=nics,
        ib_mode=r.ib,
        ib=ib,
    )


def _roomiest_node(host: Host, taken: Occupancy, policy: Policy) -> int:
    """Home for a GPU whose NUMA node nothing could tell: the node with most free cores."""
    def free(node):
        return sum(1 for c in usable_cores(host, node.id, policy)
                   if not any(t in taken.cpus for t in c.threads))
    return max(host.numa_nodes, key=lambda n: (free(n), -n.id)).id


def _split_cores(vcpus, nodes, per_node, host, policy, count) -> dict[int, int]:
    """Cores per node: the template, or ``vcpus`` spread over the nodes like the GPUs are."""
    if vcpus is None:
        return {n: template_cores(host, n, len(per_node[n]), policy) for n in nodes}
    tpc = host.threads_per_core
    if vcpus % tpc:
        raise RequestError(quantity="vcpus", value=vcpus,
                           reason=f"is not a multiple of {tpc}: VMs get whole cores ({tpc} "
                                  f"threads each)")
    cores = vcpus // tpc
    out = _proportional(cores, nodes, per_node)
    for n in nodes:
        cap = len(usable_cores(host, n, policy))
        if out[n] > cap:
            most = sum(len(usable_cores(host, m, policy)) for m in nodes) * tpc
            raise RequestError(quantity="vcpus", value=vcpus,
                               reason=f"is more than NUMA node(s) {format_index_list(nodes)} "
                                      f"can give a {count}-GPU VM ({most} vCPUs at most)")
    return out


def _budget_words(node, policy: Policy) -> str:
    """Why ``node``'s memory for VMs is what it is, in the words of the config."""
    size = hugepages_for(node, policy)
    if size is not None:
        return f"its {size} kB huge page pool holds {memory_budget_mib(node, policy)} MiB"
    return (f"{node.memory_mib} MiB, of which reserved_memory_mib_per_node keeps "
            f"{policy.reserved_memory_mib_per_node} MiB for the host")


def _split_memory(memory_mib, nodes, per_node, host, policy, count) -> dict[int, int]:
    if memory_mib is None:
        return {n: template_memory_mib(host, n, len(per_node[n]), policy) for n in nodes}
    out = {}
    shares = _proportional(memory_mib, nodes, per_node)
    cap_total = sum(memory_budget_mib(host.node(n), policy) for n in nodes)
    for n in nodes:
        page = page_mib(host.node(n), policy)
        out[n] = -(-shares[n] // page) * page          # round up to whole pages
        if out[n] > memory_budget_mib(host.node(n), policy):
            raise RequestError(quantity="memory_mib", value=memory_mib,
                               reason=f"is more than NUMA node(s) {format_index_list(nodes)} "
                                      f"can give a {count}-GPU VM ({cap_total} MiB at most)")
    return out


def _proportional(total: int, nodes, per_node) -> dict[int, int]:
    gpus = sum(len(per_node[n]) for n in nodes)
    out = {n: total * len(per_node[n]) // gpus for n in nodes}
    rest = total - sum(out.values())
    for n in nodes[:rest]:
        out[n] += 1
    return out
