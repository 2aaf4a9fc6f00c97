"""InfiniBand partition keys per job: the job's VM's InfiniBand functions (SR-IOV VFs or whole
ports, chosen by placement) in a partition of the job's own, so its VMs on every node reach each
other over InfiniBand and no other tenant's.

A job's create calls these in its ``ib`` stage, and its delete calls :func:`remove` (see
slurm_dgxvm.lifecycle)::

    from slurm_dgxvm import ibpart
    plan = ibpart.plan_for(job_id, placement, host, pkey_min=cfg.ib.pkey_min,
                           pkey_max=cfg.ib.pkey_max)   # pure: key, GUIDs
    ibpart.apply(plan, cfg)     # before the VM starts: set each VF's GUID (ip link), then add
                                # the GUIDs to the key at the subnet manager
    ...
    ibpart.remove(plan, cfg)    # after the VM is gone (teardown): take them out again

``cfg`` is the :class:`slurm_dgxvm.config.Config`; ``[ib] backend`` picks the subnet manager:
``"ufm"`` (:mod:`.ufm`, UFM's REST API), ``"opensm"`` (:mod:`.opensm`, partitions.conf) or
``"none"`` (apply sets the GUIDs only, remove does nothing). A placement without InfiniBand
(``ib = "none"``) has an empty plan and both calls do nothing. Every failure is an
:class:`slurm_dgxvm.errors.IbPartitionError` (exit 3) naming the call (``POST
https://ufm/ufmRest/resources/pkeys``, ``SIGHUP opensm ...``, the ``ip link`` command) and the
key. ``remove`` should run even after a failed ``apply`` (it is idempotent for OpenSM; UFM
answers removing GUIDs that are not members as it does).

What cannot run on a machine without HCAs is simulated in the tests: ``tools/ufm-standin``
answers the UFM calls and records them, and ``run`` (the ``ip link`` runner) is a stub.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import IbPartitionError
from ..tools import run_tool
from .opensm import OpenSm
from .plan import IbPlan, Member, pkey_for, plan_for, vf_guid
from .ufm import Ufm

__all__ = ["IbPlan", "Member", "apply", "backend", "pkey_for", "plan_for", "remove", "run_ip",
           "vf_guid"]


def backend(cfg) -> Ufm | OpenSm | None:
    """The subnet manager of ``cfg.ib.backend``; None for "none"."""
    ib = cfg.ib
    if ib.backend == "ufm":
        return Ufm(ib.url, ib.credentials_file, ib.timeout_s)
    if ib.backend == "opensm":
        return OpenSm(ib.opensm_partitions, ib.opensm_base, ib.opensm_pid_file,
                      cfg.host.state_dir, ib.timeout_s)
    return None


def run_ip(argv, timeout: float, pkey: str) -> None:
    """Run one ``ip link`` command of a plan (the default runner of :func:`apply`)."""
    run_tool(argv, timeout=timeout,
             error=lambda reason: IbPartitionError(pkey=pkey, call=" ".join(argv), reason=reason))


def apply(plan: IbPlan, cfg, *, run: Callable[..., None] = run_ip) -> None:
    """Set each VF's node and port GUID (``ip link set DEV vf N node_guid|port_guid G``), then
    add the plan's GUIDs to its key at the subnet manager. Call it before the VM starts: a VF's
    GUID cannot change while a guest drives it. ``run(argv, timeout, pkey)`` runs a command."""
    if not plan.members:
        return
    for argv in plan.guid_commands():
        run(argv, cfg.ib.timeout_s, plan.pkey_hex)
    sm = backend(cfg)
    if sm is not None:
        sm.add(plan)


def remove(plan: IbPlan, cfg) -> None:
    """Take the plan's GUIDs out of its key (after the VM is gone)."""
    if not plan.members:
        return
    sm = backend(cfg)
    if sm is not None:
        sm.remove(plan)
