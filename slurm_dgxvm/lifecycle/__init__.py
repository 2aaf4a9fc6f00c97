"""The VM lifecycle: a placement made into a running VM, and back.

- :mod:`.env`: what the lifecycle works with (config, host, ledger, records, images, libvirt).
- :mod:`.identity`: the account a VM maps, its groups, its hostname.
- :mod:`.create`: the create steps on one undo stack.
- :mod:`.delete`: teardown, idempotent over whatever a crash left.
- :mod:`.inventory`: ``dgxvm list``'s rows.
- :mod:`.libvirt_hook`: libvirt's qemu hook that keeps the ledger true outside dgxvm.
- :mod:`.vmlock`: the per-VM-name lock create and delete hold, and reconcile only tries.
- :mod:`.cachedir`: the user's container image cache directory, made before the VM is defined.

``dgxvm reconcile`` is :mod:`slurm_dgxvm.reconcile`, above this package: it sweeps the users'
container image caches too, and the lifecycle never imports the containers package.

Every name below is imported from its submodule on first use (:mod:`slurm_dgxvm.lazy`), not
when the package is: ``dgxvm run`` needs only :mod:`.env` and :mod:`.identity`, and runs once
per task of a job, so it must not pay for libvirt, jinja2 and the designer that :mod:`.create`
and :mod:`.delete` load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .create import CreateRequest, check_share, create
    from .delete import delete
    from .env import Env, Progress, quiet
    from .identity import account, group_names, hostname_for
    from .inventory import VmRow, list_vms
    from .libvirt_hook import HOOK_OPS, hook, libvirt_hook_script

__all__ = ["CreateRequest", "Env", "HOOK_OPS", "Progress", "VmRow", "account", "check_share",
           "create", "delete", "group_names", "hook", "hostname_for", "libvirt_hook_script",
           "list_vms", "quiet"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "CreateRequest": "create", "check_share": "create", "create": "create",
    "delete": "delete",
    "Env": "env", "Progress": "env", "quiet": "env",
    "account": "identity", "group_names": "identity", "hostname_for": "identity",
    "VmRow": "inventory", "list_vms": "inventory",
    "HOOK_OPS": "libvirt_hook", "hook": "libvirt_hook", "libvirt_hook_script": "libvirt_hook",
})
