"""ibpart against UFM's REST API, through tools/ufm-standin: the exact calls for a job's create
and delete, and a failing or unreachable UFM as an error naming the call."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm import ibpart
from slurm_dgxvm.errors import IbPartitionError
from slurm_dgxvm.placement import EMPTY, Policy, Request, place

STANDIN = Path(__file__).resolve().parents[2] / "tools" / "ufm-standin" / "ufm-standin"
pytestmark = pytest.mark.parametrize("machine", ["dgx-h100"])


class Ufm:
    def __init__(self, tmp: Path, *fail: str):
        self.log = tmp / "calls.jsonl"
        port_file = tmp / "port"
        argv = [sys.executable, str(STANDIN), "--port-file", str(port_file), "--log",
                str(self.log), "--user", "dgxvm", "--password", "s3cret"]
        for f in fail:
            argv += ["--fail", f]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "stand-in died"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc.stderr.close()


@pytest.fixture
def creds(tmp_path):
    path = tmp_path / "ufm-credentials"
    path.write_text("dgxvm:s3cret\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def ufm(tmp_path):
    u = Ufm(tmp_path)
    yield u
    u.stop()


def cfg_for(url, creds, tmp_path):
    return config_mod.from_dict({"host": {"state_dir": str(tmp_path / "state")},
                                 "ib": {"backend": "ufm", "url": url,
                                        "credentials_file": str(creds), "timeout_s": 5}})


@pytest.fixture
def plan(host):
    return ibpart.plan_for(42, place(host, EMPTY, Request(count=2, ib="vf"), Policy()), host)


def test_create_sets_the_vf_guids_then_adds_them_to_the_jobs_key(ufm, creds, plan, tmp_path,
                                                                 machine):
    ran = []
    ibpart.apply(plan, cfg_for(ufm.url, creds, tmp_path),
                 run=lambda argv, timeout, pkey: ran.append(argv))
    assert ran == list(plan.guid_commands()) and len(ran) == 4
    assert ufm.calls() == [{
        "method": "POST", "path": "/ufmRest/resources/pkeys", "user": "dgxvm", "status": 200,
        "body": {"pkey": "0x102a", "guids": ["02f60300001800" + "00", "02f60300004f00" + "00"],
                 "membership": "full", "index0": True, "ip_over_ib": True}}]


def test_delete_removes_exactly_the_jobs_guids(ufm, creds, plan, tmp_path, machine):
    cfg = cfg_for(ufm.url, creds, tmp_path)
    ibpart.apply(plan, cfg, run=lambda *a: None)
    ibpart.remove(plan, cfg)
    assert ufm.calls()[1:] == [{
        "method": "POST", "path": "/ufmRest/actions/remove_guids_from_pkey", "user": "dgxvm",
        "status": 200,
        "body": {"pkey": "0x102a", "guids": ["02f60300001800" + "00", "02f60300004f00" + "00"]}}]


def test_a_failing_ufm_is_an_error_naming_the_call_and_its_answer(creds, plan, tmp_path,
                                                                  machine):
    u = Ufm(tmp_path, "POST /ufmRest/resources/pkeys=500")
    try:
        with pytest.raises(IbPartitionError) as info:
            ibpart.apply(plan, cfg_for(u.url, creds, tmp_path), run=lambda *a: None)
    finally:
        u.stop()
    msg = str(info.value)
    assert f"POST {u.url}/ufmRest/resources/pkeys" in msg and "HTTP 500" in msg
    assert "0x102a" in msg and info.value.exit_code == 3 and info.value.status == 500


def test_wrong_credentials_are_refused_by_ufm_and_named(ufm, creds, plan, tmp_path, machine):
    creds.write_text("dgxvm:wrong\n")
    with pytest.raises(IbPartitionError, match="HTTP 401"):
        ibpart.apply(plan, cfg_for(ufm.url, creds, tmp_path), run=lambda *a: None)
    assert [c["status"] for c in ufm.calls()] == [401]


@pytest.mark.parametrize("mode,text,why", [
    (0o640, "dgxvm:s3cret", "not readable by group or others"),
    (0o604, "dgxvm:s3cret", "not readable by group or others"),
    (0o600, "dgxvm", "expected one line USER:PASSWORD"),
    (0o600, ":s3cret", "expected one line USER:PASSWORD"),
])
def test_a_credentials_file_others_can_read_or_that_is_malformed_sends_nothing(
        ufm, creds, plan, tmp_path, mode, text, why, machine):
    creds.write_text(text + "\n")
    creds.chmod(mode)
    with pytest.raises(IbPartitionError, match=why) as info:
        ibpart.apply(plan, cfg_for(ufm.url, creds, tmp_path), run=lambda *a: None)
    assert f"read {creds}" in str(info.value)
    assert ufm.calls() == []


def test_a_ufm_that_does_not_answer_is_named(creds, plan, tmp_path, machine):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                  # nothing listens there now
    with pytest.raises(IbPartitionError, match="UFM did not answer") as info:
        ibpart.remove(plan, cfg_for(f"http://127.0.0.1:{port}", creds, tmp_path))
    assert f"POST http://127.0.0.1:{port}/ufmRest/actions/remove_guids_from_pkey" in str(info.value)


def test_a_failing_ip_link_stops_before_ufm_is_asked(ufm, creds, plan, tmp_path, machine):
    def run(argv, timeout, pkey):
        raise IbPartitionError(pkey=pkey, call=" ".join(argv), reason="exit 2")
    with pytest.raises(IbPartitionError, match="ip link set dev ibp24s0 vf 0 node_guid"):
        ibpart.apply(plan, cfg_for(ufm.url, creds, tmp_path), run=run)
    assert ufm.calls() == []


def test_the_standin_listens_on_loopback_only(ufm, machine):
    """/proc/net/tcp: its listening socket (state 0A) is bound to 127.0.0.1 (0100007F)."""
    port = int(ufm.url.rsplit(":", 1)[1])
    listening = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hexport = local.split(":")
        if int(hexport, 16) == port and state == "0A":
            listening.append(addr)
    assert listening == ["0100007F"]
