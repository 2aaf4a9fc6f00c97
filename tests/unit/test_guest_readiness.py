"""guest.wait_ready's reading of cloud-init's own status: a cloud-init guest is ready only once
the init stages that apply dgxvm's seed are done, and one whose stage failed fails with
cloud-init's errors, not with an ssh error minutes later. The guest agent is the real thing in
tests/integration/test_debian_cloud_guest.py; here the verdict over status.json as cloud-init
22.4 writes it, and wait_ready over a stand-in agent."""

from __future__ import annotations

import json

import pytest

from slurm_dgxvm.virt import guest
from slurm_dgxvm.errors import GuestTimeout


def status(init_local=(1.0, []), init=(2.0, []), **extra) -> bytes:
    def stage(v):
        return None if v is None else {"finished": v[0], "errors": v[1], "start": 0.5}
    return json.dumps({"v1": {"datasource": "DataSourceNoCloud [seed=/dev/vdb]",
                              "init-local": stage(init_local), "init": stage(init),
                              "modules-config": {"finished": None, "errors": []},
                              "modules-final": {"finished": None, "errors": []},
                              "stage": None, **extra}}).encode()


@pytest.mark.parametrize("text, verdict", [
    (status(), "done"),                                   # config/final stages may still run
    (status(init=(None, [])), "pending"),
    (status(init=None), "pending"),
    (None, "pending"),                                    # not written yet
    (b'{"v1": {"init-lo', "pending"),                     # half written
    (b"[]", "pending"),
    (status(init=(2.0, ["('users_groups', OSError('useradd failed'))"])), "failed"),
    (status(init_local=(None, ["no seed"]), init=(None, [])), "failed"),
])
def test_cloud_init_verdict(text, verdict):
    got, detail = guest.cloud_init_verdict(text)
    assert got == verdict
    if verdict == "failed":
        assert "useradd failed" in detail or "no seed" in detail


class Agent:
    """A stand-in for the guest agent: answers ping, and files by path."""

    def __init__(self, files):
        self.files = files
        self.reads = 0

    def read(self, dom, path, max_bytes=1 << 20):
        self.reads += 1
        value = self.files.get(path)
        return value(self.reads) if callable(value) else value


@pytest.fixture
def agent(monkeypatch):
    def make(files):
        a = Agent(files)
        monkeypatch.setattr(guest.hypervisor, "agent_ping", lambda dom: True)
        monkeypatch.setattr(guest.hypervisor, "is_active", lambda dom: True)
        monkeypatch.setattr(guest.hypervisor, "agent_read_file", a.read)
        monkeypatch.setattr(guest, "POLL_S", 0.001)
        return a
    return make


def test_a_guest_without_cloud_init_is_ready_when_its_agent_answers(agent, tmp_path):
    agent({})
    assert guest.wait_ready(object(), name="vm", timeout_s=5, console_log=tmp_path / "c") >= 0


def test_a_cloud_init_guest_waits_for_its_init_stage(agent, tmp_path):
    # the agent answers before cloud-init's init stage finished (a site's image that does not
    # order its agent after cloud-init): not ready until status.json says so
    a = agent({guest.CLOUD_INIT: b"\x7f",
               guest.CLOUD_INIT_STATUS: lambda n: status(init=(None, [])) if n < 12
               else status()})
    guest.wait_ready(object(), name="vm", timeout_s=5, console_log=tmp_path / "c")
    assert a.reads >= 12


def test_a_cloud_init_error_fails_the_vm_with_cloud_inits_words(agent, tmp_path):
    (tmp_path / "c").write_text("cloud-init[287]: ... users_groups failed\n")
    agent({guest.CLOUD_INIT: b"\x7f",
           guest.CLOUD_INIT_STATUS: status(init=(2.0, ["('users_groups', 'useradd: bad')"]))})
    with pytest.raises(GuestTimeout) as e:
        guest.wait_ready(object(), name="vm", timeout_s=5, console_log=tmp_path / "c")
    assert "cloud-init reported errors applying the seed" in str(e.value)
    assert "useradd: bad" in str(e.value) and "users_groups failed" in str(e.value)


def test_a_cloud_init_stage_that_never_finishes_times_out_saying_so(agent, tmp_path):
    agent({guest.CLOUD_INIT: b"\x7f", guest.CLOUD_INIT_STATUS: status(init=(None, []))})
    with pytest.raises(GuestTimeout) as e:
        guest.wait_ready(object(), name="vm", timeout_s=0.2, console_log=tmp_path / "c")
    assert "init stage not finished" in str(e.value)


# -- the image profile's readiness ------------------------------------------------------------
def test_readiness_agent_does_not_wait_for_cloud_init(agent, tmp_path):
    a = agent({guest.CLOUD_INIT: b"\x7f", guest.CLOUD_INIT_STATUS: status(init=(None, []))})
    guest.wait_ready(object(), name="vm", timeout_s=0.5, console_log=tmp_path / "c",
                     readiness="agent")
    assert a.reads == 0                  # cloud-init's status was never looked at


def test_readiness_cloud_init_in_a_guest_without_it_never_becomes_ready_and_says_why(
        agent, tmp_path):
    agent({})
    with pytest.raises(GuestTimeout) as e:
        guest.wait_ready(object(), name="vm", timeout_s=0.2, console_log=tmp_path / "c",
                         readiness="cloud-init")
    assert "profile says cloud-init, but the guest has no /usr/bin/cloud-init" in str(e.value)


def test_a_boot_no_longer_wanted_stops_waiting_at_once_saying_why(agent, tmp_path, monkeypatch):
    """A warm VM still booting that a job needs: the wait ends at the next poll, BootCancelled
    with the reason, and never reads the guest again."""
    from slurm_dgxvm.errors import BootCancelled
    a = agent({guest.CLOUD_INIT: b"\x7f", guest.CLOUD_INIT_STATUS: status(init=(None, []))})
    asked = []

    def cancelled():
        asked.append(1)
        return "a job needs its devices" if len(asked) > 3 else None
    with pytest.raises(BootCancelled, match=r"^vm vm: boot cancelled: a job needs its devices$"):
        guest.wait_ready(object(), name="vm", timeout_s=30, console_log=tmp_path / "c",
                         cancelled=cancelled)
    reads = a.reads
    assert len(asked) == 4 and reads > 0
