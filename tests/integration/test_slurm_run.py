"""`srun dgxvm run` in real Slurm jobs: the batch script's step enters the job's VM, its output
streams into slurm-<id>.out while it runs (also from a container, over 20 s), stderr lands
apart, the command's exit status is the step's in sacct (a death by signal too), Slurm's
signals (scancel -s USR1 to a handler in a container, scancel) reach the command in the guest,
and the Epilog still leaves nothing behind. Four jobs run at once (one VM each) to keep the
suite's time down."""

from __future__ import annotations

import time

import pytest

from slurm_dgxvm.slurm.accounting import decode
from test_slurm_jobs import nothing_left, wait_job_state

pytestmark = pytest.mark.integration

STREAM = """#!/bin/sh
srun dgxvm run -- sh -c 'for i in 1 2 3 4 5 6 7 8; do echo "line $i"; echo "err $i" >&2; \
sleep 1.5; done; exit 3'
"""

# the handler runs in the container: it names the image's marker file
USR1 = """#!/bin/sh
srun dgxvm run --container-image {ref} -- sh -c 'trap "echo got USR1 in \\$(cat /marker); \
exit 0" USR1; echo ready; while :; do sleep 0.2; done'
"""

# a container that prints a line every 2.5 s for 20 s, then exits 5; then a command killed by
# SIGKILL (in the guest: a container's PID 1 cannot be SIGKILLed from inside its namespace).
# First the user writes, in the log of what ran (their own file), nine images never pulled:
# the record names only what their image cache holds, and those lines push nothing out.
CONTAINER = """#!/bin/sh
eval "$(dgxvm job --env)"
log=$(dirname "$DGXVM_KEY")/containers.log
printf 'sha256:%064d forged/never-pulled:1\\n' 1 2 3 4 5 6 7 8 9 >> "$log"
srun dgxvm run --container-image {ref} -- sh -c 'for i in 1 2 3 4 5 6 7 8; do \
echo "$i in $(cat /marker)"; sleep 2.5; done; exit 5'
srun dgxvm run -- sh -c 'kill -KILL $$'
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


@pytest.fixture
def registry(slurm_node, tmp_path):
    from harness.registry import LocalRegistry, build_image
    reg = LocalRegistry(tmp_path / "reg", port=5000, netns=slurm_node.env.netns)
    reg.start()
    try:
        digest = build_image(reg, "slurm/busy", "1", tmp_path / "build", marker="slurm-busy")
        yield f"{reg.endpoint}/slurm/busy:1", digest
    finally:
        reg.stop()


def test_srun_dgxvm_run_streams_keeps_stderr_apart_passes_status_and_signals(slurm_node,
                                                                            registry):
    node = slurm_node
    work = node.jobs.workdir
    stream = node.jobs.sbatch(STREAM, gpus=1, extra=(f"--error={work}/slurm-%j.err",))
    ref, digest = registry
    usr1 = node.jobs.sbatch(USR1.format(ref=ref), gpus=1)
    cancel = node.jobs.sbatch(CANCEL, gpus=1)
    contained = node.jobs.sbatch(CONTAINER.format(ref=ref), gpus=2)
    out = work / f"slurm-{stream}.out"

    # streaming: a line is in the output file while the job still runs
    _wait_for(out, "line 2")
    state = wait_job_state(node, stream, ("RUNNING", "COMPLETING", "COMPLETED", "FAILED"))
    assert state.startswith("RUNNING"), f"line 2 arrived only at the end: {state}"
    assert "line 8" not in out.read_text()

    # Slurm's signals reach the command in the guest
    _wait_for(work / f"slurm-{usr1}.out", "ready")
    node.cluster.run(["scancel", "-s", "USR1", str(usr1)])
    _wait_for(work / f"slurm-{usr1}.out", "got USR1 in slurm-busy", timeout=60)
    _wait_for(work / f"slurm-{cancel}.out", "ready")
    node.cluster.run(["scancel", str(cancel)])
    _wait_for(work / f"term-{cancel}", "got TERM", timeout=60)

    # the container's lines stream too: line 2 is there while the job still runs
    _wait_for(work / f"slurm-{contained}.out", "2 in slurm-busy")
    state = wait_job_state(node, contained, ("RUNNING", "COMPLETING", "COMPLETED", "FAILED"))
    assert state.startswith("RUNNING"), f"the container's line 2 arrived only at the end: {state}"
    assert "8 in slurm-busy" not in (work / f"slurm-{contained}.out").read_text()

    node.jobs.wait_done([stream, usr1, cancel, contained], timeout=300)
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

    # the container job: its output, its status, a death by SIGKILL as 128+9, and sacct says
    # which exact image it ran
    text = (work / f"slurm-{contained}.out").read_text()
    assert "".join(f"{i} in slurm-busy\n" for i in range(1, 9)) in text, text
    steps = _step_rows(node, contained)
    assert steps[f"{contained}.0"]["ExitCode"] == "5:0", steps
    # dgxvm run exited 128+9, as srun says; sacct prints an exit status of 128 or more less
    # 128 (its print.c, PRINT_EXITCODE), so the step reads 9:0 (an `exit 137` reads the same)
    assert "task 0: Exited with exit code 137\n" in text, text
    assert steps[f"{contained}.1"]["ExitCode"] == "9:0", steps
    assert steps[f"{contained}.1"]["State"] == "FAILED", steps
    rec = decode(node.jobs.sacct([contained])[contained]["AdminComment"])
    assert rec["containers"] == f"{ref}@{digest}", rec
    node.cluster.wait_idle(timeout=120)
    nothing_left(node)
