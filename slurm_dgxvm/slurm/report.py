"""``dgxvm report``: Slurm's accounting records of VM jobs, summed per user and account.

Input: sacct rows (``Slurm.sacct``) whose AdminComment holds dgxvm records (one per node of the
job). Output per (user, account): jobs, VMs (a job on N nodes has N), GPU-hours in VMs (GPUs x
the time the VM held them; for a VM still running, x the job's elapsed time so far), median
boot and teardown overhead, and failures (jobs refused or failed at the Prolog). Across all of
them, per create and teardown stage (:mod:`slurm_dgxvm.observe.stages`): how many jobs' VMs have
it, its median and its 95th percentile (nearest rank, :func:`percentile`). Only jobs that got a
VM count there: a failed create's last stage ran for a time that says nothing about the stage.
Per node (the records of jobs on several nodes name theirs; a one-node job's record names none
and counts under "-"): VMs, GPU-hours and failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

from ..ranges import parse_index_list
from ..observe.stages import STAGES
from .accounting import decode_all, parse_stages


@dataclass
class Summary:
    user: str
    account: str
    jobs: int = 0                       # jobs with a dgxvm record
    vms: int = 0                        # of them, jobs that got a VM
    gpu_hours: float = 0.0
    boot_s: list[float] = field(default_factory=list)
    teardown_s: list[float] = field(default_factory=list)
    failures: int = 0                   # refused (the job's fault) + failed (the node's)
    refused: int = 0

    def to_json(self) -> dict:
        return {"user": self.user, "account": self.account, "jobs": self.jobs, "vms": self.vms,
                "gpu_hours": round(self.gpu_hours, 4),
                "median_boot_s": round(median(self.boot_s), 2) if self.boot_s else None,
                "median_teardown_s": round(median(self.teardown_s), 2) if self.teardown_s else None,
                "failures": self.failures, "refused": self.refused}


def percentile(values: list[float], p: int) -> float | None:
    """The ``p``-th percentile (1 <= p <= 100) by nearest rank: the smallest value that at least
    ``p`` % of ``values`` are less than or equal to, i.e. the ``ceil(p/100 * n)``-th smallest
    (always one of the values, never interpolated). None for no values.

    >>> percentile([float(v) for v in range(1, 21)], 95)     # rank ceil(0.95 * 20) = 19
    19.0
    """
    if not values:
        return None
    if not 1 <= p <= 100:
        raise ValueError(f"percentile {p} is not between 1 and 100")
    rank = -(-p * len(values) // 100)                # ceil, in integers: exact
    return sorted(values)[rank - 1]


@dataclass
class StageSummary:
    """One stage across the jobs read: their seconds."""

    op: str                             # create | teardown
    stage: str
    seconds: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        med, p95 = (median(self.seconds) if self.seconds else None,
                    percentile(self.seconds, 95))
        return {"op": self.op, "stage": self.stage, "jobs": len(self.seconds),
                "median_s": round(med, 3) if med is not None else None,
                "p95_s": round(p95, 3) if p95 is not None else None}


def summarize_stages(rows: list[dict]) -> list[StageSummary]:
    """Every stage of :data:`slurm_dgxvm.observe.stages.STAGES`, in run order (``jobs`` 0 for one no
    record has, e.g. ``fm`` on a DGX-2 or ``reset``), then stages this version does not know,
    over the jobs that got a VM."""
    out = {(op, stage): StageSummary(op, stage) for op, stages in STAGES.items()
           for stage in stages}
    extra: dict[tuple[str, str], StageSummary] = {}
    for rec in (r for row in rows for r in decode_all(row.get("AdminComment"))):
        if rec.get("state") in ("refused", "failed"):
            continue
        for op in STAGES:
            for stage, seconds in parse_stages(rec.get(f"{op}_stages")).items():
                key = (op, stage)
                target = out.get(key) or extra.setdefault(key, StageSummary(op, stage))
                target.seconds.append(seconds)
    return [*out.values(), *(extra[k] for k in sorted(extra))]


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _gpu_hours(rec: dict, row: dict) -> float:
    try:
        n = len(parse_index_list(rec.get("gpus", ""), allow_empty=True))
    except Exception:  # noqa: BLE001 - a damaged record counts no GPUs, not a crash
        n = 0
    held = _float(rec.get("held_s"))
    if held is None:
        held = _float(row.get("ElapsedRaw")) or 0.0
    return n * held / 3600.0


def summarize(rows: list[dict]) -> list[Summary]:
    """Per (user, account). A job counts once in ``jobs`` and once in ``failures`` when any of
    its nodes refused or failed it; each node's VM counts in ``vms`` and its GPU-hours."""
    out: dict[tuple[str, str], Summary] = {}
    for row in rows:
        records = decode_all(row.get("AdminComment"))
        if not records:
            continue
        key = (row.get("User") or "?", row.get("Account") or "-")
        s = out.setdefault(key, Summary(*key))
        s.jobs += 1
        failed = [r for r in records if r.get("state") in ("refused", "failed")]
        if failed:
            s.failures += 1
            s.refused += any(r.get("state") == "refused" for r in failed)
        for rec in records:
            if rec in failed:
                continue
            s.vms += 1
            s.gpu_hours += _gpu_hours(rec, row)
            for name, values in (("boot_s", s.boot_s), ("teardown_s", s.teardown_s)):
                v = _float(rec.get(name))
                if v is not None:
                    values.append(v)
    return sorted(out.values(), key=lambda s: (s.user, s.account))


