"""The test guest (guest-image/), booted for real under QEMU/TCG with a seed from slurm_dgxvm.seed.

No libvirt here: raw ``qemu-system-x86_64`` with the same devices a dgxvm domain has (virtio
disks, the seed as a read-only virtio disk, a virtio-serial guest agent port, user-mode network
forwarding a loopback port to the guest's sshd, a 9p share). Checks the seed contract end to end:
the agent answers only once the guest is set up; ssh as the seed's user with the pinned host key;
uid, hostname and the share; runc and umoci run; the agent's guest-shutdown powers the VM off.

The guest is built (or reused from the cache) by ``guest-image/build``; the cache directory is
``$DGXVM_TEST_GUEST_CACHE`` or the script's default, /var/cache/dgxvm/test-guest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from harness.ssh import ssh_argv
from slurm_dgxvm.seed import Mount, SeedSpec, generate_keypair, write_seed

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "guest-image" / "build"
AGENT_DEADLINE = float(os.environ.get("DGXVM_TEST_AGENT_DEADLINE", "120"))
POWEROFF_DEADLINE = 60.0
USER, UID, GID = "alice", 4242, 4242
HOSTNAME = "dgxvm-test-vm0"


@pytest.fixture(scope="module")
def guest() -> Path:
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh", "xorriso", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (scripts/bootstrap installs it)")
    cmd = [str(BUILD)]
    if os.environ.get("DGXVM_TEST_GUEST_CACHE"):
        cmd += ["--out", os.environ["DGXVM_TEST_GUEST_CACHE"]]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"guest-image/build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = Path(proc.stdout.strip().splitlines()[-1])
    print(f"\nguest image {out} ready in {time.monotonic() - t0:.1f}s")
    assert (out / ".complete").is_file()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """A QEMU guest agent client on the chardev's unix socket (one JSON object per line)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.buf = b""

    def _send(self, obj: dict) -> None:
        assert self.sock is not None
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def _read(self, timeout: float) -> dict:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                try:
                    return json.loads(line.strip(b"\xff \r"))
                except ValueError:
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the guest agent")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("guest agent socket closed")
            self.buf += data

    def sync(self, timeout: float = 3.0) -> None:
        """guest-sync with a fresh id; stale answers from earlier attempts are skipped."""
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(str(self.path))
        token = random.randrange(1, 2**31)
        self._send({"execute": "guest-sync", "arguments": {"id": token}})
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(max(0.01, deadline - time.monotonic()))
            if reply.get("return") == token:
                return

    def call(self, command: str, timeout: float = 10.0) -> dict:
        self._send({"execute": command})
        reply = self._read(timeout)
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    def send(self, command: str) -> None:
        """A command that answers nothing on success (guest-shutdown)."""
        self._send({"execute": command})


def serial_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no serial log)"


