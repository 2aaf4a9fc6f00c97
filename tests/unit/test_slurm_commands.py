"""The adapter to Slurm's commands: a missing, failing or hanging command is a SlurmCommandError
(exit 3) naming the command and what it said."""

from __future__ import annotations

import pytest

from slurm_dgxvm.config import SlurmConfig
from slurm_dgxvm.errors import EXIT_HOST, SlurmCommandError
from slurm_dgxvm.slurm.commands import Slurm


def slurm_with(tmp_path, script: str | None, timeout: float = 5) -> Slurm:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if script is not None:
        (bindir / "scancel").write_text(script)
        (bindir / "scancel").chmod(0o755)
    return Slurm(SlurmConfig(bin_dir=str(bindir), command_timeout_s=timeout))


def test_output_is_returned_in_the_c_locale(tmp_path):
    s = slurm_with(tmp_path, '#!/bin/sh\necho "$LC_ALL $*"\n')
    assert s.run("scancel", "7") == "C 7\n"


def test_a_refusing_command_names_itself_its_status_and_what_it_said(tmp_path):
    s = slurm_with(tmp_path, "#!/bin/sh\necho 'scancel: error: Invalid job id' >&2\nexit 1\n")
    with pytest.raises(SlurmCommandError) as info:
        s.cancel(7)
    assert str(info.value) == (f"slurm: `{tmp_path}/bin/scancel 7`: exit 1: "
                               "scancel: error: Invalid job id")
    assert info.value.exit_code == EXIT_HOST


def test_a_missing_command(tmp_path):
    with pytest.raises(SlurmCommandError, match=r"scancel not found"):
        slurm_with(tmp_path, None).cancel(7)


def test_a_hanging_command_is_bounded_by_command_timeout_s(tmp_path):
    s = slurm_with(tmp_path, "#!/bin/sh\nexec sleep 30\n", timeout=0.3)
    with pytest.raises(SlurmCommandError, match=r"scancel did not finish in 0.3s"):
        s.cancel(7)


# -- the jobs on a node (dgxvm reconcile) ----------------------------------------------------------
def squeue(tmp_path, script: str) -> Slurm:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "squeue").write_text(script)
    (bindir / "squeue").chmod(0o755)
    return Slurm(SlurmConfig(bin_dir=str(bindir), command_timeout_s=5))


def test_the_jobs_on_a_node_come_from_squeue_with_their_states(tmp_path):
    s = squeue(tmp_path, '#!/bin/sh\n[ "$*" = "-h -w dgx01 -o %A|%T" ] || exit 9\n'
                         'printf "42|RUNNING\\n43|COMPLETING\\n\\n44|CONFIGURING\\n"\n')
    assert s.jobs_on_node("dgx01") == {42: "RUNNING", 43: "COMPLETING", 44: "CONFIGURING"}


@pytest.mark.parametrize("line", ["42 RUNNING", "x|RUNNING", "42|", "-1|RUNNING"])
def test_squeue_output_that_is_not_a_job_and_state_is_an_error(tmp_path, line):
    s = squeue(tmp_path, f"#!/bin/sh\necho '{line}'\n")
    with pytest.raises(SlurmCommandError, match="unexpected line"):
        s.jobs_on_node("dgx01")


def test_slurm_that_cannot_be_asked_makes_no_job_live_nor_dead(tmp_path):
    """reconcile then touches no job's VM: live is None, not empty."""
    from slurm_dgxvm.slurm.liveness import jobs_on_node
    s = squeue(tmp_path, "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm "
                         "controller' >&2\nexit 1\n")
    jobs = jobs_on_node(s, "dgx01", now=123.0)
    assert jobs.live is None and jobs.asked_at == 123.0
    assert "Unable to contact slurm controller" in jobs.error


def test_only_final_states_make_a_job_not_live(tmp_path):
    from slurm_dgxvm.slurm.liveness import jobs_on_node
    s = squeue(tmp_path, "#!/bin/sh\nprintf '1|RUNNING\\n2|COMPLETED\\n3|COMPLETING\\n"
                         "4|CANCELLED\\n5|SUSPENDED\\n6|NODE_FAIL\\n7|NEW_STATE\\n'\n")
    jobs = jobs_on_node(s, "dgx01")
    assert jobs.live == {1, 3, 5, 7} and jobs.states[2] == "COMPLETED"


def test_the_node_is_named_as_slurm_names_it():
    import socket
    from slurm_dgxvm.slurm.liveness import node_name
    assert node_name({"SLURMD_NODENAME": "dgx07"}, "given") == "given"
    assert node_name({"SLURMD_NODENAME": "dgx07"}) == "dgx07"
    assert node_name({}) == socket.gethostname().split(".")[0]


def test_the_admin_comment_is_read_from_scontrol_up_to_its_next_key():
    """A dgxvm record has spaces and '=' in it, but never a capital letter (escaped): it ends
    at scontrol's next Key=."""
    from slurm_dgxvm.slurm.commands import admin_comment_of
    rec = "dgxvm/1 node=dgxa state=running gpus=0 ; dgxvm/1 node=dgxb state=running cause=a%20B"
    line = (f"JobId=21 JobName=wrap UserId=alice(1001) Priority=1 AdminComment={rec} "
            "SystemComment=x Comment=dgxvm:image=t NumNodes=2")
    assert admin_comment_of(line) == rec
    assert admin_comment_of(f"JobId=21 AdminComment={rec}") == rec
    assert admin_comment_of("JobId=21 JobName=wrap NumNodes=2") is None
    assert admin_comment_of("JobId=21 AdminComment=(null) NumNodes=2") is None
