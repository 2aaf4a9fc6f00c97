"""The ssh command that reaches a test guest the way a job does: its key only, its host key
pinned (never ``StrictHostKeyChecking=no``), never a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def ssh_argv(key: Path | str, known_hosts: Path | str, destination: str, command: str, *,
             connect_timeout: int, options: Sequence[str] = ()) -> list[str]:
    """``ssh -i KEY`` trusting only the host keys in ``known_hosts``, in batch mode, giving up
    connecting after ``connect_timeout`` s; ``options`` are more ssh arguments (``-p PORT``,
    ``-F /dev/null``, ...), put before ``destination`` and ``command``."""
    return ["ssh", "-i", str(key), "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={connect_timeout}", *options, destination, command]
