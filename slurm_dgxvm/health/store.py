"""Which GPUs and NVSwitches are quarantined, why, and their history: ``<state_dir>/gpu-health.json``.

One JSON document, read without a lock (it is only ever replaced atomically) and changed under
``<state_dir>/gpu-health.lock``:

    {"format": "dgxvm-gpu-health", "version": 1,
     "devices": {"0000:34:00.0": {
        "state": "ok" | "quarantined", "reason": ..., "since": epoch, "job": 12, "vm": "job-12",
        "aer": {"correctable": 0, "nonfatal": 0, "fatal": 0},      # baseline: last good check
        "resets": 3, "last_reset": {"at": epoch, "ok": true, "s": 0.21, "method": "flr bus",
                                    "error": null},
        "history": [{"at": epoch, "event": "quarantined" | "cleared", "reason": ...,
                     "by": ..., "job": ..., "vm": ...}, ...]}}}

A device never seen is healthy. The history keeps the last :data:`HISTORY_KEEP` events.

Ordering with the ledger: a device is quarantined *before* the ledger releases it (the Epilog's
reset stage runs before its release stage), and placement reads this file *inside* the ledger's
transaction, so a Prolog can never be given a device between its release and its quarantine.

A file that does not parse is a :class:`~slurm_dgxvm.errors.HealthStoreError`, never "no
quarantine": forgetting a bad GPU would hand it to the next job. It is left as it is for the
admin (``dgxvm health`` reports it, and drains the node).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import fsutil
from ..errors import HealthStoreError, NotQuarantined
from .policy import Verdict
from .probe import AerCounts, DeviceFacts
from .reset import ResetResult

FORMAT = "dgxvm-gpu-health"
VERSION = 1
FILE = "gpu-health.json"
LOCK = "gpu-health.lock"
FILE_MODE = 0o644
LOCK_TIMEOUT_S = 30.0
HISTORY_KEEP = 50


@dataclass(frozen=True)
class DeviceHealth:
    """One device's entry."""

    pci: str
    state: str = "ok"
    reason: str | None = None
    since: float | None = None
    job: int | None = None
    vm: str | None = None
    aer: AerCounts | None = None
    resets: int = 0
    last_reset: dict | None = None
    history: tuple[dict, ...] = field(default_factory=tuple)

    @property
    def quarantined(self) -> bool:
        return self.state == "quarantined"

    def to_json(self) -> dict:
        return {"state": self.state, "reason": self.reason, "since": self.since,
                "job": self.job, "vm": self.vm,
                "aer": self.aer.to_json() if self.aer else None,
                "resets": self.resets, "last_reset": self.last_reset,
                "history": list(self.history)}

    @classmethod
    def from_json(cls, pci: str, doc: dict) -> DeviceHealth:
        state = doc.get("state", "ok")
        if state not in ("ok", "quarantined"):
            raise ValueError(f"{pci}: state {state!r}")
        aer = doc.get("aer")
        return cls(pci=pci, state=state, reason=doc.get("reason"), since=doc.get("since"),
                   job=doc.get("job"), vm=doc.get("vm"),
                   aer=AerCounts.from_json(aer) if aer else None,
                   resets=int(doc.get("resets", 0)), last_reset=doc.get("last_reset"),
                   history=tuple(doc.get("history", ())))


