"""Fabric Manager partitions: ``Fabric`` driving the fmpm stand-in (tools/fmpm-standin/fmpm).

The stand-in runs as a subprocess, exactly as NVIDIA's fmpm would; its state lives in tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from slurm_dgxvm.errors import EXIT_HOST, FabricError
from slurm_dgxvm.fabric import Fabric

STANDIN = Path(__file__).resolve().parents[2] / "tools" / "fmpm-standin" / "fmpm"


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "fm-state.json"
    monkeypatch.setenv("FMPM_STANDIN_STATE", str(path))
    monkeypatch.delenv("FMPM_STANDIN_PARTITIONS", raising=False)
    return path


@pytest.fixture
def fabric(state) -> Fabric:
    return Fabric(str(STANDIN), timeout_s=30)


def standin(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(STANDIN), *args], capture_output=True, text=True, timeout=30)


def test_the_standin_is_executable_python():
    assert os.access(STANDIN, os.X_OK)
    assert STANDIN.read_text().startswith("#!/usr/bin/env python3\n")


def test_list_the_default_dgx_table(fabric, state):
    assert fabric.list() == {pid: False for pid in range(15)}
    parts = fabric.partitions()
    assert parts[0]["gpus"] == (1, 2, 3, 4, 5, 6, 7, 8)
    assert parts[1]["gpus"] == (1, 2, 3, 4) and parts[2]["gpus"] == (5, 6, 7, 8)
    assert [parts[p]["gpus"] for p in range(3, 7)] == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert [parts[p]["gpus"] for p in range(7, 15)] == [(g,) for g in range(1, 9)]
    assert state.exists()


def test_activate_and_deactivate(fabric):
    fabric.activate(3)
    assert fabric.list()[3] is True
    assert sum(fabric.list().values()) == 1
    fabric.deactivate(3)
    assert fabric.list()[3] is False


def test_double_activation_is_refused(fabric):
    fabric.activate(5)
    with pytest.raises(FabricError) as exc:
        fabric.activate(5)
    assert exc.value.partition == 5
    assert "already active" in str(exc.value)
    assert exc.value.exit_code == EXIT_HOST
    assert fabric.list()[5] is True


def test_an_overlapping_partition_is_refused_by_fm(fabric):
    fabric.activate(1)                                    # GPUs 1-4
    with pytest.raises(FabricError) as exc:
        fabric.activate(3)                                # GPUs 1-2: overlaps
    msg = str(exc.value)
    assert msg.startswith("fabric manager partition 3: activate failed:")
    assert "FM_ST_IN_USE" in msg and "fmReturn: -7" in msg and "overlaps" in msg
    with pytest.raises(FabricError, match="FM_ST_IN_USE"):
        fabric.activate(0)                                # all 8 GPUs
    fabric.activate(2)                                    # GPUs 5-8: disjoint, fine
    assert {p for p, a in fabric.list().items() if a} == {1, 2}


def test_deactivate_is_idempotent(fabric):
    fabric.deactivate(4)                                  # never active
    fabric.activate(4)
    fabric.deactivate(4)
    fabric.deactivate(4)
    assert fabric.list()[4] is False


@pytest.mark.parametrize("op", ["activate", "deactivate"])
def test_unknown_partitions(fabric, op):
    with pytest.raises(FabricError, match=r"partition 99: no such partition \(fmpm -l knows: 0, 1"):
        getattr(fabric, op)(99)


def test_the_standin_refuses_unknown_ids_itself(state):
    r = standin("-a", "99")
    assert r.returncode != 0
    assert "Failed to activate partition. fmReturn: -1" in r.stdout
    assert "no partition 99" in r.stderr
    r = standin("-d", "x")
    assert r.returncode != 0 and "not a partition id" in r.stderr


def test_missing_fmpm(state, tmp_path):
    fabric = Fabric(str(tmp_path / "no-such-fmpm"), timeout_s=5)
    with pytest.raises(FabricError) as exc:
        fabric.list()
    assert "fmpm not found" in str(exc.value)
    assert "install NVIDIA Fabric Manager or set fabric.fmpm" in str(exc.value)
    with pytest.raises(FabricError, match="fmpm not found"):
        fabric.activate(1)


def test_a_hanging_fmpm_times_out(tmp_path):
    slow = tmp_path / "slow-fmpm"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(FabricError, match=r"did not finish in 0.5s \(is nvidia-fabricmanager running\?\)"):
        Fabric(str(slow), timeout_s=0.5).list()


def test_garbage_from_fmpm(tmp_path):
    bad = tmp_path / "bad-fmpm"
    bad.write_text("#!/bin/sh\necho 'Failed to connect'\n")
    bad.chmod(0o755)
    with pytest.raises(FabricError, match="cannot parse `fmpm -l` output"):
        Fabric(str(bad), timeout_s=5).list()


def test_fmpm_failure_carries_its_output(tmp_path):
    down = tmp_path / "down-fmpm"
    down.write_text("#!/bin/sh\necho 'Failed to get partition list. fmReturn: -9'\nexit 247\n")
    down.chmod(0o755)
    with pytest.raises(FabricError) as exc:
        Fabric(str(down), timeout_s=5).list()
    assert "FM_ST_CONNECTION_NOT_VALID" in str(exc.value)
    assert "Failed to get partition list" in str(exc.value)


def test_fmpm_as_a_command_line(state):
    fabric = Fabric(f"{sys.executable} {STANDIN} --unix-domain-socket /run/fm.sock", timeout_s=30)
    fabric.activate(7)
    assert fabric.list()[7] is True


def test_the_standin_declares_itself(state):
    r = standin("-l")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["standIn"] is True and "not NVIDIA Fabric Manager" in doc["note"]
    assert doc["numPartitions"] == 15 and len(doc["partitionInfo"]) == 15
    assert set(doc["partitionInfo"][0]) == {"partitionId", "isActive", "numGpus", "gpuInfo"}
    assert "STAND-IN" in r.stderr
    for args in (["-a", "3"], ["-d", "3"], ["-v"]):
        assert "STAND-IN" in standin(*args).stderr
    for args in (["-h"], ["--help"], []):
        assert "STAND-IN" in standin(*args).stdout


def test_the_standin_needs_a_state_file(monkeypatch):
    monkeypatch.delenv("FMPM_STANDIN_STATE", raising=False)
    r = standin("-l")
    assert r.returncode == 1 and "FMPM_STANDIN_STATE is not set" in r.stderr


def test_unimplemented_options_say_so(state):
    r = standin("--set-activated-list", "1,2")
    assert r.returncode == 1 and "not implemented by the stand-in" in r.stderr


@pytest.mark.parametrize("table", [
    {"0": [1, 2], "1": [1], "2": [2]},
    {"partitionInfo": [{"partitionId": 0, "isActive": 0, "gpuInfo": [{"physicalId": 1},
                                                                      {"physicalId": 2}]},
                       {"partitionId": 1, "isActive": 1, "gpuInfo": [{"physicalId": 1}]},
                       {"partitionId": 2, "isActive": 0, "gpuInfo": [{"physicalId": 2}]}]},
])
def test_a_partition_table_from_a_file(fabric, tmp_path, monkeypatch, table):
    (tmp_path / "table.json").write_text(json.dumps(table))
    monkeypatch.setenv("FMPM_STANDIN_PARTITIONS", str(tmp_path / "table.json"))
    if "partitionInfo" not in table:
        fabric.activate(1)
    assert fabric.list() == {0: False, 1: True, 2: False}
    with pytest.raises(FabricError, match="overlaps"):
        fabric.activate(0)
    fabric.activate(2)


def test_concurrent_activations_take_the_lock(fabric, state):
    """Ten processes race for partition 3 and ten for the overlapping 1: one winner in all."""
    def attempt(pid):
        return standin("-a", str(pid)).returncode == 0
    standin("-l")                                         # create the state first
    with ThreadPoolExecutor(max_workers=20) as pool:
        wins = list(pool.map(attempt, [3] * 10 + [1] * 10))
    assert sum(wins) == 1
    active = {p for p, a in fabric.list().items() if a}
    assert len(active) == 1 and active <= {1, 3}


def test_the_standins_simulated_restart_leaves_every_partition_inactive(fabric):
    """--standin-restart (a stand-in feature, not NVIDIA's): what Fabric Manager does on a
    restart without its resiliency mode. Deactivating afterwards is still fine for dgxvm."""
    fabric.activate(3)
    fabric.activate(2)
    r = standin("--standin-restart")
    assert r.returncode == 0 and "was active: 2, 3" in r.stderr and "STAND-IN" in r.stderr
    assert not any(fabric.list().values())
    assert standin("-d", "3").returncode == 252          # FM_ST_UNINITIALIZED, as FM says
    fabric.deactivate(3)                                  # dgxvm: inactive is done
    assert standin("--standin-restart").returncode == 0   # nothing active: a no-op
    fabric.activate(3)                                    # and partitions work on as before
    assert fabric.list()[3] is True
    assert "--standin-restart" in standin("-h").stdout
