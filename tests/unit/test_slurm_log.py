"""Where the hooks' lines go: slurmd's own log on success (slurmd logs hook output only on
failure), stderr on failure."""

from __future__ import annotations

import re

from slurm_dgxvm.slurm.log import slurmd_log_file, write


def conf(tmp_path, line):
    p = tmp_path / "slurm.conf"
    p.write_text(f"ClusterName=x\n# SlurmdLogFile=/wrong\n{line}\nSlurmctldLogFile=/ctld.log\n")
    return {"SLURM_CONF": str(p), "SLURMD_NODENAME": "dgx01"}


def test_slurmd_log_file_from_slurm_conf(tmp_path):
    assert slurmd_log_file(conf(tmp_path, "SlurmdLogFile=/var/log/slurm/d-%n.log")) == \
        tmp_path.__class__("/var/log/slurm/d-dgx01.log")
    assert slurmd_log_file(conf(tmp_path, "slurmdlogfile = /l  # comment")).as_posix() == "/l"
    assert slurmd_log_file(conf(tmp_path, "")) is None
    assert slurmd_log_file({"SLURM_CONF": str(tmp_path / "absent")}) is None


def test_success_lines_are_appended_to_slurmds_log(tmp_path, capsys):
    log = tmp_path / "slurmd.log"
    log.write_text("[2026-01-01T00:00:00.000] slurmd started\n")
    write(["dgxvm prolog: job 1: ready"], failed=False, setting="auto",
          environ=conf(tmp_path, f"SlurmdLogFile={log}"))
    last = log.read_text().splitlines()[-1]
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\] dgxvm prolog: job 1: ready", last)
    assert capsys.readouterr().err == ""


def test_failures_go_to_stderr_for_slurmd(tmp_path, capsys):
    log = tmp_path / "slurmd.log"
    write(["dgxvm prolog: job 1: failed"], failed=True, setting=str(log))
    assert not log.exists()
    assert capsys.readouterr().err == "dgxvm prolog: job 1: failed\n"


def test_an_unwritable_log_falls_back_to_stderr(tmp_path, capsys):
    write(["line"], failed=False, setting=str(tmp_path / "no" / "such" / "dir.log"))
    err = capsys.readouterr().err
    assert err.startswith("line\ndgxvm: cannot append to ") and "No such file" in err
