"""The VM lifecycle: a placement made into a running VM, and back.

- :mod:`.env`: what the lifecycle works with (config, host, ledger, records, images, libvirt).
- :mod:`.identity`: the account a VM maps, its groups, its hostname.
- :mod:`.create`: the create steps on one undo stack.
- :mod:`.delete`: teardown, idempotent over whatever a crash left.
- :mod:`.inventory`: ``dgxvm list``'s rows.
- :mod:`.libvirt_hook`: libvirt's qemu hook that keeps the ledger true outside dgxvm.

Every name below is imported from its submodule on first use (PEP 562), not when the package is:
``dgxvm run`` needs only :mod:`.env` and :mod:`.identity`, and runs once per task of a job, so
it must not pay for libvirt, jinja2 and the designer that :mod:`.create` and :mod:`.delete` load.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

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

#: each exported name -> the submodule that defines it
_EXPORTS = {
    "CreateRequest": "create", "check_share": "create", "create": "create",
    "delete": "delete",
    "Env": "env", "Progress": "env", "quiet": "env",
    "account": "identity", "group_names": "identity", "hostname_for": "identity",
    "VmRow": "inventory", "list_vms": "inventory",
    "HOOK_OPS": "libvirt_hook", "hook": "libvirt_hook", "libvirt_hook_script": "libvirt_hook",
}
#: exported functions named like the submodule that defines them
_SHADOWED = ("create", "delete")


def __getattr__(name: str):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    setattr(sys.modules[__name__], name, value)    # once: later lookups find it here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package (the import system's setattr), so
    ``import slurm_dgxvm.lifecycle.create`` would make ``lifecycle.create`` the module. Here
    ``create`` and ``delete`` are the functions, as they were when this package imported them
    eagerly; whichever comes first, the function is what stays bound."""

    def __setattr__(self, name: str, value) -> None:
        if (name in _SHADOWED and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
