"""`srun dgxvm run` in real Slurm jobs: the batch script's step enters the job's VM, its output
streams into slurm-<id>.out while it runs, stderr lands apart, the command's exit status is
the step's in sacct, Slurm's signals (scancel -s USR1, scancel) reach the command in the guest,
and the Epilog still leaves nothing behind. Three jobs run at once (one VM each) to keep the
suite's time down."""

from __future__ import annotations

import time

import pytest

from test_slurm_jobs import nothing_left, wait_job_state

pytestmark = pytest.mark.integration

STREAM = """#!/bin/sh
srun dgxvm run -- sh -c 'for i in 1 2 3 4 5 6 7 8; do echo "line $i"; echo "err $i" >&2; \
sleep 1.5; done; exit 3'
"""

USR1 = """#!/bin/sh
srun dgxvm run -- sh -c 'trap "echo got USR1; exit 0" USR1; echo ready; \
while :; do sleep 0.2; done'
"""

CANCEL = """#!/bin/sh
srun dgxvm run -- sh -c 'trap "echo got TERM > term-$SLURM_JOB_ID; exit 143" TERM; \
echo ready; while :; do sleep 0.2; done'
"""


def _wait_for(path, text: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout}s: {content!r}"
        time.sleep(0.2)


def _step_rows(node, job) -> dict[str, dict]:
    fields = ["JobID", "State", "ExitCode"]
    r = node.cluster.run(["sacct", "-n", "-P", "-a", "-j", str(job), "-o", ",".join(fields)],
                         timeout=15)
    rows = {}
    for line in r.stdout.splitlines():
        vals = line.split("|")
        if len(vals) == len(fields):
            rows[vals[0]] = dict(zip(fields, vals))
    return rows


def test_srun_dgxvm_run_streams_keeps_stderr_apart_passes_status_and_signals(slurm_node):
    node = slurm_node
    work = node.jobs.workdir
    stream = node.jobs.sbatch(STREAM, gpus=1, extra=(f"--error={work}/slurm-%j.err",))
    usr1 = node.jobs.sbatch(USR1, gpus=1)
    cancel = node.jobs.sbatch(CANCEL, gpus=1)
    out = work / f"slurm-{stream}.out"

    # streaming: a line is in the output file while the job still runs
    _wait_for(out, "line 2")
    state = wait_job_state(node, stream, ("RUNNING", "COMPLETING", "COMPLETED", "FAILED"))
    assert state.startswith("RUNNING"), f"line 2 arrived only at the end: {state}"
    assert "line 8" not in out.read_text()

    # Slurm's signals reach the command in the guest
    _wait_for(work / f"slurm-{usr1}.out", "ready")
    node.cluster.run(["scancel", "-s", "USR1", str(usr1)])
    _wait_for(work / f"slurm-{usr1}.out", "got USR1", timeout=60)
    _wait_for(work / f"slurm-{cancel}.out", "ready")
    node.cluster.run(["scancel", str(cancel)])
    _wait_for(work / f"term-{cancel}", "got TERM", timeout=60)

    node.jobs.wait_done([stream, usr1, cancel], timeout=300)
    assert out.read_text() == "".join(f"line {i}\n" for i in range(1, 9))
    err = (work / f"slurm-{stream}.err").read_text()
    assert err.startswith("".join(f"err {i}\n" for i in range(1, 9))), err
    # and srun's own line, which says what sacct says
    assert err.endswith("srun: error: dgx01: task 0: Exited with exit code 3\n"), err
    steps = _step_rows(node, stream)
    assert steps[f"{stream}.0"]["ExitCode"] == "3:0", steps
    assert steps[f"{stream}.0"]["State"] == "FAILED", steps
    steps = _step_rows(node, usr1)
    assert steps[f"{usr1}.0"]["ExitCode"] == "0:0", steps
    node.cluster.wait_idle(timeout=120)
    nothing_left(node)
