"""libvirt's qemu hook: keeps the ledger true when a domain starts or stops outside dgxvm.

``virsh shutdown`` / ``virsh start`` (and a guest that powers itself off or crashes) go through
libvirt's qemu hook (etc/libvirt/hooks/qemu runs ``dgxvm hook qemu``): "release" resets and checks the VM's
GPUs and NVSwitches (:mod:`slurm_dgxvm.health`: a failing one is quarantined) and gives them,
its CPUs, memory and FM partition back to the ledger, keeping its drives;
"prepare" takes them again from the VM record, or refuses the start naming who holds them now.

It never takes the VM's own lock (:mod:`.vmlock`): libvirtd runs it inside the start and the
stop that ``create`` and ``delete`` wait for while they hold that lock, so waiting for it here
would hold libvirtd up against them. It stands aside by the record's state instead, and takes
only the ledger's lock, which neither holds while it calls libvirt.
"""

from __future__ import annotations

import shlex
import time

from ..errors import DgxvmError, LedgerConflict
from ..names import domain_name
from .env import Env

HOOK_OPS = ("prepare", "release")


def hook(env: Env, name: str, op: str, sub_op: str) -> str | None:
    """Keep the ledger true when a domain starts or stops outside dgxvm (virsh, a crash).

    Called by libvirtd (etc/libvirt/hooks/qemu) with the domain name and the operation; it must
    not call back into libvirt. ``prepare begin``: take the VM's resources again from its record
    (nothing to do when the ledger already holds them, e.g. during ``dgxvm create``); a
    conflict raises LedgerConflict, which makes libvirt refuse the start with our message.
    ``release end``: give them back (the drives stay). Domains without a dgxvm record are
    ignored. Returns a line saying what was done, or None.
    """
    try:
        domain_name(name)
    except DgxvmError:
        return None
    rec = env.vms.load(name)
    if rec is None or rec.state in ("creating", "deleting"):
        return None
    alloc = rec.allocation
    fm = alloc.fm_partition
    if op == "prepare" and sub_op == "begin":
        with env.ledger.transaction() as txn:
            taken_now = rec.ledger_key not in txn.allocations
            if taken_now:
                try:
                    txn.allocate(alloc)
                except LedgerConflict as exc:
                    raise LedgerConflict(key=rec.ledger_key,
                                         reason=f"cannot start {name}: {exc.reason}") from exc
        if taken_now and fm is not None:
            try:
                env.fabric.activate(fm)
            except DgxvmError:
                env.ledger.release(rec.ledger_key)
                raise
        env.vms.save(rec.with_(state="running", started=time.time(), ended=None))
        return f"{name}: took GPUs {alloc.gpus} again"
    if op == "release" and sub_op == "end":
        if fm is not None:
            env.fabric.deactivate(fm)
        # the guest had the devices until now (it may have crashed with them in any state):
        # reset and check them before the ledger gives them out, as after every VM
        from .delete import check_devices
        checked = check_devices(env, name, (*alloc.gpu_pcis, *alloc.nvswitches), rec.job_id)
        env.ledger.release(rec.ledger_key)
        quarantined = {v.pci: v.reason for v in checked.bad} if checked else {}
        env.vms.save(rec.with_(state="stopped", started=None,
                               ended="stopped outside dgxvm (its guest powered off or crashed, "
                                     "or virsh destroyed it)",
                               gpu_resets=checked.reset_s if checked else {},
                               quarantined=quarantined))
        return (f"{name}: stopped; its GPUs were reset"
                + (f" ({len(quarantined)} quarantined)" if quarantined else "")
                + "; its GPUs, CPUs and memory are free, its drives are kept")
    return None


def libvirt_hook_script(dgxvm: str = "/usr/local/bin/dgxvm", config: str | None = None) -> str:
    """The text of /etc/libvirt/hooks/qemu that runs ``dgxvm hook`` (etc/libvirt/hooks/qemu is
    this with the defaults). libvirtd reads hooks when it starts."""
    env = f"DGXVM_CONFIG={shlex.quote(config)} " if config else ""
    return (
        "#!/bin/sh\n"
        "# libvirt qemu hook installed for slurm-dgxvm: keeps dgxvm's ledger true when a domain\n"
        "# starts or stops outside dgxvm (virsh start/shutdown/destroy, a guest that powers off\n"
        "# or crashes). \"prepare\" takes the VM's GPUs/CPUs/memory again or refuses the start;\n"
        "# \"release\" gives them back, keeping the drives. Other domains are left alone.\n"
        "# Install: install -m 0755 THIS /etc/libvirt/hooks/qemu, then restart libvirtd.\n"
        f"case \"$2\" in {'|'.join(HOOK_OPS)}) ;; *) exit 0 ;; esac\n"
        f"exec env {env}{shlex.quote(dgxvm)} hook qemu \"$@\" </dev/null\n"
    )
