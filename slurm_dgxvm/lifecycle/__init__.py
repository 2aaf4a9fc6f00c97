"""The VM lifecycle: a placement made into a running VM, and back.

- :mod:`.env`: what the lifecycle works with (config, host, ledger, records, images, libvirt).
- :mod:`.identity`: the account a VM maps, its groups, its hostname.
- :mod:`.create`: the create steps on one undo stack.
- :mod:`.delete`: teardown, idempotent over whatever a crash left.
- :mod:`.inventory`: ``dgxvm list``'s rows.
- :mod:`.libvirt_hook`: libvirt's qemu hook that keeps the ledger true outside dgxvm.
"""

from .create import CreateRequest, check_share, create
from .delete import delete
from .env import Env, Progress, quiet
from .identity import account, group_names, hostname_for
from .inventory import VmRow, list_vms
from .libvirt_hook import HOOK_OPS, hook, libvirt_hook_script

__all__ = ["CreateRequest", "Env", "HOOK_OPS", "Progress", "VmRow", "account", "check_share",
           "create", "delete", "group_names", "hook", "hostname_for", "libvirt_hook_script",
           "list_vms", "quiet"]
