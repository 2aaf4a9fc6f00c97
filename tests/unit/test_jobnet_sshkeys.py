"""The job's inter-VM SSH keys: the same on every node, unrelated across jobs, and never from a
secret that anyone but root could read."""

from __future__ import annotations

import os
import subprocess

import pytest

from slurm_dgxvm.errors import ConfigError
from slurm_dgxvm.jobnet import sshkeys

SECRET = bytes(range(64))


def public_of(private: str, tmp_path) -> str:
    """What ssh-keygen says the public half of ``private`` is: the key is a real OpenSSH key."""
    path = tmp_path / "k"
    path.write_text(private)
    path.chmod(0o600)
    return subprocess.run(["ssh-keygen", "-y", "-f", str(path)], check=True,
                          capture_output=True, text=True).stdout.split()[1]


def test_every_node_derives_the_same_keys_and_another_job_gets_others(tmp_path):
    a, b = sshkeys.user_key(SECRET, 42), sshkeys.user_key(SECRET, 42)
    assert a.public == b.public and a.public.endswith(" job-42")
    assert public_of(a.private, tmp_path) == a.public.split()[1]
    assert sshkeys.user_key(SECRET, 43).public != a.public
    assert sshkeys.user_key(b"x" * 64, 42).public != a.public
    hosts = {sshkeys.host_key(SECRET, 42, i).public.split()[1] for i in range(3)}
    assert len(hosts) == 3 and a.public.split()[1] not in hosts
    host1 = sshkeys.host_key(SECRET, 42, 1)
    assert public_of(host1.private, tmp_path) == host1.public.split()[1]


def test_known_hosts_names_each_node_and_its_fabric_address():
    lines = sshkeys.known_hosts(SECRET, 42, (("dgxa", "10.64.0.10"), ("dgxb", "10.64.0.11")))
    key0 = " ".join(sshkeys.host_key(SECRET, 42, 0).public.split()[:2])
    key1 = " ".join(sshkeys.host_key(SECRET, 42, 1).public.split()[:2])
    assert lines.splitlines() == [f"dgxa {key0}", f"10.64.0.10 {key0}", f"dgxb {key1}",
                                  f"10.64.0.11 {key1}"]


def test_a_secret_only_root_may_read_is_used_and_any_other_is_refused(tmp_path):
    path = tmp_path / "secret"
    assert sshkeys.read_secret(str(path)) is None          # none: no keys, not an error
    assert sshkeys.read_secret("") is None
    path.write_bytes(SECRET)
    path.chmod(0o600)
    assert sshkeys.read_secret(str(path)) == SECRET
    for mode in (0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(ConfigError, match=f"must be root's alone.*mode {mode:04o}"):
            sshkeys.read_secret(str(path))
    path.chmod(0o600)
    os.chown(path, 1000, 0)
    with pytest.raises(ConfigError, match="owner uid 1000"):
        sshkeys.read_secret(str(path))
    os.chown(path, 0, 0)
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="5 bytes, at least 32"):
        sshkeys.read_secret(str(path))
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        sshkeys.read_secret(str(link))
