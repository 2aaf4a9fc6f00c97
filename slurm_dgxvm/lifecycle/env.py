"""What the lifecycle works with: the config and, built from it once and lazily, the host's
topology, the ledger, the GPU health record, the placement policy, the VM records, the image
store, Fabric Manager and the libvirt connection."""

from __future__ import annotations

from functools import cached_property
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import Config
from ..records import VmStore

if TYPE_CHECKING:
    from ..fabric import Fabric
    from ..health import HealthStore
    from ..images import ImageStore
    from ..ledger import Ledger
    from ..placement import Policy

# The rest is imported where it is used: dgxvm run, once per task of a job, needs only the
# config and the VM records; topology discovery, the ledger, the image store, Fabric Manager
# and libvirt are for the verbs that make and unmake VMs.

Progress = Callable[[str], None]
"""Told the name of each stage as it begins (the CLI prints it, the Prolog logs it)."""


def quiet(_stage: str) -> None:
    """A :data:`Progress` that says nothing."""


class Env:
    """Everything the lifecycle works with, built lazily from the config once."""

    def __init__(self, cfg: Config, *, host=None):
        self.cfg = cfg
        if host is not None:
            self.__dict__["host"] = host

    @cached_property
    def sysfs(self):
        from ..topology import SysfsRoot
        return SysfsRoot(self.cfg.host.sysfs_root)

    @cached_property
    def host(self):
        from ..topology import discover
        from ..topology.nvml import query as nvml_query
        c = self.cfg.host
        return discover(self.sysfs, machine=c.machine or None,
                        module_ids=c.module_ids or None, nvml=nvml_query)

    @cached_property
    def health(self) -> HealthStore:
        from ..health import HealthStore
        return HealthStore(self.cfg.host.state_dir)

    @cached_property
    def ledger(self) -> Ledger:
        from ..ledger import Ledger
        return Ledger(self.cfg.host.state_dir, lock_timeout=self.cfg.ledger.lock_timeout_s)

    @cached_property
    def policy(self) -> Policy:
        from ..placement import Policy
        return Policy.from_config(self.cfg)

    @cached_property
    def vms(self) -> VmStore:
        return VmStore(self.cfg.host.state_dir)

    @cached_property
    def images(self) -> ImageStore:
        from ..images import ImageStore
        return ImageStore(self.cfg.images.store)

    @cached_property
    def fabric(self) -> Fabric:
        from ..fabric import Fabric
        return Fabric.from_config(self.cfg)

    @property
    def uri(self) -> str:
        return self.cfg.libvirt.uri

    def connect(self):
        from ..virt import hypervisor
        return hypervisor.connect(self.uri)

    def fit(self, host) -> bool:
        mode = self.cfg.libvirt.fit_to_host
        return mode == "always" or (mode == "auto" and host.simulated is not None)

    def image_users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for rec in self.vms.all():
            out.setdefault(rec.image, []).append(rec.name)
        return out
