"""A share added to a running VM (a warm VM's claim): its virtiofsd started by dgxvm, served as
the job's user exactly as at a cold start, and its device plugged into the domain.

libvirt 9.0 (Debian 12) cannot hot-plug a ``<filesystem>`` whose virtiofsd it starts itself
(libvirtd dies in the attach, seen here), but it plugs one whose virtiofsd runs already:
``<source socket=PATH/>``. So dgxvm does what libvirt does at a cold start:

1. a listening Unix socket in the VM's directory, owned by the user QEMU runs as (read from
   the VM's overlay, which libvirt gave to that user when it started the domain), mode 0600;
2. the share's wrapper (:mod:`.virtiofsd`: the directory opened again as the job's user and
   compared with the check, a user namespace, the seccomp filter) started with ``--fd=N``,
   in a session of its own; our copy of the socket is closed at once, so a wrapper that
   refuses the share leaves nobody listening and the attach fails at once instead of waiting;
3. ``attachDeviceFlags`` of the filesystem, live.

virtiofsd ends when QEMU closes the connection (the domain is destroyed). :func:`stop` ends a
hot-plugged virtiofsd that is still running (a claim undone before the attach, a QEMU that did
not die), by the PID the start wrote and only while that PID is still the wrapper's process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

from ..errors import HypervisorError, ShareRefused
from .virtiofsd import REFUSED_PREFIX, error_file_of

PID_SUFFIX = ".pid"                 # share.json -> share.pid: the hot-plugged virtiofsd
SOCKET_SUFFIX = ".sock"             # share.json -> share.sock
LOG_SUFFIX = ".log"
STOP_WAIT_S = 5.0


def socket_of(spec_path: Path) -> Path:
    return Path(spec_path).with_suffix(SOCKET_SUFFIX)


def filesystem_xml(sock: Path, tag: str, bus: int | None = None) -> str:
    where = f"<address type='pci' domain='0x0000' bus='{bus:#04x}' slot='0x00' " \
            "function='0x0'/>" if bus is not None else ""
    return ("<filesystem type='mount'><driver type='virtiofs' queue='1024'/>"
            f"<source socket={quoteattr(str(sock))}/><target dir={quoteattr(tag)}/>{where}"
            "</filesystem>")


def free_root_port(domain_xml: str) -> int | None:
    """The index of a pcie-root-port of the running domain that holds no device (the warm VM's
    spare ports, :data:`slurm_dgxvm.design.designer.SPARE_ROOT_PORTS`), or None."""
    import xml.etree.ElementTree as ET
    root = ET.fromstring(domain_xml)
    ports = [int(c.get("index")) for c in root.iter("controller")
             if c.get("type") == "pci" and c.get("model") == "pcie-root-port"
             and c.get("index") is not None]
    used = set()
    for dev in root.find("devices") or ():
        if dev.tag == "controller" and dev.get("model") == "pcie-root-port":
            continue
        for addr in dev.iter("address"):
            if addr.get("type") == "pci" and addr.get("bus") is not None:
                used.add(int(addr.get("bus"), 0))
    # a root port is a bus of its own: a port's address names the bus it plugs into
    for c in root.iter("controller"):
        if c.get("model") == "pcie-root-port":
            continue
        for addr in c.iter("address"):
            if addr.get("bus") is not None:
                used.add(int(addr.get("bus"), 0))
    free = [i for i in ports if i not in used]
    return min(free) if free else None


def plug(dom, *, qemu_owner: Path, spec_path: Path, wrapper: Path, source: str, tag: str,
         what: str) -> int:
    """Serve the share ``spec_path`` (its wrapper ``wrapper``) to the running ``dom`` under
    ``tag``; returns the wrapper's PID. ``qemu_owner``: a file QEMU opened (the overlay), whose
    owner is the user QEMU runs as. Raises ShareRefused (the wrapper refused the directory:
    the job's fault), HypervisorError (libvirt refused the device)."""
    import libvirt

    spec_path = Path(spec_path)
    st = os.stat(qemu_owner)
    sock_path = socket_of(spec_path)
    sock_path.unlink(missing_ok=True)
    error_file_of(spec_path).unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(sock_path))
        os.chmod(sock_path, 0o600)
        os.chown(sock_path, st.st_uid, st.st_gid)
        listener.listen(1)
        fd = listener.fileno()
        with open(spec_path.with_suffix(LOG_SUFFIX), "ab") as log:
            proc = subprocess.Popen(
                [str(wrapper), f"--fd={fd}", "-o", f"source={source}"], pass_fds=(fd,),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    finally:
        listener.close()                 # the wrapper holds the only listening copy now
    spec_path.with_suffix(PID_SUFFIX).write_text(f"{proc.pid}\n")
    try:
        bus = free_root_port(dom.XMLDesc(0))
        dom.attachDeviceFlags(filesystem_xml(sock_path, tag, bus), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        _raise_refusal(spec_path, proc)
        stop(spec_path)
        raise HypervisorError(uri="qemu", reason=f"{what}: plug the share {tag}: {exc}") from None
    if proc.poll() is not None:          # attached, then the wrapper died: nobody serves it
        _raise_refusal(spec_path, proc)
        raise HypervisorError(uri="qemu", reason=f"{what}: the share {tag}'s virtiofsd exited "
                                                 f"with status {proc.returncode}")
    return proc.pid


def _raise_refusal(spec_path: Path, proc: subprocess.Popen) -> None:
    """The wrapper's own refusal (a directory swapped since the check), when it wrote one."""
    try:
        proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        return
    try:
        line = error_file_of(spec_path).read_text().strip()
    except OSError:
        return
    if line.startswith(REFUSED_PREFIX):
        stop(spec_path)
        raise ShareRefused(value=str(spec_path), reason=line[len(REFUSED_PREFIX):])


def _is_ours(pid: int, spec_path: Path) -> bool:
    """Whether ``pid`` is still the process started for ``spec_path``: the wrapper (its
    arguments name the spec) or the virtiofsd it became, a session leader (started in a session
    of its own) with the socket's ``--fd``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        session = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return False
    if any(str(spec_path).encode() in a for a in argv):
        return True
    return session == pid and argv[0].endswith(b"virtiofsd") \
        and any(a.startswith(b"--fd=") for a in argv)


def stop(spec_path: Path) -> None:
    """End the hot-plugged virtiofsd of ``spec_path`` if it still runs; idempotent."""
    pid_file = Path(spec_path).with_suffix(PID_SUFFIX)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    if pid > 1 and _is_ours(pid, Path(spec_path)):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + STOP_WAIT_S
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if not _alive(pid):
                break
    pid_file.unlink(missing_ok=True)
    socket_of(spec_path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)      # our own child: reap it
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
