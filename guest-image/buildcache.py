"""What both guest image builders (build.py, debian-cloud/build.py) do with their cache
directory besides building: keep it bounded.

A build lives in ``OUT/<key>/`` (12 hex digits over the builder's files and the package
versions): every change of a package or of the builder makes a new key, and without pruning the
cache grew by a whole image each time (600 MB for the cloud guest). :func:`prune` runs under the
builder's lock after a new build: it keeps that build and the newest ``keep - 1`` others (one in
use elsewhere, an image install reading it, is never the oldest), and removes ``.work-*``
directories a killed build left.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

KEY = re.compile(r"[0-9a-f]{12}\Z")
KEEP = 2


def prune(out_root: Path, final: Path, log: Callable[[str], None], keep: int = KEEP) -> list[str]:
    """Remove superseded builds (all but ``final`` and the newest ``keep - 1`` others) and the
    work directories of killed builds; returns the names removed. Call with the lock held."""
    builds = sorted((p for p in out_root.iterdir()
                     if p.is_dir() and KEY.match(p.name) and p != final),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for old in builds[max(keep - 1, 0):]:
        log(f"removing superseded build {old.name}")
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old.name)
    for work in out_root.glob(".work-*"):
        log(f"removing {work.name}, left by a build that did not finish")
        shutil.rmtree(work, ignore_errors=True)
        removed.append(work.name)
    return removed
