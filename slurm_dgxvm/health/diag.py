"""The admin's own diagnostics between tenants (``[health] diag_command``): NVIDIA's flow for
full passthrough, where a trusted health-check VM with the full driver runs DCGM on the GPUs a
tenant just left, is the site's to wire up (its image, its driver, its DCGM level); dgxvm runs it
at the right moment and acts on its answer.

The command runs on the host as root after the reset, with the devices' PCI addresses as its
arguments, and within ``diag_timeout_s``. Exit 0: every device passed. Any other exit: the
devices named on its standard output, one ``PCI REASON...`` line each, fail with that reason;
when it names none, all of them fail with its exit status and output's last line. A command
that cannot run or times out fails them all (a check that could not be made is no pass). Nothing
a guest says reaches it: the tenant's VM is gone, and the command is the admin's.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from ..errors import HostError
from ..tools import run_tool
from .policy import Verdict


def run_diag(command: str, devices: Sequence[str], *, timeout_s: float) -> list[Verdict]:
    """The verdict on each of ``devices`` from the admin's command (see the module)."""
    argv = [*shlex.split(command), *devices]
    try:
        proc = run_tool(argv, timeout=timeout_s, check=False, what="[health] diag_command",
                        error=lambda reason: HostError(reason))
    except HostError as exc:
        return [Verdict(pci=p, ok=False, reason=f"diagnostics could not run: {exc}")
                for p in devices]
    if proc.returncode == 0:
        return [Verdict(pci=p, ok=True) for p in devices]
    named: dict[str, str] = {}
    for line in (proc.stdout or "").splitlines():
        pci, _, reason = line.strip().partition(" ")
        if pci in devices:
            named[pci] = reason.strip() or "failed"
    if not named:
        tail = ((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()
        why = f"diagnostics exit {proc.returncode}" + (f": {tail[-1][:200]}" if tail else "")
        return [Verdict(pci=p, ok=False, reason=why) for p in devices]
    return [Verdict(pci=p, ok=p not in named,
                    reason=f"diagnostics: {named[p]}" if p in named else None) for p in devices]
