"""Text a person reads: the topology picture and a placement. No decisions here."""

from __future__ import annotations

import json
import string

import click

from ..placement.report import holders
from ..ranges import format_index_list
from ..topology.model import FULL_PASSTHROUGH, SHARED_NVSWITCH, Host

_MODEL_TEXT = {
    FULL_PASSTHROUGH: "full-passthrough (NVSwitches go into the VM with their GPUs)",
    SHARED_NVSWITCH: "shared-nvswitch (the host's Fabric Manager keeps the NVSwitches; "
                     "a VM's GPUs are one FM partition)",
    "none": "none (PCIe GPUs only)",
}
_COLORS = ("cyan", "magenta", "yellow", "green", "blue", "red")


def _short(pci: str) -> str:
    return pci[5:] if pci.startswith("0000:") else pci


def topology_picture(host: Host, state, sizes, *, color: bool = False,
                     quarantined: dict[str, str] | None = None) -> str:
    """``quarantined``: PCI address -> reason (the GPU health record), marked ``Q``."""
    held = holders(state)
    quarantined = quarantined or {}
    keys = sorted(set(held.values()))
    letter = {k: string.ascii_uppercase[i % 26] for i, k in enumerate(keys)}

    def mark(pci: str, width: int) -> str:
        if pci in quarantined and pci not in held:
            text = "Q".center(width)
            return click.style(text, fg="red", bold=True) if color else text
        k = held.get(pci)
        text = (letter[k] if k else ".").center(width)
        if k and color:
            return click.style(text, fg=_COLORS[keys.index(k) % len(_COLORS)], bold=True)
        return text

    out = [f"{host.display_name}  [{host.machine}]"
           + (f"   ** SIMULATED host: sysfs written by `dgxvm simulate {host.simulated}` **"
              if host.simulated else "")]
    out.append(f"  matched by     {host.match}")
    out.append(f"  NVSwitch model {_MODEL_TEXT.get(host.nvswitch_model, host.nvswitch_model)}")
    cpus = sum(len(n.cpus) for n in host.numa_nodes)
    out.append(f"  CPUs           {len(host.sockets)} socket(s), {len(host.numa_nodes)} NUMA "
               f"node(s), {len(host.cores)} cores, {cpus} threads")
    out.append(f"  GPUs           {len(host.gpus)} present"
               + (f", {len(host.missing_gpus)} MISSING" if host.missing_gpus else "")
               + f"; VM sizes {', '.join(map(str, host.block_sizes))}")
    if quarantined or host.missing_gpus:
        out.append(f"  DEGRADED       {len(quarantined)} device(s) quarantined (Q), "
                   f"{len(host.missing_gpus)} missing: VMs are made from the healthy GPUs")
        for pci, reason in sorted(quarantined.items()):
            out.append(f"    Q {pci}: {reason}  (`dgxvm gpu show`, `dgxvm gpu clear`)")
    out.append("")

    boards = sorted({g.board for g in host.gpus} | {m.board for m in host.missing_gpus}
                    | {s.board for s in host.nvswitches})
    for board in boards:
        out.append(f"Baseboard {board}")
        nodes = sorted({g.numa_node for g in host.gpus if g.board == board},
                       key=lambda n: (n is None, n))
        for node in nodes:
            gpus = [g for g in host.gpus if g.board == board and g.numa_node == node]
            if node is None:
                out.append("  NUMA ?  (node unknown)")
            else:
                n = host.node(node)
                out.append(f"  NUMA {node} · socket {n.socket} · CPUs {format_index_list(n.cpus)}"
                           f" · {n.memory_mib // 1024} GiB" + _pages(n))
            out.append("    GPU   " + "".join(f"{g.index:^6}" for g in gpus))
            out.append("    PCI   " + "".join(f"{_short(g.pci)[:5]:^6}" for g in gpus))
            out.append("    held  " + "".join(mark(g.pci, 6) for g in gpus))
        missing = [m for m in host.missing_gpus if m.board == board]
        for m in missing:
            out.append(f"  MISSING GPU {m.pci} (slot {m.slot}): its blocks are not offered")
        sws = [s for s in host.nvswitches if s.board == board]
        if sws:
            out.append("  NVSwitch " + "".join(f"{_short(s.pci)[:5]:^6}" for s in sws))
            out.append("    held   " + "".join(mark(s.pci, 6) for s in sws))
        out.append("")

    if keys:
        out.append("Held by (ledger)")
        for k in keys:
            a = state.allocations[k]
            tag = letter[k]
            if color:
                tag = click.style(tag, fg=_COLORS[keys.index(k) % len(_COLORS)], bold=True)
            slurm = (f", Slurm chose {format_index_list(a.slurm_gpus)}"
                     if a.slurm_gpus is not None and tuple(a.slurm_gpus) != tuple(a.gpus) else "")
            out.append(f"  {tag}  {k:<16} GPUs {format_index_list(a.gpus):<8} "
                       f"CPUs {format_index_list(a.cpus):<16} "
                       f"{'aligned' if a.aligned else 'UNALIGNED'}{slurm}")
    else:
        out.append("Held by (ledger): nothing")
    out.append("")
    out.append("VM sizes (template per block size: vCPUs, memory, OS disk)")
    for t in sizes:
        out.append(f"  {t.gpus:>2} GPU(s)  {t.vcpus:>4} vCPUs  {t.memory_mib // 1024:>5} GiB  "
                   f"{t.disk_gib:>5} GiB disk  NUMA {format_index_list(t.numa_nodes)}")
    if host.notes:
        out.append("")
        out.append("Notes")
        out += [f"  - {n}" for n in host.notes]
    return "\n".join(out)


