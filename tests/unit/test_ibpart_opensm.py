"""ibpart against OpenSM: each job's line in partitions.conf, the file written whole after the
site's own partitions, OpenSM told with SIGHUP; a key another job holds, and an OpenSM that
cannot be told, are errors naming the call."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from slurm_dgxvm import config as config_mod
from slurm_dgxvm import ibpart
from slurm_dgxvm.errors import IbPartitionError
from slurm_dgxvm.ibpart import IbPlan, Member

BASE = "Default=0x7fff, ipoib : ALL=full ;\n"


def plan(job, pkey, *guids):
    return IbPlan(job_id=job, pkey=pkey, members=tuple(
        Member(pci=f"0000:18:00.{i + 1}", hca="0000:18:00.0", vf=i, guid=g, netdev="ibp24s0")
        for i, g in enumerate(guids)))


@pytest.fixture
def opensm(tmp_path):
    """A process standing for OpenSM: it counts the SIGHUPs it gets into a file."""
    hups = tmp_path / "hups"
    code = ("import signal, sys, time\n"
            "n = 0\n"
            "def hup(*_):\n"
            "    global n; n += 1; open(sys.argv[1], 'w').write(str(n))\n"
            "signal.signal(signal.SIGHUP, hup)\n"
            "open(sys.argv[1], 'w').write('0')\n"
            "while True: time.sleep(1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(hups)])
    while not hups.exists():
        time.sleep(0.02)
    (tmp_path / "opensm.pid").write_text(f"{proc.pid}\n")
    yield hups
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "base.conf").write_text(BASE)
    return config_mod.from_dict({
        "host": {"state_dir": str(tmp_path / "state")},
        "ib": {"backend": "opensm", "opensm_partitions": str(tmp_path / "partitions.conf"),
               "opensm_base": str(tmp_path / "base.conf"),
               "opensm_pid_file": str(tmp_path / "opensm.pid")}})


def hups_after(path, n):
    deadline = time.monotonic() + 5
    while path.read_text() != str(n) and time.monotonic() < deadline:
        time.sleep(0.02)
    return int(path.read_text())


def test_create_writes_the_jobs_line_after_the_base_and_signals_opensm(cfg, opensm, tmp_path):
    ibpart.apply(plan(42, 0x102a, "0x02f6030000180000", "0x02f6030000180001"), cfg,
                 run=lambda *a: None)
    text = (tmp_path / "partitions.conf").read_text()
    assert text.startswith(BASE)
    assert text.endswith("dgxvm_job_42=0x102a : 0x02f6030000180000=full, "
                         "0x02f6030000180001=full ;\n")
    assert hups_after(opensm, 1) == 1
    assert (tmp_path / "partitions.conf").stat().st_mode & 0o777 == 0o644


def test_delete_drops_only_the_jobs_line_and_signals_again(cfg, opensm, tmp_path):
    ibpart.apply(plan(42, 0x102a, "0x02f6030000180000"), cfg, run=lambda *a: None)
    ibpart.apply(plan(43, 0x102b, "0x02f6030000180001"), cfg, run=lambda *a: None)
    ibpart.remove(plan(42, 0x102a, "0x02f6030000180000"), cfg)
    text = (tmp_path / "partitions.conf").read_text()
    assert "dgxvm_job_42" not in text and "dgxvm_job_43=0x102b" in text
    assert hups_after(opensm, 3) == 3
    ibpart.remove(plan(42, 0x102a, "0x02f6030000180000"), cfg)      # twice: still fine
    assert hups_after(opensm, 4) == 4


def test_a_key_another_running_job_holds_is_refused_naming_it(cfg, opensm, tmp_path):
    ibpart.apply(plan(42, 0x102a, "0x02f6030000180000"), cfg, run=lambda *a: None)
    with pytest.raises(IbPartitionError, match="held by job-42.conf") as info:
        ibpart.apply(plan(28713, 0x102a, "0x02f6030000180001"), cfg, run=lambda *a: None)
    assert "0x102a" in str(info.value)
    assert "dgxvm_job_28713" not in (tmp_path / "partitions.conf").read_text()


def test_an_opensm_that_cannot_be_signalled_is_an_error_naming_the_call(cfg, tmp_path):
    (tmp_path / "opensm.pid").write_text("999999999\n")
    with pytest.raises(IbPartitionError) as info:
        ibpart.apply(plan(42, 0x102a, "0x02f6030000180000"), cfg, run=lambda *a: None)
    msg = str(info.value)
    assert f"SIGHUP opensm (pid from {tmp_path / 'opensm.pid'})" in msg
    assert "OpenSM has not read it" in msg
    assert "dgxvm_job_42" in (tmp_path / "partitions.conf").read_text()


def test_backend_none_sets_guids_only_and_an_empty_plan_does_nothing(tmp_path):
    cfg = config_mod.from_dict({"host": {"state_dir": str(tmp_path)}})
    ran = []
    p = plan(42, 0x102a, "0x02f6030000180000")
    ibpart.apply(p, cfg, run=lambda argv, *a: ran.append(argv))
    ibpart.remove(p, cfg)
    assert ran == list(p.guid_commands()) and len(ran) == 2
    ibpart.apply(IbPlan(job_id=1, pkey=5, members=()), cfg, run=lambda *a: ran.append(a))
    assert len(ran) == 2 and ibpart.backend(cfg) is None
