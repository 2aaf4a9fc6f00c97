"""The one adapter to Slurm's commands (DESIGN.md, decision 3).

Every call runs through :func:`~slurm_dgxvm.tools.run_tool`, bounded by ``[slurm]
command_timeout_s``, and raises :class:`~slurm_dgxvm.errors.SlurmCommandError` with the command
and what it said. Nothing here is on the Prolog's path to a booted VM: the hooks use it only to
write accounting and, when a job is refused, to cancel or requeue it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..config import SlurmConfig
from ..errors import SlurmCommandError
from ..tools import output_tail, run_tool


@dataclass(frozen=True)
class Slurm:
    cfg: SlurmConfig = SlurmConfig()

    def tool(self, name: str) -> str:
        return os.path.join(self.cfg.bin_dir, name) if self.cfg.bin_dir else name

    def run(self, name: str, *args: str) -> str:
        argv = [self.tool(name), *args]
        shown = " ".join(argv)

        def error(reason: str) -> SlurmCommandError:
            return SlurmCommandError(command=shown, reason=reason)
        proc = run_tool(argv, timeout=self.cfg.command_timeout_s, error=error, what=name,
                        check=False)
        if proc.returncode != 0:
            raise error(f"exit {proc.returncode}: {output_tail(proc)}")
        return proc.stdout

    # -- the job's AdminComment ---------------------------------------------------------------
    def set_admin_comment(self, job_id: int, text: str) -> None:
        """While the job lives (the Prolog)."""
        self.run("scontrol", "update", f"job={job_id}", f"AdminComment={text}")

    def admin_comment(self, job_id: int) -> str | None:
        """The job's AdminComment while it lives (``scontrol -o show job``), None when unset."""
        return admin_comment_of(self.run("scontrol", "-o", "show", "job", str(job_id)))

    def admin_comment_after_end(self, job_id: int) -> str | None:
        """The job's AdminComment in the accounting database (after the job ended)."""
        out = self.run("sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "AdminComment")
        text = out.splitlines()[0].strip() if out.strip() else ""
        return text or None

    def set_admin_comment_after_end(self, job_id: int, text: str) -> None:
        """After the job ended (the Epilog): only the accounting database can be changed."""
        self.run("sacctmgr", "-i", "modify", "job", "where", f"jobid={job_id}", "set",
                 f"AdminComment={text}")

    # -- a refused job ------------------------------------------------------------------------
    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id))

    def requeue(self, job_id: int) -> None:
        self.run("scontrol", "requeue", str(job_id))

    # -- the jobs on a node (dgxvm reconcile) ---------------------------------------------------
    def jobs_on_node(self, node: str) -> dict[int, str]:
        """``{job id: state}`` of the jobs Slurm has allocated on ``node`` (``squeue -h -w
        NODE -o %A|%T``: squeue's default states, those not finished; COMPLETING while an
        Epilog runs, CONFIGURING while a Prolog does). Each array task and het job component
        is its own job id, as SLURM_JOB_ID is in its Prolog. Raises SlurmCommandError when
        squeue fails (slurmctld down, an unknown node) or prints something else."""
        shown = f"{self.tool('squeue')} -h -w {node} -o %A|%T"
        out = {}
        for line in self.run("squeue", "-h", "-w", node, "-o", "%A|%T").splitlines():
            if not line.strip():
                continue
            job, sep, state = line.strip().partition("|")
            if not sep or not (job.isascii() and job.isdigit()) or not state:
                raise SlurmCommandError(command=shown, reason=f"unexpected line {line!r}")
            out[int(job)] = state.strip()
        return out

    # -- node state (dgxvm health, the HealthCheckProgram) ---------------------------------------
    def drain(self, node: str, reason: str) -> None:
        self.run("scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}")

    def resume(self, node: str) -> None:
        self.run("scontrol", "update", f"NodeName={node}", "State=RESUME")

    def node_state(self, node: str) -> tuple[str, str]:
        """(State, Reason) of ``node`` as ``scontrol show node -o`` prints them ("" when it
        has no reason). Raises SlurmCommandError when scontrol fails."""
        line = self.run("scontrol", "show", "node", "-o", node)
        state = reason = ""
        m = re.search(r"(?:^|\s)State=(\S+)", line)
        if m:
            state = m.group(1)
        m = re.search(r"(?:^|\s)Reason=(.*?)(?:\s+\[[^\]]*\]|\s+\w+=|$)", line.strip())
        if m:
            reason = m.group(1).strip()
        return state, reason

    # -- reports -------------------------------------------------------------------------------
    SACCT_FIELDS = ("JobID", "User", "Account", "Partition", "State", "Start", "End",
                    "ElapsedRaw", "AllocTRES", "AdminComment")

    def sacct(self, *, since: str, until: str = "now") -> list[dict]:
        """Jobs of every user (allocations only, no steps) between ``since`` and ``until``."""
        args = ["-a", "-X", "-n", "-P", "--delimiter=|", "-S", since, "-E", until,
                "-o", ",".join(self.SACCT_FIELDS)]
        out = []
        for line in self.run("sacct", *args).splitlines():
            if not line.strip():
                continue
            values = line.split("|", len(self.SACCT_FIELDS) - 1)
            if len(values) != len(self.SACCT_FIELDS):
                continue
            out.append(dict(zip(self.SACCT_FIELDS, values)))
        return out


_SCONTROL_KEY = re.compile(r"[A-Z][A-Za-z0-9/:_]*=")


def admin_comment_of(show: str) -> str | None:
    """The AdminComment in ``scontrol -o show job`` output (one line of ``Key=value`` words).
    Its value has spaces; it ends at the next word that is a Key= of scontrol's (a capital
    first: a dgxvm record's words never have one, accounting escapes capitals)."""
    words = show.split()
    for i, word in enumerate(words):
        if word.startswith("AdminComment="):
            value = [word[len("AdminComment="):]]
            for w in words[i + 1:]:
                if _SCONTROL_KEY.match(w):
                    break
                value.append(w)
            text = " ".join(value).strip()
            return None if text in ("", "(null)") else text
    return None
