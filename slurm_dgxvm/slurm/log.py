"""Where the hooks' one-line reports go.

slurmd logs a Prolog's or Epilog's output only when it exits non-zero (``error: prolog failed:
rc:1 output:...``). A VM that came up, a job refused (exit 0) or an Epilog that cleaned up
would leave nothing in slurmd's log at SlurmdDebug=info. So lines of a hook that exits 0 are
appended to slurmd's own log file, in its format, and the lines of one that fails go to stderr
where slurmd picks them up.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"


def slurmd_log_file(environ=None) -> Path | None:
    """SlurmdLogFile of the slurm.conf slurmd uses ($SLURM_CONF), with %h and %n expanded."""
    e = os.environ if environ is None else environ
    conf = Path(e.get("SLURM_CONF") or DEFAULT_SLURM_CONF)
    try:
        text = conf.read_text()
    except OSError:
        return None
    value = None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        key, eq, rest = line.partition("=")
        if eq and key.strip().lower() == "slurmdlogfile":
            value = rest.strip()
    if not value:
        return None
    node = e.get("SLURMD_NODENAME") or socket.gethostname()
    value = value.replace("%h", socket.gethostname().split(".")[0]).replace("%n", node)
    return Path(value)


def timestamped(line: str) -> str:
    now = time.time()
    return (time.strftime("[%Y-%m-%dT%H:%M:%S", time.localtime(now))
            + f".{int(now % 1 * 1000):03d}] {line}\n")


def write(lines: list[str], *, failed: bool, setting: str, environ=None) -> None:
    """Report ``lines``: on stderr when the hook failed (slurmd logs it) or ``setting`` is "",
    else appended to the log file ``setting`` names ("auto": slurmd's own)."""
    if not lines:
        return
    target: Path | None = None
    if not failed and setting:
        target = slurmd_log_file(environ) if setting == "auto" else Path(setting)
    if target is not None:
        try:
            with open(target, "a") as f:         # O_APPEND: whole lines, even beside slurmd
                f.write("".join(timestamped(line) for line in lines))
            return
        except OSError as exc:
            lines = [*lines, f"dgxvm: cannot append to {target}: {exc.strerror}"]
    for line in lines:
        print(line, file=sys.stderr, flush=True)
