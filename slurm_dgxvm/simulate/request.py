"""``dgxvm simulate``'s two forms checked and done: a new tree of a known machine (with faults),
or faults injected into an existing tree (:func:`simulate`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DgxvmError, SimulateUsage
from .faults import KINDS as FAULT_KINDS
from .faults import inject_all, parse_fault
from .machines import MACHINES
from .sysfs_tree import render


@dataclass(frozen=True)
class Simulated:
    root: Path
    records: list[dict]       # the faults injected, as the simulation marker records them
    machine: str | None       # the machine whose new tree was written; None: --into


def _usage(reason: str, param: str | None = None) -> SimulateUsage:
    return SimulateUsage(reason=reason, param=param)


def simulate(machine: str | None, *, out: Path | None, missing: Sequence[str] = (),
             unknown_numa: Sequence[str] = (), fault_specs: Sequence[str] = (),
             into: Path | None = None, ib_vfs: int | None = None,
             serial: int | None = None) -> Simulated:
    """Write ``machine``'s sysfs tree into ``out`` with ``fault_specs`` injected, or inject
    them into the tree at ``into``; SimulateUsage when the arguments make neither."""
    from ..topology.sysfs import SIMULATED_MARKER
    if machine is not None and into is not None:
        raise _usage("MACHINE writes a new tree (--out DIR); --into DIR injects faults "
                     "into an existing one: give one of them")
    if machine is None and (out is not None or missing or unknown_numa or ib_vfs is not None
                            or serial is not None):
        raise _usage("missing MACHINE: --out, --missing-gpu, --unknown-numa, --ib-vfs and "
                     "--serial write a new tree")
    if machine is None and into is None:
        raise _usage("give MACHINE --out DIR, or --fault GPU:KIND --into DIR")
    if machine is not None and out is None:
        raise _usage("MACHINE needs --out DIR")
    if into is not None and not fault_specs:
        raise _usage(f"--into DIR needs at least one --fault GPU:KIND (kinds: "
                     f"{', '.join(FAULT_KINDS)})")
    faults = []
    for spec in fault_specs:
        try:
            faults.append(parse_fault(spec))
        except DgxvmError as exc:
            raise _usage(exc.reason, "--fault") from None
    if into is not None:
        return Simulated(root=into, records=inject_all(into, faults), machine=None)
    if machine not in MACHINES:
        raise _usage(f"{machine!r} is not a known machine (known: {', '.join(MACHINES)})",
                     "MACHINE")
    root = render(machine, out, missing_gpus=missing, unknown_numa=unknown_numa, faults=faults,
                  **({} if ib_vfs is None else {"ib_vfs": ib_vfs}),
                  **({} if serial is None else {"serial": serial}))
    records = json.loads((root / SIMULATED_MARKER).read_text()).get("faults", [])
    return Simulated(root=root, records=records, machine=machine)
