"""hypervisor's network lock: concurrent dgxvm processes serialise network changes through
``<state_dir>/network.lock``; one held too long is a named state error (exit 5), never a
traceback."""

from __future__ import annotations

import filelock
import libvirt
import pytest

from slurm_dgxvm import hypervisor
from slurm_dgxvm.errors import EXIT_STATE, LockError, LockTimeout


def test_a_network_lock_held_too_long_is_a_lock_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(hypervisor, "NETWORK_LOCK_TIMEOUT_S", 0.2)
    conn = libvirt.open("test:///default")
    try:
        with filelock.FileLock(str(tmp_path / "network.lock")), \
                pytest.raises(LockTimeout) as info:
            hypervisor.release_address(conn, "default", str(tmp_path), "52:54:00:00:00:01")
        assert str(info.value) == f"lock {tmp_path}/network.lock: not acquired within 0.2s"
        assert info.value.exit_code == EXIT_STATE
        with hypervisor._network_lock(str(tmp_path)):       # free again
            pass
    finally:
        conn.close()


def test_a_network_lock_that_cannot_be_made_is_a_lock_error(tmp_path):
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")
    with pytest.raises(LockError, match=r"network.lock: cannot lock") as info, \
            hypervisor._network_lock(str(not_a_dir)):
        pass
    assert info.value.exit_code == EXIT_STATE
