"""Fault points fire only where the root-owned file says, once, and kill for real."""

from __future__ import annotations

import signal
import subprocess
import sys

from slurm_dgxvm import failpoints
from slurm_dgxvm.errors import FaultInjected

CHILD = ("import sys; from slurm_dgxvm import failpoints; "
         "failpoints.hit(sys.argv[1], sys.argv[2], sys.argv[3]); print('went on')")


def run(state_dir, point, vm):
    return subprocess.run([sys.executable, "-c", CHILD, str(state_dir), point, vm],
                          capture_output=True, text=True, timeout=60)


def test_a_named_point_kills_the_process_once_and_other_points_and_vms_go_on(tmp_path):
    f = tmp_path / failpoints.FILE
    f.write_text("after:disks job-7 kill\nafter:define job-8 kill\n")
    f.chmod(0o644)
    assert run(tmp_path, "after:disks", "job-8").stdout == "went on\n"      # another VM
    assert run(tmp_path, "after:place", "job-7").stdout == "went on\n"      # another point
    killed = run(tmp_path, "after:disks", "job-7")
    assert killed.returncode == -signal.SIGKILL and killed.stdout == ""
    assert f.read_text() == "after:define job-8 kill\n"                      # fired once
    assert run(tmp_path, "after:disks", "job-7").stdout == "went on\n"      # the rerun goes on


def test_a_file_others_can_write_is_ignored(tmp_path):
    f = tmp_path / failpoints.FILE
    f.write_text("after:disks job-7 kill\n")
    f.chmod(0o666)
    assert run(tmp_path, "after:disks", "job-7").stdout == "went on\n"


def test_no_file_no_effect(tmp_path):
    failpoints.hit(tmp_path, "after:disks", "job-7")          # returns: nothing to fire


def test_fail_raises_in_the_step_once(tmp_path):
    import pytest
    f = tmp_path / failpoints.FILE
    f.write_text("claim:plugged warm-1 fail\n")
    f.chmod(0o644)
    with pytest.raises(FaultInjected, match="fault point claim:plugged of warm-1"):
        failpoints.hit(tmp_path, "claim:plugged", "warm-1")
    failpoints.hit(tmp_path, "claim:plugged", "warm-1")          # fired once: goes on
    assert f.read_text() == ""