@dataclass
class NodeSummary:
    """One node's VMs across the jobs read (``-``: the records that name no node)."""

    node: str
    vms: int = 0
    gpu_hours: float = 0.0
    failures: int = 0

    def to_json(self) -> dict:
        return {"node": self.node, "vms": self.vms, "gpu_hours": round(self.gpu_hours, 4),
                "failures": self.failures}


def summarize_nodes(rows: list[dict]) -> list[NodeSummary]:
    out: dict[str, NodeSummary] = {}
    for row in rows:
        for rec in decode_all(row.get("AdminComment")):
            n = out.setdefault(rec.get("node") or "-", NodeSummary(rec.get("node") or "-"))
            if rec.get("state") in ("refused", "failed"):
                n.failures += 1
                continue
            n.vms += 1
            n.gpu_hours += _gpu_hours(rec, row)
    return sorted(out.values(), key=lambda n: n.node)


def render(summaries: list[Summary], since: str, stages: list[StageSummary] = (),
           nodes: list[NodeSummary] = ()) -> str:
    if not summaries:
        return f"no dgxvm jobs in Slurm's accounting since {since}\n"
    lines = [f"dgxvm jobs since {since} (from sacct AdminComment records)",
             f"{'USER':<12} {'ACCOUNT':<10} {'JOBS':>5} {'VMS':>4} {'GPU-HOURS':>10} "
             f"{'BOOT(med)':>10} {'TEARDOWN(med)':>14} {'FAILURES':>9}"]
    for s in summaries:
        d = s.to_json()
        boot = f"{d['median_boot_s']:.1f}s" if d["median_boot_s"] is not None else "-"
        down = f"{d['median_teardown_s']:.1f}s" if d["median_teardown_s"] is not None else "-"
        fails = f"{s.failures}" + (f" ({s.refused} refused)" if s.refused else "")
        lines.append(f"{s.user:<12} {s.account:<10} {s.jobs:>5} {s.vms:>4} "
                     f"{d['gpu_hours']:>10.3f} {boot:>10} {down:>14} {fails:>9}")
    if any(n.node != "-" for n in nodes):
        lines += ["", "per node", f"{'NODE':<20} {'VMS':>4} {'GPU-HOURS':>10} {'FAILURES':>9}"]
        lines += [f"{n.node:<20} {n.vms:>4} {n.gpu_hours:>10.3f} {n.failures:>9}"
                  for n in nodes]
    timed = [st.to_json() for st in stages if st.seconds]
    if timed:
        lines += ["", "stages, over the jobs that got a VM (p95: nearest rank)",
                  f"{'OP':<9} {'STAGE':<10} {'JOBS':>5} {'MEDIAN':>10} {'P95':>10}"]
        lines += [f"{d['op']:<9} {d['stage']:<10} {d['jobs']:>5} {d['median_s']:>9.3f}s "
                  f"{d['p95_s']:>9.3f}s" for d in timed]
    return "\n".join(lines) + "\n"
