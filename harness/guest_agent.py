"""Root in a test guest, through its QEMU guest agent (qemu-ga runs as root in the guest):
how the tests play the job's user who has sudo in their VM."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

import libvirt
import libvirt_qemu


@dataclass(frozen=True)
class Exec:
    code: int
    out: str
    err: str


def _agent(dom, cmd: dict, timeout: int = 10) -> dict:
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), timeout, 0))["return"]


def guest_exec(dom, script: str, *, timeout: float = 60.0) -> Exec:
    """Run ``sh -c script`` as root in the guest; its exit code and output."""
    pid = _agent(dom, {"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", script], "capture-output": True}})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        st = _agent(dom, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if st.get("exited"):
            return Exec(code=st.get("exitcode", -1),
                        out=base64.b64decode(st.get("out-data", "")).decode(errors="replace"),
                        err=base64.b64decode(st.get("err-data", "")).decode(errors="replace"))
        if time.monotonic() > deadline:
            raise TimeoutError(f"guest-exec {script!r} still running after {timeout}s")
        time.sleep(0.2)


def domain(uri: str, name: str):
    conn = libvirt.open(uri)
    return conn, conn.lookupByName(name)
