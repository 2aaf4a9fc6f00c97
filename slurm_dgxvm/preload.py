"""A long dgxvm command reads all of its package when it starts, so that an upgrade of the
package cannot change the command half-way.

``apt-get install`` of a new slurm-dgxvm replaces dgxvm's files while Prologs and Epilogs run.
dgxvm imports lazily (a command's module when the command is looked up, libvirt's bindings
when it connects, an error path's modules when it fails), so a Prolog that began on one version
could import the next version's modules half-way and fail with an error of neither; and a
Prolog that fails drains the node. :func:`preload` imports every module of the package and
reads its data files (the domain and network templates, the guest helper) into memory before
the command does anything. dpkg puts each new file in place by a rename, so what a process has
read stays the version it read.

dpkg unpacks a whole package first and renames its files into place at the end, in one quick
pass. Should that pass fall inside the preload, some modules read would be old and some new:
:func:`preload` compares the package's files before and after, and then starts the command
again from the beginning (it has done nothing yet), on the version now installed.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

PACKAGE = __name__.rsplit(".", 1)[0]
ROOT = Path(__file__).resolve().parent
#: how many times a command starts again because the package changed under its preload
RESTARTS_ENV = "DGXVM_PRELOAD_RESTARTS"
MAX_RESTARTS = 3


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of the package (sources and data, not bytecode): its inode and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:     # removed meanwhile: an upgrade is under way
                out[path] = (-1, -1)
                continue
            out[path] = (st.st_ino, st.st_mtime_ns)
    return out


def load_everything() -> list[str]:
    """Import every module of the package and read its data files; the names of the modules
    left out because a library they need is missing (the command cannot need them either)."""
    skipped = []
    for info in pkgutil.walk_packages([str(ROOT)], PACKAGE + "."):
        if info.name.endswith(".__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            if (exc.name or "").split(".")[0] in ("", PACKAGE):
                raise
            skipped.append(info.name)
    from .design.domain_xml import load_templates
    from .seed import guest_helper
    load_templates()
    guest_helper()
    return skipped


def preload(*, execv=os.execv) -> None:
    """Load the package whole (:func:`load_everything`); if its files changed meanwhile, start
    this process again from its first instruction (at most :data:`MAX_RESTARTS` times, then
    go on with what was read)."""
    before = _files(ROOT)
    load_everything()
    if _files(ROOT) == before:
        return
    restarts = int(os.environ.get(RESTARTS_ENV, "0") or 0)
    if restarts >= MAX_RESTARTS:
        return
    os.environ[RESTARTS_ENV] = str(restarts + 1)
    sys.stdout.flush()
    sys.stderr.flush()
    execv(sys.executable, list(sys.orig_argv))
