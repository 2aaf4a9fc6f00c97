"""Which jobs Slurm has on this node: what makes a job's VM live for ``dgxvm reconcile``.

A job's VM is live while Slurm has its job on this node in a state that is not final: the
Prolog runs while the job is CONFIGURING (or already RUNNING), the Epilog while it is
COMPLETING; SUSPENDED, STOPPED, RESIZING, SIGNALING ... are live too. Any state not known to
be final counts as live: a VM kept one run too long costs nothing, one removed under its job
loses the job.

Slurm is asked through the one adapter (:meth:`Slurm.jobs_on_node`, squeue). When it cannot be
asked (slurmctld down, the node unknown to it, squeue missing), the answer says so and no job's
VM is touched (:mod:`slurm_dgxvm.reconcile.plan`). The node's name is Slurm's: ``--node``,
else ``SLURMD_NODENAME`` (slurmd sets it for the hooks), else the short host name, which is
Slurm's own default NodeName.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping

from ..errors import SlurmCommandError
from ..reconcile.plan import JobsOnNode
from .commands import Slurm

#: job states after which a job holds nothing on a node (squeue's long names)
FINAL_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
                          "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
                          "TIMEOUT"})


def node_name(environ: Mapping[str, str], given: str | None = None) -> str:
    """This node's name in Slurm: ``given``, else SLURMD_NODENAME, else ``hostname -s``."""
    return given or environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def is_live(state: str) -> bool:
    """Whether a job in ``state`` (squeue's %T) may still have its VM in use."""
    return state.strip().upper() not in FINAL_STATES


def jobs_on_node(slurm: Slurm, node: str, *, now: float | None = None) -> JobsOnNode:
    """Slurm's jobs on ``node``; ``live`` None (with the reason) when Slurm cannot be asked.
    ``asked_at`` is taken before asking: a VM made after it may be a job Slurm did not list."""
    asked_at = time.time() if now is None else now
    try:
        states = slurm.jobs_on_node(node)
    except SlurmCommandError as exc:
        return JobsOnNode(node=node, live=None, error=str(exc), asked_at=asked_at)
    return JobsOnNode(node=node, live=frozenset(j for j, s in states.items() if is_live(s)),
                      states=dict(states), asked_at=asked_at)


__all__ = ["FINAL_STATES", "is_live", "jobs_on_node", "node_name"]
