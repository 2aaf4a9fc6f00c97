"""The guest, seen from the host: readiness through the QEMU guest agent, and the serial console
log that explains a guest that never became ready.

Readiness is "the guest agent answers guest-ping" and, in a guest with cloud-init, "cloud-init's
init stages are done without errors". The test guest starts qemu-ga last, after it applied its
NoCloud seed and started sshd, so ready means reachable by the job's user. A cloud-init image
applies the seed in cloud-init's init stage (the user, its key, the pinned host key, the shares,
the dgxvm-guest helper), which a site's image may not order before its agent: the host reads
cloud-init's own status (``/run/cloud-init/status.json``, through the agent) and waits for it,
and a stage that failed fails the VM with cloud-init's errors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import hypervisor
from ..errors import BootCancelled, GuestTimeout

POLL_S = 0.25
TAIL_LINES = 15
CLOUD_INIT = "/usr/bin/cloud-init"
CLOUD_INIT_STATUS = "/run/cloud-init/status.json"
CLOUD_INIT_STAGES = ("init-local", "init")   # where dgxvm's seed is applied


def cloud_init_verdict(status: bytes | None) -> tuple[str, str]:
    """From cloud-init's ``status.json`` (None: not written yet): ``("done", "")`` once its init
    stages finished without errors, ``("failed", errors)`` when one reported errors, else
    ``("pending", what it waits for)`` (a file half written reads as pending)."""
    if status is None:
        return "pending", f"no {CLOUD_INIT_STATUS} yet"
    try:
        v1 = json.loads(status.decode("utf-8", "replace"))["v1"]
        stages = {name: v1[name] for name in CLOUD_INIT_STAGES}
    except (ValueError, KeyError, TypeError):
        return "pending", f"{CLOUD_INIT_STATUS} not readable yet"
    errors = [f"{name}: {err}" for name, stage in stages.items()
              for err in (stage or {}).get("errors") or ()]
    if errors:
        return "failed", "; ".join(str(e) for e in errors)[:2000]
    waiting = [name for name, stage in stages.items() if not (stage or {}).get("finished")]
    if waiting:
        return "pending", f"cloud-init's {', '.join(waiting)} stage not finished"
    return "done", ""


def console_tail(path: str | Path, lines: int = TAIL_LINES) -> str:
    try:
        data = Path(path).read_bytes()[-16384:]
    except OSError as exc:
        return f"(no console log: {exc.strerror or exc})"
    text = data.decode("utf-8", "replace").replace("\r", "")
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join("  | " + line for line in tail) or "  | (empty)"


def wait_ready(dom, *, name: str, timeout_s: float, console_log: str | Path,
               readiness: str = "auto", cancelled=None) -> float:
    """Block until the guest agent of ``dom`` answers and, in a guest with cloud-init, its init
    stages are done; return the seconds waited. ``readiness`` is the image profile's: ``auto``
    (cloud-init's stages when the guest has cloud-init), ``agent`` (the agent alone),
    ``cloud-init`` (its stages always: a guest without cloud-init never becomes ready).

    Raises GuestTimeout (with the console tail) when ``timeout_s`` passes, at once when the VM
    stops meanwhile (it crashed or powered off), and at once with cloud-init's own errors when
    its init stages report any (the seed was not applied as asked). ``cancelled()``, asked
    before each poll, returns why the boot is no longer wanted (BootCancelled) or None.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        why = cancelled() if cancelled is not None else None
        if why:
            raise BootCancelled(name=name, reason=why)
        if not hypervisor.is_active(dom):
            raise GuestTimeout(name=name, timeout=time.monotonic() - t0,
                               reason="the VM stopped while booting",
                               tail=console_tail(console_log))
        if hypervisor.agent_ping(dom):
            state, detail = ("none", "") if readiness == "agent" else _cloud_init(dom)
            if state == "none" and readiness == "cloud-init":
                state = "pending"
                detail = f"the image's profile says cloud-init, but the guest has no {CLOUD_INIT}"

            if state in ("none", "done"):
                return time.monotonic() - t0
            if state == "failed":
                raise GuestTimeout(name=name, timeout=time.monotonic() - t0,
                                   reason=f"cloud-init reported errors applying the seed: "
                                          f"{detail}", tail=console_tail(console_log))
            if time.monotonic() >= deadline:
                raise GuestTimeout(name=name, timeout=timeout_s, reason=detail,
                                   tail=console_tail(console_log))
        if time.monotonic() >= deadline:
            raise GuestTimeout(name=name, timeout=timeout_s,
                               reason="the QEMU guest agent never answered",
                               tail=console_tail(console_log))
        time.sleep(POLL_S)


def _cloud_init(dom) -> tuple[str, str]:
    """``("none", "")`` in a guest without cloud-init (the test guest), else
    :func:`cloud_init_verdict` of its status file."""
    if hypervisor.agent_read_file(dom, CLOUD_INIT, max_bytes=1) is None:
        return "none", ""
    return cloud_init_verdict(hypervisor.agent_read_file(dom, CLOUD_INIT_STATUS))
