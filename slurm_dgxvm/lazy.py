"""Packages that export their submodules' names without importing the submodules (PEP 562).

A package's ``__init__`` that imports every submodule to re-export their names makes importing
any one submodule import them all (the package runs first). ``dgxvm run``, which runs once per
task of a job, needs :mod:`.lifecycle.env` and :mod:`.placement.model`, not the libvirt, jinja2
and topology code beside them. Such a package names what it exports and where::

    __getattr__, __dir__ = lazy_exports(__name__, {"Env": "env", "create": "create", ...})

and each name is imported from its submodule on first use, then bound on the package.

A name that is also its submodule's name (``lifecycle.create``, the function in
``lifecycle/create.py``) stays the name, not the module: importing a submodule binds it on its
package (the import system's setattr), which an eager ``from .create import create`` overwrote
at once; here the package's module class keeps the exported value bound instead.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping


class _LazyPackage(types.ModuleType):
    """A package whose ``_lazy_shadowed`` names must stay their exported value when the import
    system binds the submodule of the same name on it."""

    def __setattr__(self, name: str, value) -> None:
        if (name in self.__dict__.get("_lazy_shadowed", ()) and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, which exports each name of
    ``exports`` from the submodule it maps to (relative to the package)."""
    module = sys.modules[package]
    exports = dict(exports)
    shadowed = frozenset(name for name, sub in exports.items() if name == sub)
    if shadowed:
        module.__class__ = _LazyPackage
        module._lazy_shadowed = shadowed

    def __getattr__(name: str):
        try:
            sub = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f".{sub}", package), name)
        setattr(module, name, value)    # once: later lookups find it on the package
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(exports))

    return __getattr__, __dir__
