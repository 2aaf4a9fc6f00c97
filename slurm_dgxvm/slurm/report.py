"""``dgxvm report``: Slurm's accounting records of VM jobs, summed per user and account.

Input: sacct rows (``Slurm.sacct``) whose AdminComment is a dgxvm record. Output per (user,
account): jobs that got a VM, GPU-hours in VMs (GPUs x the time the VM held them; for a VM still
running, x the job's elapsed time so far), median boot and teardown overhead, and failures
(jobs refused or failed at the Prolog).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

from ..ranges import parse_index_list
from .accounting import decode


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


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summarize(rows: list[dict]) -> list[Summary]:
    out: dict[tuple[str, str], Summary] = {}
    for row in rows:
        rec = decode(row.get("AdminComment"))
        if rec is None:
            continue
        key = (row.get("User") or "?", row.get("Account") or "-")
        s = out.setdefault(key, Summary(*key))
        s.jobs += 1
        if rec.get("state") in ("refused", "failed"):
            s.failures += 1
            s.refused += rec.get("state") == "refused"
            continue
        s.vms += 1
        try:
            n = len(parse_index_list(rec.get("gpus", ""), allow_empty=True))
        except Exception:  # noqa: BLE001 - a damaged record counts no GPUs, not a crash
            n = 0
        held = _float(rec.get("held_s"))
        if held is None:
            held = _float(row.get("ElapsedRaw")) or 0.0
        s.gpu_hours += n * held / 3600.0
        for name, values in (("boot_s", s.boot_s), ("teardown_s", s.teardown_s)):
            v = _float(rec.get(name))
            if v is not None:
                values.append(v)
    return sorted(out.values(), key=lambda s: (s.user, s.account))


def render(summaries: list[Summary], since: str) -> str:
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
    return "\n".join(lines) + "\n"