class HealthStore:
    """The quarantine record of one node's state dir."""

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir)
        self.path = self.dir / FILE

    # -- reading -----------------------------------------------------------------------------------
    def read(self) -> dict[str, DeviceHealth]:
        """Every device with an entry. Raises HealthStoreError for a file that does not parse."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise HealthStoreError(path=str(self.path),
                                   reason=f"cannot read: {exc.strerror or exc}") from None
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} document")
            return {pci: DeviceHealth.from_json(pci, d) for pci, d in doc["devices"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise HealthStoreError(path=str(self.path),
                                   reason=f"corrupt ({type(exc).__name__}: {exc}); left as it "
                                          f"is for an admin to inspect") from None

    def quarantined(self) -> dict[str, DeviceHealth]:
        return {pci: d for pci, d in self.read().items() if d.quarantined}

    # -- changing ----------------------------------------------------------------------------------
    def update(self, change: Callable[[dict[str, DeviceHealth]], dict[str, DeviceHealth]]
               ) -> dict[str, DeviceHealth]:
        """Read, ``change``, write (only when something changed), under the lock."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with fsutil.locked(self.dir / LOCK, timeout=LOCK_TIMEOUT_S, mode=FILE_MODE,
                           timed_out=lambda: HealthStoreError(
                               path=str(self.path),
                               reason=f"its lock was held over {LOCK_TIMEOUT_S:g}s"),
                           failed=lambda e: HealthStoreError(
                               path=str(self.path), reason=f"cannot lock: {e.strerror or e}")):
            before = self.read()
            after = change(dict(before))
            if after != before:
                doc = {"format": FORMAT, "version": VERSION,
                       "devices": {pci: d.to_json() for pci, d in sorted(after.items())}}
                try:
                    fsutil.atomic_write_json(self.path, doc, mode=FILE_MODE)
                except OSError as exc:
                    raise HealthStoreError(path=str(self.path),
                                           reason=f"cannot write: {exc.strerror or exc}") from None
            return after

    def record(self, verdicts: Iterable[Verdict], facts: Mapping[str, DeviceFacts], *,
               resets: Mapping[str, ResetResult] | None = None, by: str,
               job: int | None = None, vm: str | None = None,
               now: float | None = None) -> dict[str, Verdict]:
        """Record one check of some devices: their resets, the AER baseline of those found
        good, and the quarantine of those found bad (a device already quarantined keeps its
        first reason). Returns the verdicts that newly quarantined a device."""
        now = time.time() if now is None else now
        verdicts = list(verdicts)
        newly: dict[str, Verdict] = {}

        def change(devs: dict[str, DeviceHealth]) -> dict[str, DeviceHealth]:
            for v in verdicts:
                d = devs.get(v.pci) or DeviceHealth(pci=v.pci)
                r = (resets or {}).get(v.pci)
                if r is not None:
                    d = _with(d, resets=d.resets + 1,
                              last_reset={"at": round(now, 3)} | r.to_json())
                f = facts.get(v.pci)
                if v.ok:
                    if f is not None and f.aer is not None and not d.quarantined:
                        d = _with(d, aer=f.aer)
                elif not d.quarantined:
                    newly[v.pci] = v
                    d = _with(d, state="quarantined", reason=v.reason, since=round(now, 3),
                              job=job, vm=vm,
                              history=_append(d.history, {"at": round(now, 3),
                                                          "event": "quarantined",
                                                          "reason": v.reason, "by": by,
                                                          "job": job, "vm": vm}))
                devs[v.pci] = d
            return devs

        self.update(change)
        return newly

    def quarantine(self, pci: str, reason: str, *, by: str, job: int | None = None,
                   vm: str | None = None, now: float | None = None) -> bool:
        """Quarantine ``pci`` by hand (or for a cause found outside a check); False when it
        already was."""
        return bool(self.record([Verdict(pci=pci, ok=False, reason=reason)], {}, by=by,
                                job=job, vm=vm, now=now))

    def clear(self, pci: str, *, by: str, facts: DeviceFacts | None = None, note: str = "",
              now: float | None = None) -> DeviceHealth:
        """Give a quarantined device back to placement. ``facts``: as read now, its AER
        counts become the new baseline (the errors that quarantined it are not counted
        again). Raises NotQuarantined when it is not quarantined."""
        now = time.time() if now is None else now
        out: dict[str, DeviceHealth] = {}

        def change(devs: dict[str, DeviceHealth]) -> dict[str, DeviceHealth]:
            d = devs.get(pci)
            if d is None or not d.quarantined:
                raise NotQuarantined(pci=pci)
            event = {"at": round(now, 3), "event": "cleared", "reason": note or None,
                     "by": by, "was": d.reason}
            d = _with(d, state="ok", reason=None, since=None, job=None, vm=None,
                      aer=facts.aer if facts is not None and facts.aer is not None else d.aer,
                      history=_append(d.history, event))
            devs[pci] = out[pci] = d
            return devs

        self.update(change)
        return out[pci]


def _with(d: DeviceHealth, **changes) -> DeviceHealth:
    from dataclasses import replace
    return replace(d, **changes)


def _append(history: tuple[dict, ...], event: dict) -> tuple[dict, ...]:
    return (tuple(history) + (event,))[-HISTORY_KEEP:]
