"""This node's operation counters, kept for ``dgxvm metrics``.

``<state_dir>/opstats.json`` holds, since it was made:

- per (op, stage) a histogram of the stage's seconds (:data:`BUCKETS`, Prometheus's ``le``
  bounds), its sum and count: only stages that finished (a stage that failed ran for a time
  that says nothing about how long it takes);
- per (op, result) how many creates and teardowns ended ``ok`` or ``failed``;
- per (op, fault, cause) the failures: ``fault`` is ``job`` (the job's or the request's own:
  the Prolog refuses the job and keeps the node) or ``node``
  (:func:`slurm_dgxvm.errors.is_job_fault`), ``cause`` the error's class by exit code
  (:func:`slurm_dgxvm.errors.cause_of`). ``op`` is ``create`` or ``teardown``, or ``prolog`` /
  ``epilog`` for a hook that failed before it reached the lifecycle (a partition whose image is
  missing). A job or request refused for its own values before anything was taken (its
  environment, its comment, a work dir that may not be shared) is not counted: it writes
  nothing on the node, and Slurm's accounting has it (``state=refused``); the job's faults
  found later (no fit, a size placement refuses) are.

Every create and teardown adds itself at its end (:func:`observe`) under ``opstats.lock``, in
a read-modify-write of the whole file (atomic, :mod:`slurm_dgxvm.fsutil`). Counting never fails
what is counted: a lock not had within :data:`LOCK_TIMEOUT_S`, a full disk or a corrupt file is
one warning in the log, and the VM goes on. A corrupt file is moved aside (``.corrupt``) by the
next update and the counters start again; Prometheus reads that as a counter reset.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import fsutil
from ..errors import OpStatsCorrupt, cause_of, is_job_fault
from .stages import StageTimer

log = logging.getLogger("dgxvm.opstats")

FILE = "opstats.json"
LOCK = "opstats.lock"
FORMAT = "dgxvm-opstats"
VERSION = 1
FILE_MODE = 0o644                  # counts and seconds: nothing of any job
#: upper bounds (seconds) of the stage histograms' buckets; one more counts what is above
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOCK_TIMEOUT_S = 2.0               # a create never waits longer than this to be counted
OPS = ("create", "teardown")
RESULTS = ("ok", "failed")
WARM = "warm"                       # the op of the warm VMs' counters (count)
WARM_OUTCOMES = ("hit", "miss", "destroyed")


@dataclass
class Histogram:
    """Observations of one stage: per bucket of :data:`BUCKETS` (not cumulative; the last
    entry counts those above the largest bound), their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        i = next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))
        self.counts[i] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, observations <= le)`` per bound, ``math.inf`` last (= :attr:`count`)."""
        out, total = [], 0
        for bound, n in zip((*BUCKETS, math.inf), self.counts):
            total += n
            out.append((bound, total))
        return out


@dataclass
class OpStats:
    stages: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    ops: dict[tuple[str, str], int] = field(default_factory=dict)
    failures: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def add(self, op: str, stages: dict[str, float], failure: BaseException | None) -> None:
        """One create or teardown: its finished stages, its result, its failure."""
        for stage, seconds in stages.items():
            self.stages.setdefault((op, stage), Histogram()).observe(seconds)
        result = "ok" if failure is None else "failed"
        self.ops[(op, result)] = self.ops.get((op, result), 0) + 1
        if failure is not None:
            self.add_failure(op, failure)

    def add_failure(self, op: str, failure: BaseException) -> None:
        key = (op, "job" if is_job_fault(failure) else "node", cause_of(failure))
        self.failures[key] = self.failures.get(key, 0) + 1

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "buckets": list(BUCKETS),
                "stages": [{"op": op, "stage": stage, "counts": h.counts, "sum": round(h.sum, 3)}
                           for (op, stage), h in sorted(self.stages.items())],
                "ops": [{"op": op, "result": result, "count": n}
                        for (op, result), n in sorted(self.ops.items())],
                "failures": [{"op": op, "fault": fault, "cause": cause, "count": n}
                             for (op, fault, cause), n in sorted(self.failures.items())]}

    @classmethod
    def from_json(cls, doc) -> OpStats:
        """Parse :meth:`to_json`'s form; ValueError, KeyError or TypeError otherwise (another
        bucket layout included: those counts cannot be added to)."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} file")
        if tuple(doc["buckets"]) != BUCKETS:
            raise ValueError(f"bucket bounds {doc['buckets']} are not this version's")
        out = cls()
        for s in doc["stages"]:
            counts = [_count(n) for n in s["counts"]]
            if len(counts) != len(BUCKETS) + 1:
                raise ValueError(f"stage {s['stage']!r}: {len(counts)} bucket counts")
            out.stages[(str(s["op"]), str(s["stage"]))] = Histogram(counts, float(s["sum"]))
        for o in doc["ops"]:
            out.ops[(str(o["op"]), str(o["result"]))] = _count(o["count"])
        for f in doc["failures"]:
            out.failures[(str(f["op"]), str(f["fault"]), str(f["cause"]))] = _count(f["count"])
        return out


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def path_of(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / FILE


def read(state_dir: str | os.PathLike) -> OpStats:
    """The counters (none yet: empty). Raises OpStatsCorrupt naming the file."""
    path = path_of(state_dir)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return OpStats()
    except OSError as exc:
        raise OpStatsCorrupt(path=str(path), reason=f"cannot read: {exc.strerror or exc}") from None
    try:
        return OpStats.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise OpStatsCorrupt(path=str(path), reason=f"{type(exc).__name__}: {exc}") from None


def observe(state_dir: str | os.PathLike, op: str, timer: StageTimer,
            failure: BaseException | None = None) -> None:
    """Count one create or teardown (``op``) that ended with ``failure`` (None: ok), with the
    stages ``timer`` saw finish. Never raises (see the module's docstring)."""
    _update(state_dir, lambda stats: stats.add(op, timer.completed(), failure))


def count(state_dir: str | os.PathLike, op: str, result: str, n: int = 1, *,
          stage: str | None = None, seconds: float | None = None) -> None:
    """Add ``n`` to the counter (``op``, ``result``): a warm VM's claims (``warm``: ``hit``,
    ``miss``, ``destroyed``); with ``stage``, observe ``seconds`` in (``op``, ``stage``)'s
    histogram too (``warm``, ``claim``). Never raises."""
    def add(stats: OpStats) -> None:
        stats.ops[(op, result)] = stats.ops.get((op, result), 0) + n
        if stage is not None and seconds is not None:
            stats.stages.setdefault((op, stage), Histogram()).observe(seconds)
    _update(state_dir, add)


def count_failure(state_dir: str | os.PathLike, op: str, failure: BaseException) -> None:
    """Count a failure outside a create or teardown (``op``: ``prolog``, ``epilog``). Never
    raises."""
    _update(state_dir, lambda stats: stats.add_failure(op, failure))


def _update(state_dir: str | os.PathLike, change: Callable[[OpStats], None]) -> None:
    path = path_of(state_dir)
    lock = Path(state_dir) / LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with fsutil.locked(lock, timeout=LOCK_TIMEOUT_S, mode=FILE_MODE,
                           timed_out=lambda: TimeoutError(f"{lock} not acquired within "
                                                          f"{LOCK_TIMEOUT_S:g}s"),
                           failed=lambda e: e):
            stats = _load_for_update(path)
            change(stats)
            fsutil.atomic_write_json(path, stats.to_json(), mode=FILE_MODE)
    except Exception as exc:  # noqa: BLE001 - counting must never fail the VM it counts
        log.warning("%s not updated (the VM is not affected): %s", path, exc)


def _load_for_update(path: Path) -> OpStats:
    try:
        return OpStats.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return OpStats()
    except (ValueError, KeyError, TypeError) as exc:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("%s was corrupt (%s: %s); moved to %s, the counters start again",
                    path, type(exc).__name__, exc, aside)
        return OpStats()
