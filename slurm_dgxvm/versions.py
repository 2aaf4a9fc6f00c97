"""Versions of dgxvm and what it runs on (``dgxvm version show``)."""

from __future__ import annotations

import platform

from . import __version__


def dist_version(name: str) -> str | None:
    """The installed distribution's version (None when it is not installed)."""
    # click.__version__ is deprecated (a DeprecationWarning on every call, gone in click 9.1)
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """``{"dgxvm", "python", "click", "libvirt_python"}`` (None: not installed)."""
    doc = {"dgxvm": __version__, "python": platform.python_version(),
           "click": dist_version("click")}
    try:
        import libvirt  # noqa: F401  (optional until the VM lifecycle lands)
        doc["libvirt_python"] = libvirt.getVersion()
    except Exception:  # noqa: BLE001 - libvirt-python absent or broken: the version says null
        doc["libvirt_python"] = None
    return doc
