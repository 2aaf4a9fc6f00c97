"""``dgxvm run`` and ``dgxvm shell``: the job's work inside its VM (slurm_dgxvm/access/).

Their exit status is the command's (0-255; 128+N when a signal N ended it). dgxvm's own failures
(no VM, bad flags, the VM unreachable, the connection lost) exit 125, the convention of
``docker run`` and ``podman run``, with one ``dgxvm: error:`` line on stderr; 126 and 127 are the
guest's "cannot execute" and "not found" (README "Exit status of dgxvm run").
"""

from __future__ import annotations

import os
import sys

import click

from ..access import session
from ..access.request import Request, guest_cwd, guest_environment
from ..access.target import job_from_env, target_for

#: the exit status of ``dgxvm run``/``shell`` when dgxvm itself failed
EXIT_RUN_FAILED = 125
VERBS = ("run", "shell")

_job_option = click.option("--job", "job_id", type=click.IntRange(min=1), metavar="ID",
                           help="The job whose VM to enter (default: $SLURM_JOB_ID; root may "
                                "name any job on this node).")


def _request(target, argv: tuple[str, ...], cfg) -> tuple[Request, str | None]:
    """The request for ``argv`` and a note for stderr when the cwd is not in the VM."""
    cwd = os.getcwd()
    shared = [target.workdir] if target.workdir else []
    where = guest_cwd(cwd, shared)
    note = None
    if where is None:
        note = (f"dgxvm: note: {cwd} is not shared with job {target.job_id}'s VM"
                + (f" (only {target.workdir} is)" if target.workdir else "")
                + "; the command starts in the user's home in the VM")
    env = guest_environment(os.environ, target.slurm_gpus,
                            relative=cfg.slurm.constrain_devices)
    return Request(argv=argv, env=env, cwd=where), note


@click.command(context_settings={"ignore_unknown_options": False,
                                 "allow_interspersed_args": False})
@_job_option
@click.option("--quiet", "-q", is_flag=True, help="No note on stderr when the cwd is not shared.")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]...")
@click.pass_obj
def run(c, job_id, quiet, command):
    """Run CMD in the job's VM as the job's user, in the current directory when the VM has it
    (the shared work dir), with stdin, stdout and stderr streamed and the job's environment (GPU
    indices in the guest's numbering). Its exit status is CMD's; TERM, INT, HUP, USR1, USR2 and
    QUIT reach CMD; if dgxvm run dies, CMD is stopped in the guest. dgxvm's own failures exit
    125."""
    env = c.env
    target = target_for(env, job_from_env(job_id, os.environ))
    request, note = _request(target, tuple(command), env.cfg)
    if note and not quiet:
        click.echo(note, err=True)
    raise click.exceptions.Exit(session.run(target, request))


@click.command()
@_job_option
@click.pass_obj
def shell(c, job_id):
    """An interactive login shell in the job's VM (a terminal when stdin is one: window size,
    Ctrl-C, full-screen programs), in the current directory when the VM has it."""
    env = c.env
    target = target_for(env, job_from_env(job_id, os.environ))
    request, _ = _request(target, (), env.cfg)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    raise click.exceptions.Exit(session.run(target, request, verb="shell", tty=tty))


COMMANDS = (run, shell)