def _pages(node) -> str:
    pools = [p for p in node.hugepages if p.total]
    if not pools:
        return ""
    return " · " + ", ".join(f"{p.total} x {_page_name(p.size_kib)} pages" for p in pools)


def _page_name(kib: int) -> str:
    return f"{kib // 1048576}G" if kib >= 1048576 else f"{kib // 1024}M"


def placement_text(host: Host, p) -> str:
    lines = [f"Placement on {host.display_name}"
             + (" (SIMULATED host)" if host.simulated else "")]
    lines.append(f"  GPUs         {format_index_list(p.gpus)}  ({', '.join(p.gpu_pcis)})")
    if p.slurm_gpus is not None:
        lines.append(f"  Slurm chose  {format_index_list(p.slurm_gpus)}"
                     + ("  -> remapped" if p.remapped else "  -> kept"))
    lines.append(f"  aligned      {'yes' if p.aligned else 'NO'}: {p.reason}")
    if host.nvswitch_model == FULL_PASSTHROUGH:
        lines.append(f"  NVSwitches   {', '.join(p.nvswitches) or 'none (1-GPU VM or unaligned)'}")
    if host.nvswitch_model == SHARED_NVSWITCH:
        lines.append(f"  FM partition {p.fm_partition if p.fm_partition is not None else 'none'}")
    for c in p.cells:
        lines.append(f"  NUMA {c.host_node:<7} GPUs {format_index_list(c.gpus)}, "
                     f"vCPUs {format_index_list(c.vcpus)} on CPUs {format_index_list(c.cpus)}, "
                     f"{c.memory_mib} MiB")
    lines.append(f"  vCPUs        {p.vcpus} (emulator threads on CPUs "
                 f"{format_index_list(p.emulator_cpus)})")
    lines.append(f"  memory       {p.memory_mib} MiB"
                 + (f" in {_page_name(p.hugepage_kib)} huge pages" if p.hugepage_kib else ""))
    lines.append(f"  OS disk      {p.disk_gib} GiB")
    lines.append(f"  NICs         {', '.join(p.nics) or 'none near these GPUs'}")
    for f in p.ib:
        what = f"VF {f.vf} {f.pci} of HCA {f.hca}" if f.vf is not None else f"HCA {f.hca} whole"
        lines.append(f"  InfiniBand   GPU {f.gpu}: {what}")
    return "\n".join(lines)


def emit_json(doc) -> None:
    """``doc`` as the commands' ``--json`` print it: indented, keys sorted (stable)."""
    click.echo(json.dumps(doc, indent=2, sort_keys=True))
