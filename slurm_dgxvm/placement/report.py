"""The host and its occupancy as ``dgxvm topology show --json`` and ``dgxvm plan --json`` give
them (stable keys): who holds each GPU and NVSwitch, what is quarantined, the VM sizes."""

from __future__ import annotations

from collections.abc import Mapping


def holders(state) -> dict[str, str]:
    """PCI address -> ledger key of the allocation holding it."""
    out = {}
    for key, a in state.allocations.items():
        for pci in (*a.gpu_pcis, *a.nvswitches):
            out[pci] = key
    return out


def topology_doc(host, state, sizes, quarantined: Mapping[str, str]) -> dict:
    """``host``'s JSON with, per GPU and NVSwitch, the allocation holding it and why it is
    quarantined (None: it is not); whether the host is degraded; the ledger's allocations; the
    VM sizes (``sizes``: placement.templates)."""
    doc = host.to_json()
    held = holders(state)
    for g in doc["gpus"]:
        g["held_by"] = held.get(g["pci"])
        g["quarantined"] = quarantined.get(g["pci"])
    for s in doc["nvswitches"]:
        s["held_by"] = held.get(s["pci"])
        s["quarantined"] = quarantined.get(s["pci"])
    doc["degraded"] = bool(quarantined or host.missing_gpus)
    doc["allocations"] = {k: a.to_json() for k, a in state.allocations.items()}
    doc["vm_sizes"] = [t.__dict__ | {"numa_nodes": list(t.numa_nodes)} for t in sizes]
    return doc


def plan_doc(host, placement) -> dict:
    """A placement's JSON, and whether the host it was made on is simulated."""
    doc = placement.to_json()
    doc["simulated"] = host.simulated
    return doc
