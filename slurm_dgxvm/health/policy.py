"""Facts -> verdict: may this device be given to the next VM? Pure.

A device is quarantined when, read by the host itself (:mod:`.probe`, :mod:`.reset`):

* it is not on the PCI bus;
* its reset failed or did not finish in time;
* its config space cannot be read, reads all ones (vendor 0xffff: fallen off the bus), or names
  another vendor than NVIDIA's;
* its uncorrectable AER counters (fatal or non-fatal) grew since its last good check.

Correctable AER errors are retried by the link itself and never quarantine; a growth is noted.
The baseline of a device never checked is zero (the counters count since the host booted, so
an uncorrectable error since boot quarantines it); counters lower than the baseline mean the
host rebooted since: the baseline is zero again.
"""

from __future__ import annotations

from dataclasses import dataclass

from .probe import AerCounts, DeviceFacts
from .reset import ResetResult

NVIDIA_VENDOR = 0x10DE
ALL_ONES = 0xFFFF


@dataclass(frozen=True)
class Verdict:
    pci: str
    ok: bool
    reason: str | None = None        # why it is quarantined (None when ok)
    note: str | None = None          # something seen that does not quarantine


def judge(facts: DeviceFacts, *, baseline: AerCounts | None = None,
          reset: ResetResult | None = None, vendor: int = NVIDIA_VENDOR) -> Verdict:
    """The verdict on one device from what was read now, its AER counts at its last good
    check (``baseline``; None: none yet) and its reset (None: not reset this time)."""
    pci = facts.pci

    def bad(reason: str) -> Verdict:
        return Verdict(pci=pci, ok=False, reason=reason)

    if not facts.present:
        return bad("not on the PCI bus")
    if reset is not None and not reset.ok:
        return bad(f"reset failed: {reset.error}")
    if facts.vendor is None:
        return bad(f"config space unreadable ({facts.config_error})")
    if facts.vendor == ALL_ONES:
        return bad("config space reads all ones (fell off the bus)")
    if facts.vendor != vendor:
        return bad(f"config space names vendor 0x{facts.vendor:04x}, not 0x{vendor:04x}")
    note = None
    if baseline is None or (facts.aer is not None and rebooted(facts.aer, baseline)):
        baseline = AerCounts()
    if facts.aer is not None:
        fatal = facts.aer.fatal - baseline.fatal
        nonfatal = facts.aer.nonfatal - baseline.nonfatal
        if fatal > 0:
            return bad(f"{fatal} new fatal AER error(s) (TOTAL_ERR_FATAL "
                       f"{baseline.fatal} -> {facts.aer.fatal})")
        if nonfatal > 0:
            return bad(f"{nonfatal} new uncorrectable non-fatal AER error(s) "
                       f"(TOTAL_ERR_NONFATAL {baseline.nonfatal} -> {facts.aer.nonfatal})")
        cor = facts.aer.correctable - baseline.correctable
        if cor > 0:
            note = f"{cor} new correctable AER error(s) (not a fault)"
    return Verdict(pci=pci, ok=True, note=note)


def rebooted(now: AerCounts, baseline: AerCounts) -> bool:
    """Counters below the baseline: they were zeroed (the host booted since)."""
    return (now.correctable < baseline.correctable or now.nonfatal < baseline.nonfatal
            or now.fatal < baseline.fatal)
