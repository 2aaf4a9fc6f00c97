"""``dgxvm metrics``: this node for Prometheus, in its text exposition format (0.0.4), written
for node_exporter's textfile collector.

Everything comes from the node's own state, read without locks and without libvirt: the VM
records and directories (``<state_dir>/vms``), the ledger, the host's topology and the operation
counters (:mod:`slurm_dgxvm.observe.opstats`). The families, all ``dgxvm_``:

=================================  =========  ================================================
``dgxvm_host_info``                gauge      1, labels ``machine`` (catalog key) and
                                              ``simulated`` (the machine a simulated sysfs
                                              imitates; empty on real hardware)
``dgxvm_vms``                      gauge      VMs by ``state``: the record's (creating,
                                              running, stopped, deleting), ``no-record`` (a
                                              ledger entry or VM directory without a record:
                                              a crash), ``corrupt`` (a record that does not
                                              parse)
``dgxvm_gpus``                     gauge      GPUs by ``state``: held (by the ledger), free,
                                              quarantined (dgxvm gpu show),
                                              missing (not on the bus, or not usable)
``dgxvm_stage_duration_seconds``   histogram  per ``op`` (create, teardown) and ``stage``:
                                              the stages that finished
``dgxvm_operations_total``         counter    creates and teardowns by ``op`` and ``result``
                                              (ok, failed)
``dgxvm_failures_total``           counter    by ``op``, ``fault`` (job, node) and ``cause``
                                              (:data:`slurm_dgxvm.errors.CAUSES`, interrupted)
``dgxvm_warm_vms``                 gauge      warm VMs no job has claimed yet
``dgxvm_warm_claims_total``        counter    jobs that looked for a warm VM, by ``outcome``:
                                              hit (claimed one), miss (started cold);
                                              destroyed counts warm VMs deleted because they
                                              held devices of another job's block
=================================  =========  ================================================

The families are listed even when they have no sample yet (a fresh node), and the fixed label
values of ``dgxvm_vms``, ``dgxvm_gpus`` and ``dgxvm_operations_total`` are always there (0), so
that a rate over them starts at the first scrape; a stage or failure appears with its first
observation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import fsutil
from ..errors import HostError, RecordCorrupt
from ..names import is_warm
from .opstats import OPS, RESULTS, WARM, WARM_OUTCOMES, OpStats
from ..records import VmStore
from .stages import STAGES

PREFIX = "dgxvm_"
TEXTFILE_SUFFIX = ".prom"          # node_exporter reads only these; its temp files are not
TEXTFILE_MODE = 0o644              # node_exporter runs as its own user
VM_STATES = ("creating", "running", "stopped", "deleting", "no-record", "corrupt")
GPU_STATES = ("held", "free", "quarantined", "missing")

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    name: str                      # the full sample name (a histogram's _bucket, _sum, _count)
    labels: Labels
    value: float


@dataclass(frozen=True)
class Family:
    name: str
    type: str                      # gauge | counter | histogram
    help: str
    samples: tuple[Sample, ...]


def vm_states(vms: VmStore, ledger_state) -> dict[str, int]:
    """VMs by state, from the records, the VM directories and the ledger (see the module)."""
    counts = dict.fromkeys(VM_STATES, 0)
    names = vms.names()
    for name in names:
        try:
            rec = vms.load(name)
        except RecordCorrupt:
            counts["corrupt"] += 1
            continue
        state = rec.state if rec is not None else "no-record"
        counts[state] = counts.get(state, 0) + 1
    on_disk = set(names)
    counts["no-record"] += sum(1 for a in ledger_state.allocations.values()
                               if a.domain not in on_disk)
    return counts


def gpu_states(host, ledger_state, quarantined=frozenset()) -> dict[str, int]:
    """GPUs by state. ``free`` is what placement may give (healthy, not held, not
    quarantined); ``quarantined`` the GPUs the health record keeps out (``dgxvm gpu show``;
    one still held by a VM counts as held); ``missing`` the GPUs the machine should have but
    that are not on the bus, or present and not usable."""
    held = {pci for a in ledger_state.allocations.values() for pci in a.gpu_pcis}
    out = {"held": 0, "free": 0, "quarantined": 0, "missing": len(host.missing_gpus)}
    for g in host.gpus:
        if g.pci in held:
            out["held"] += 1
        elif g.pci in quarantined:
            out["quarantined"] += 1
        elif g.healthy:
            out["free"] += 1
        else:
            out["missing"] += 1
    return out


def collect(host, ledger_state, vms: VmStore, stats: OpStats,
            quarantined=frozenset()) -> list[Family]:
    """The families of this node (see the module); ``ledger_state`` is a LedgerState,
    ``quarantined`` the PCI addresses the GPU health record keeps out."""
    def gauge_by(name, label, counts, help_):
        return Family(PREFIX + name, "gauge", help_,
                      tuple(Sample(PREFIX + name, ((label, k),), v) for k, v in counts.items()))

    stage_samples: list[Sample] = []
    for (op, stage), h in sorted(stats.stages.items(), key=lambda kv: _stage_order(*kv[0])):
        base = PREFIX + "stage_duration_seconds"
        labels = (("op", op), ("stage", stage))
        stage_samples += [Sample(base + "_bucket", (*labels, ("le", _le(le))), n)
                          for le, n in h.cumulative()]
        stage_samples += [Sample(base + "_sum", labels, round(h.sum, 3)),
                          Sample(base + "_count", labels, h.count)]
    ops = {(op, result): 0 for op in OPS for result in RESULTS} | \
        {k: n for k, n in stats.ops.items() if k[0] != WARM}
    warm = {o: stats.ops.get((WARM, o), 0) for o in WARM_OUTCOMES}
    waiting = sum(1 for key, a in ledger_state.allocations.items()
                  if is_warm(a.domain) and key == f"domain:{a.domain}")
    return [
        Family(PREFIX + "host_info", "gauge",
               "The host dgxvm reads: machine is the catalog's key; simulated names the machine "
               "a simulated sysfs imitates (empty on real hardware).",
               (Sample(PREFIX + "host_info", (("machine", host.machine),
                                               ("simulated", host.simulated or "")), 1),)),
        gauge_by("vms", "state", vm_states(vms, ledger_state),
                 "dgxvm's VMs by the state their record says (no-record: a ledger entry or VM "
                 "directory without a record; corrupt: a record that does not parse)."),
        gauge_by("gpus", "state", gpu_states(host, ledger_state, quarantined),
                 "GPUs: held by the ledger, free for placement, quarantined (failed a health "
                 "check: dgxvm gpu show), missing (not on the bus or not usable)."),
        Family(PREFIX + "stage_duration_seconds", "histogram",
               "Seconds each stage of a create or teardown took (stages that finished).",
               tuple(stage_samples)),
        Family(PREFIX + "operations_total", "counter",
               "VM creates and teardowns on this node, by result.",
               tuple(Sample(PREFIX + "operations_total", (("op", op), ("result", result)), n)
                     for (op, result), n in sorted(ops.items()))),
        Family(PREFIX + "failures_total", "counter",
               "Failures by operation, fault (job: the request's own; node: this node's) and "
               "cause (the error's exit code class).",
               tuple(Sample(PREFIX + "failures_total",
                            (("op", op), ("fault", fault), ("cause", cause)), n)
                     for (op, fault, cause), n in sorted(stats.failures.items()))),
        Family(PREFIX + "warm_vms", "gauge", "Warm VMs (booted ahead) no job has claimed yet.",
               (Sample(PREFIX + "warm_vms", (), waiting),)),
        Family(PREFIX + "warm_claims_total", "counter",
               "Jobs that looked for a warm VM by outcome (hit: claimed one; miss: started "
               "cold); destroyed: warm VMs deleted because they held another job's devices.",
               tuple(Sample(PREFIX + "warm_claims_total", (("outcome", o),), n)
                     for o, n in warm.items())),
    ]


def _stage_order(op: str, stage: str) -> tuple:
    stages = STAGES.get(op, ())
    return (op not in STAGES, op, stages.index(stage) if stage in stages else len(stages), stage)


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


def render(families: Iterable[Family], *, simulated: str | None = None) -> str:
    """The text exposition format: per family its HELP and TYPE lines, then its samples; one
    ``\\n`` after every line. A simulated host says so in a comment first, as every dgxvm
    output does."""
    lines = []
    if simulated:
        lines.append(f"# SIMULATED host: sysfs written by `dgxvm simulate {simulated}`")
    for f in families:
        lines.append(f"# HELP {f.name} {_escape_help(f.help)}")
        lines.append(f"# TYPE {f.name} {f.type}")
        for s in f.samples:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels)
            lines.append(f"{s.name}{{{labels}}} {_value(s.value)}" if labels
                         else f"{s.name} {_value(s.value)}")
    return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def write_textfile(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a temp file in the same directory (a name
    node_exporter does not read), then a rename, so a scrape sees the old file or the new one,
    never a part. Raises HostError naming the file."""
    path = Path(path)
    try:
        fsutil.atomic_write(path, text, mode=TEXTFILE_MODE)
    except OSError as exc:
        raise HostError(reason=f"cannot write the metrics textfile {path}: "
                               f"{exc.strerror or exc}") from None
