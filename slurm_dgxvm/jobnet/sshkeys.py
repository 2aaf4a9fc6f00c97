"""The SSH keys a multi-node job's VMs reach each other with (``mpirun`` from the first VM).

Every node's Prolog must give the job's VMs the same user key pair and know every other VM's
host key, without asking another node (no RPC on the way to a VM). So the keys are derived, not
made: each is an Ed25519 key whose 32-byte seed is HMAC-SHA256 of the site's secret
(``[jobnet] ssh_secret``, the same root-only file on every GPU node, like munge's key) over a
label, the job id and, for a host key, the node's index in the job::

    user key of job J             HMAC(secret, "dgxvm-job-ssh-user\\0J")
    host key of node i of job J   HMAC(secret, "dgxvm-job-ssh-host\\0J\\0i")

Who can have them: the job's VMs (the job's user, root in its own VMs, gets the user key and
its VM's host key through the seed) and root on the nodes. No other user can obtain one (the
seed ISO and the VM's directory are root's) or derive one (HMAC without the secret: another job
id gives an unrelated key). A job's user who knows its own keys learns nothing of another job's.

The secret is refused (ConfigError: the node's fault) when it is shorter than 32 bytes or when
anyone but root may read or write it: a secret a user could read would let them derive every
job's keys. A missing file turns the keys off (the fabric still works; ``mpirun`` then needs
its own way in).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass

from ..errors import ConfigError

SECRET_MIN_BYTES = 32
_USER_LABEL = b"dgxvm-job-ssh-user\0"
_HOST_LABEL = b"dgxvm-job-ssh-host\0"


@dataclass(frozen=True)
class KeyPair:
    private: str          # OpenSSH private key text
    public: str           # "ssh-ed25519 AAAA... comment"


def read_secret(path: str) -> bytes | None:
    """The site secret at ``path``; None when ``path`` is "" or the file does not exist.
    Raises ConfigError naming the file when it is not root's alone or too short."""
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"[jobnet] ssh_secret {path}: cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"[jobnet] ssh_secret {path}: not a regular file")
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise ConfigError(f"[jobnet] ssh_secret {path}: must be root's alone (mode 0600 or "
                              f"0400, owner root), is mode {stat.S_IMODE(st.st_mode):04o} "
                              f"owner uid {st.st_uid}: anyone who reads it can derive every "
                              f"job's keys")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    if len(data) < SECRET_MIN_BYTES:
        raise ConfigError(f"[jobnet] ssh_secret {path}: {len(data)} bytes, at least "
                          f"{SECRET_MIN_BYTES} needed (e.g. `head -c 64 /dev/urandom`)")
    return data


def _pair(seed: bytes, comment: str) -> KeyPair:
    # cryptography: a well-kept Ed25519 and OpenSSH serialisation, rather than our own
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.from_private_bytes(seed)
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                ser.NoEncryption()).decode()
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                           ser.PublicFormat.OpenSSH).decode()
    return KeyPair(private=private, public=f"{public} {comment}")


def user_key(secret: bytes, job_id: int) -> KeyPair:
    """The job's user key: in every VM of the job, authorized in every VM of the job."""
    seed = hmac.new(secret, _USER_LABEL + str(job_id).encode(), hashlib.sha256).digest()
    return _pair(seed, f"job-{job_id}")


def host_key(secret: bytes, job_id: int, index: int) -> KeyPair:
    """The host key of the VM on the job's ``index``-th node."""
    seed = hmac.new(secret, _HOST_LABEL + f"{job_id}\0{index}".encode(),
                    hashlib.sha256).digest()
    return _pair(seed, f"job-{job_id}-node-{index}")


def known_hosts(secret: bytes, job_id: int, hosts: tuple[tuple[str, str], ...]) -> str:
    """known_hosts lines for every node of the job, one for its name and one for its fabric
    address (``hosts``: (node name, fabric address) in node order, as JobFabric.hosts). Not
    ``name,address`` on one line: dropbear's client reads one host per line."""
    lines = []
    for index, (name, address) in enumerate(hosts):
        pub = host_key(secret, job_id, index).public.rsplit(" ", 1)[0]
        lines += [f"{name} {pub}\n", f"{address} {pub}\n"]
    return "".join(lines)
