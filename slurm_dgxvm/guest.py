"""The guest, seen from the host: readiness through the QEMU guest agent, and the serial console
log that explains a guest that never became ready.

Readiness is "the guest agent answers guest-ping". The test guest starts qemu-ga last, after it
applied its NoCloud seed and started sshd, so ready means reachable by the job's user.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import hypervisor
from .errors import GuestTimeout

POLL_S = 0.25
TAIL_LINES = 15


def console_tail(path: str | Path, lines: int = TAIL_LINES) -> str:
    try:
        data = Path(path).read_bytes()[-16384:]
    except OSError as exc:
        return f"(no console log: {exc.strerror or exc})"
    text = data.decode("utf-8", "replace").replace("\r", "")
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join("  | " + line for line in tail) or "  | (empty)"


def wait_ready(dom, *, name: str, timeout_s: float, console_log: str | Path) -> float:
    """Block until the guest agent of ``dom`` answers; return the seconds waited.

    Raises GuestTimeout (with the console tail) when ``timeout_s`` passes, or at once when the
    VM stops meanwhile (it crashed or powered off).
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        if not hypervisor.is_active(dom):
            raise GuestTimeout(name=name, timeout=time.monotonic() - t0,
                               reason="the VM stopped while booting",
                               tail=console_tail(console_log))
        if hypervisor.agent_ping(dom):
            return time.monotonic() - t0
        if time.monotonic() >= deadline:
            raise GuestTimeout(name=name, timeout=timeout_s,
                               reason="the QEMU guest agent never answered",
                               tail=console_tail(console_log))
        time.sleep(POLL_S)
