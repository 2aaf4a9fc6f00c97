"""The three moments a device is checked, as the DGX-2 KVM design has them: at host start,
before a VM is launched on it, after a VM ends (reset, then check). Each reads the host's own
signals (:mod:`.probe`, :mod:`.reset`), judges them (:mod:`.policy`) and records the result
(:mod:`.store`): a device that fails is quarantined there until an admin clears it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..topology.sysfs import SysfsRoot
from .policy import Verdict, judge
from .probe import DeviceFacts, probe
from .reset import ResetResult, reset_devices
from .store import HealthStore


@dataclass(frozen=True)
class CheckResult:
    """One check of some devices: every verdict, the resets (empty when not reset), and the
    devices this check newly quarantined."""

    verdicts: tuple[Verdict, ...]
    facts: dict[str, DeviceFacts]
    resets: dict[str, ResetResult]
    newly: dict[str, Verdict]

    @property
    def bad(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if not v.ok)

    @property
    def reset_s(self) -> dict[str, float]:
        return {pci: r.seconds for pci, r in self.resets.items()}


def check(sysfs: SysfsRoot, store: HealthStore, devices: Iterable[str], *, by: str,
          job: int | None = None, vm: str | None = None, reset: bool = False,
          reset_timeout_s: float = 30.0, diag_command: str = "",
          diag_timeout_s: float = 600.0) -> CheckResult:
    """Reset ``devices`` first when ``reset`` (all at once, bounded by ``reset_timeout_s``),
    then probe, judge and record each. ``by`` says who checked, for the history ("teardown of
    job-12 (job 12)", "create of job-13 (job 13)", "dgxvm health"). ``diag_command``: the
    admin's diagnostics (:mod:`.diag`), run on the devices that passed."""
    devices = list(dict.fromkeys(devices))
    if not devices:
        return CheckResult((), {}, {}, {})
    resets = reset_devices(sysfs, devices, timeout_s=reset_timeout_s) if reset else {}
    facts = {pci: probe(sysfs, pci) for pci in devices}
    known = store.read()
    verdicts = tuple(judge(facts[pci], baseline=known[pci].aer if pci in known else None,
                           reset=resets.get(pci)) for pci in devices)
    passed = [v.pci for v in verdicts if v.ok]
    if diag_command and passed:
        from .diag import run_diag
        diag = {v.pci: v for v in run_diag(diag_command, passed, timeout_s=diag_timeout_s)}
        verdicts = tuple(diag.get(v.pci, v) if v.ok else v for v in verdicts)
    newly = store.record(verdicts, facts, resets=resets, by=by, job=job, vm=vm)
    return CheckResult(verdicts, facts, resets, newly)