def test_guest_boots_applies_seed_and_powers_off(guest, tmp_path):
    manifest = json.loads((guest / "manifest.json").read_text())
    assert manifest["name"] == "dgxvm-test-guest"
    assert manifest["version"] == guest.name and len(guest.name) == 12
    assert manifest["format"] == "qcow2"
    for key in ("kernel", "initrd", "disk"):
        assert (guest / manifest[key]).is_file()
    for pkg in ("busybox-static", "dropbear-bin", "qemu-guest-agent", "runc", "umoci",
                "linux-image-amd64", "libc6"):
        assert pkg in manifest["packages"]

    # keys and seed
    user_pub = generate_keypair(tmp_path / "id_alice", "alice@test")
    host_pub = generate_keypair(tmp_path / "host_key", f"{HOSTNAME} host key")
    share = tmp_path / "share"
    share.mkdir()
    share.chmod(0o777)  # 9p passthrough: the guest kernel checks the host's modes for alice
    (share / "hello").write_text("written on the host\n")
    spec = SeedSpec(
        instance_id="test-vm0", hostname=HOSTNAME, user_name=USER, uid=UID, gid=GID,
        home=f"/home/{USER}", authorized_keys=(user_pub,),
        host_key_private=(tmp_path / "host_key").read_text(), host_key_public=host_pub,
        mounts=(Mount("share0", str(share), "9p"),))
    seed = write_seed(spec, tmp_path / "seed.iso", name="test-vm0")

    overlay = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(guest / manifest["disk"]), str(overlay)], check=True)
    serial = tmp_path / "serial.log"
    agent_sock = tmp_path / "qga.sock"
    port = free_port()
    cmd = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "512", "-smp", "1",
        "-nographic", "-monitor", "none", "-serial", f"file:{serial}",
        "-kernel", str(guest / manifest["kernel"]), "-initrd", str(guest / manifest["initrd"]),
        "-append", manifest["cmdline"],
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
        "-device", "virtio-serial",
        "-chardev", f"socket,id=qga0,path={agent_sock},server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-virtfs", f"local,path={share},mount_tag=share0,security_model=passthrough,id=fs0",
    ]
    qemu_log = open(tmp_path / "qemu.log", "w")
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qemu_log,
                            stderr=subprocess.STDOUT)
    agent = Agent(agent_sock)
    t0 = time.monotonic()
    try:
        # 1. the agent answers (it starts last: seed applied, sshd up)
        while True:
            if qemu.poll() is not None:
                pytest.fail(f"qemu exited ({qemu.returncode}) before the guest agent answered:\n"
                            f"{(tmp_path / 'qemu.log').read_text()}\n{serial_tail(serial)}")
            try:
                agent.sync()
                agent.call("guest-ping")
                break
            except (OSError, TimeoutError, ConnectionError):
                agent.close()
            if time.monotonic() - t0 > AGENT_DEADLINE:
                pytest.fail(f"guest agent not answering after {AGENT_DEADLINE:g}s; serial "
                            f"console:\n{serial_tail(serial)}")
            time.sleep(1)
        ready_s = time.monotonic() - t0
        print(f"\nboot to guest agent ready: {ready_s:.1f}s (TCG)")
        console = serial.read_text(errors="replace")
        assert "dgxvm-guest: seed applied" in console
        assert "dgxvm-guest: ready" in console
        assert "dgxvm-guest: ERROR" not in console

        # 2. ssh as the seed's user, the guest's host key pinned
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}\n")

        def ssh(command: str, known: Path = known_hosts) -> subprocess.CompletedProcess:
            return subprocess.run(
                ssh_argv(tmp_path / "id_alice", known, f"{USER}@127.0.0.1", command,
                         connect_timeout=30,
                         options=["-F", "/dev/null", "-o", "IdentitiesOnly=yes",
                                  "-o", "LogLevel=ERROR", "-p", str(port)]),
                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

        res = ssh(f"id -u; id -g; hostname; cat {share}/hello; "
                  f"echo written in the guest > {share}/from-guest")
        assert res.returncode == 0, f"ssh failed: {res.stderr}\n{serial_tail(serial)}"
        assert res.stdout.splitlines() == [str(UID), str(GID), HOSTNAME, "written on the host"]
        from_guest = share / "from-guest"
        assert from_guest.read_text() == "written in the guest\n"
        assert from_guest.stat().st_uid == UID  # passthrough: the guest user's uid on the host

        res = ssh("runc --version && umoci --version")
        assert res.returncode == 0, res.stderr
        assert "runc version" in res.stdout and "umoci version" in res.stdout

        # a different pinned key is refused: the pin is what ssh checks
        other = generate_keypair(tmp_path / "other_host_key", "other")
        wrong = tmp_path / "known_hosts.wrong"
        wrong.write_text(f"[127.0.0.1]:{port} {other}\n")
        res = ssh("true", known=wrong)
        assert res.returncode != 0
        assert "HOST IDENTIFICATION HAS CHANGED" in res.stderr or \
            "verification failed" in res.stderr, res.stderr

        # 3. guest-shutdown through the agent powers the VM off: qemu exits by itself
        agent.send("guest-shutdown")
        t1 = time.monotonic()
        try:
            rc = qemu.wait(timeout=POWEROFF_DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"qemu still running {POWEROFF_DEADLINE:g}s after guest-shutdown:\n"
                        f"{serial_tail(serial)}")
        print(f"guest-shutdown to qemu exit: {time.monotonic() - t1:.1f}s")
        assert rc == 0
        console = serial.read_text(errors="replace")
        assert "dgxvm-guest: shutdown requested (poweroff" in console
        assert "dgxvm-guest: stopped" in console
    finally:
        agent.close()
        if qemu.poll() is None:
            qemu.kill()  # by its PID (Popen), never by name
            qemu.wait(timeout=30)
        qemu_log.close()
