"""What every command of ``dgxvm`` gets from the group (click's context object): the config,
the host model and the ledger, built lazily once; and the exit status a failure of dgxvm
itself takes in this invocation (``dgxvm run``/``shell``: 125; ``main()`` reads it)."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import click

from .. import config as config_mod

if TYPE_CHECKING:
    from ..ledger import Ledger
    from ..placement import Policy


class Context:
    """What every command needs, built lazily once: config, host model, ledger."""

    def __init__(self, config_path: str | None = None, sysfs_root: str | None = None,
                 state_dir: str | None = None):
        self._config_path = config_path
        self._sysfs_root = sysfs_root
        self._state_dir = state_dir
        #: the exit status of every failure of dgxvm itself when the verb passes a command's
        #: status through (``dgxvm run``/``shell``: 125); None: each error's own code
        self.failure_code: int | None = None

    def locate(self, config_path: str | None, sysfs_root: str | None,
               state_dir: str | None) -> Context:
        """The group's options (before anything was built from them)."""
        self._config_path = config_path
        self._sysfs_root = sysfs_root
        self._state_dir = state_dir
        return self

    @cached_property
    def config(self) -> config_mod.Config:
        return config_mod.load(self._config_path).with_overrides(
            sysfs_root=self._sysfs_root, state_dir=self._state_dir)

    @cached_property
    def env(self):
        """The library's environment on this config: host model, ledger, policy, and for the VM
        verbs libvirt, images and VM records (all built lazily, once)."""
        from ..lifecycle import Env
        return Env(self.config)

    @property
    def host(self):
        return self.env.host

    @property
    def ledger(self) -> Ledger:
        return self.env.ledger

    @property
    def policy(self) -> Policy:
        return self.env.policy

    def ledger_state(self):
        """The ledger for display; a state dir that does not exist yet is an empty ledger."""
        return self.ledger.read()

    def image_users(self) -> dict[str, list[str]]:
        return self.env.image_users()


pass_ctx = click.make_pass_decorator(Context)
