"""The qemu-img adapter: run ``qemu-img info|check|create`` and hand back what it said.

Every run goes through :func:`slurm_dgxvm.tools.run_tool` (time-out, C locale, no stdin) and
turns the ways qemu-img can fail (not installed, no answer in time, a non-zero exit) into the
caller's error, given as ``error(reason)``: an ImageError for the store, a DiskError for a
VM's disk. What a result *means* for dgxvm is decided by the callers (:mod:`.accept`,
:mod:`.disks`).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable

from ..tools import run_tool, tail

QEMU_IMG = "qemu-img"                     # module attribute so tests can point it elsewhere
INFO_TIMEOUT_S = 120.0
CHECK_TIMEOUT_S = 1800.0                  # qemu-img check reads all metadata of a large image
CREATE_TIMEOUT_S = 300.0

Error = Callable[[str], Exception]


def _run(args: list[str], *, timeout: float, error: Error,
         check: bool = True) -> subprocess.CompletedProcess:
    """``qemu-img ARGS``, the run named ``qemu-img <verb>`` in messages."""
    return run_tool([QEMU_IMG, *args], timeout=timeout, error=error, check=check,
                    what=f"qemu-img {args[0]}", hint="; install qemu-utils")


def info(path: str | os.PathLike, *, error: Error) -> dict:
    """``qemu-img info --output=json PATH`` as a dict that has at least ``format`` and an
    integer ``virtual-size``; ``error`` when qemu-img fails or says something else."""
    r = _run(["info", "--output=json", os.fspath(path)], timeout=INFO_TIMEOUT_S, error=error)
    try:
        doc = json.loads(r.stdout)
        doc["format"]
        int(doc["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise error(f"qemu-img info gave unreadable output: {tail(r.stdout, 200)}") from None
    return doc


def check(path: str | os.PathLike, fmt: str, *, error: Error) -> subprocess.CompletedProcess:
    """``qemu-img check -f FMT PATH``; the caller reads the exit status (0 clean, 2 corrupt,
    3 leaked clusters only, anything else: the check could not complete)."""
    return _run(["check", "-f", fmt, os.fspath(path)], timeout=CHECK_TIMEOUT_S, error=error,
                check=False)


def create(path: str | os.PathLike, opts: list[str], size: int, *, error: Error) -> None:
    """``qemu-img create -q OPTS PATH SIZE``."""
    _run(["create", "-q", *opts, os.fspath(path), str(size)], timeout=CREATE_TIMEOUT_S,
         error=error)


__all__ = ["CHECK_TIMEOUT_S", "CREATE_TIMEOUT_S", "INFO_TIMEOUT_S", "QEMU_IMG", "check",
           "create", "info"]
