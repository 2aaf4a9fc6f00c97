"""The one adapter to Slurm's commands (DESIGN.md, decision 3).

Every call runs through :func:`~slurm_dgxvm.tools.run_tool`, bounded by ``[slurm]
command_timeout_s``, and raises :class:`~slurm_dgxvm.errors.SlurmCommandError` with the command
and what it said. Nothing here is on the Prolog's path to a booted VM: the hooks use it only to
write accounting and, when a job is refused, to cancel or requeue it.
"""

from __future__ import annotations

import os
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

    def set_admin_comment_after_end(self, job_id: int, text: str) -> None:
        """After the job ended (the Epilog): only the accounting database can be changed."""
        self.run("sacctmgr", "-i", "modify", "job", "where", f"jobid={job_id}", "set",
                 f"AdminComment={text}")

    # -- a refused job ------------------------------------------------------------------------
    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id))

    def requeue(self, job_id: int) -> None:
        self.run("scontrol", "requeue", str(job_id))

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
