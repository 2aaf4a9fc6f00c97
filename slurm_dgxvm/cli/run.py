"""``dgxvm run`` and ``dgxvm shell``: their flags, and their exit status, which is the command's
(access.runner runs them: the order of the checks, the image, the VM). dgxvm's own failures
(no VM, bad flags, the VM unreachable, the connection lost) exit 125 (:data:`EXIT_RUN_FAILED`,
``main()`` applies it to the commands that set ``failure_exit_code``), the convention of
``docker run`` and ``podman run``, with one ``dgxvm: error:`` line on stderr; 126 and 127 are the
guest's "cannot execute" and "not found" (docs/user/run.md, "Exit status").
"""

from __future__ import annotations

import sys

import click

from ..access.runner import EXIT_RUN_FAILED, run_command, shell_command

_job_option = click.option("--job", "job_id", type=click.IntRange(min=1), metavar="ID",
                           multiple=True,
                           help="The job whose VM to enter (default: $SLURM_JOB_ID). Root may "
                                "name any job on this node, and then runs as the job's user: "
                                "their image cache, their registry credentials, their key.")


def _say(line: str) -> None:
    click.echo(line, err=True)


_OPTIONS = {
    "image": click.option(
        "--container-image", metavar="REF", multiple=True,
        help="Run CMD in a container of this image: pyxis's syntax "
             "[USER@][REGISTRY#]IMAGE[:TAG|@DIGEST], or Docker's."),
    "shell_image": click.option(
        "--container-image", metavar="REF", multiple=True,
        help="A shell (/bin/sh) in a container of this image instead (as for dgxvm run)."),
    "mounts": click.option(
        "--container-mounts", metavar="SRC[:DST[:FLAGS]],...", multiple=True,
        help="Bind mounts into the container (FLAGS: ro, rw, rprivate, private, rslave, slave, "
             "joined with '+'); SRC a path the VM has. Given twice, both apply."),
    "workdir": click.option(
        "--container-workdir", metavar="DIR", multiple=True,
        help="Working directory in the container, an absolute path (default: the current one "
             "when the VM has it, else the image's)."),
    "env": click.option(
        "--container-env", metavar="NAME,...", multiple=True,
        help="Variables whose job value wins over the image's ENV. Given twice, both apply."),
    "name": click.option(
        "--container-name", metavar="NAME[:auto]", multiple=True,
        help="A named container: made on its first run, used again by later runs of the job "
             "(with or without --container-image), keeping what they change in it; one run at "
             "a time; gone when the job ends."),
    "remap": click.option("--container-remap-root", is_flag=True,
                          help="Be root in the container (mapped to your own uid)."),
    "no_remap": click.option("--no-container-remap-root", is_flag=True,
                             help="Be yourself in the container (the default)."),
    "writable": click.option(
        "--container-writable", is_flag=True,
        help="A writable container root (a layer of its own over the image, removed when the "
             "run ends; a named container's is kept)."),
    "readonly": click.option(
        "--container-readonly", is_flag=True,
        help="A read-only container root (the default for an unnamed container)."),
}


def _container_options(*which: str):
    """The container flags ``which`` (keys of _OPTIONS), in that order in --help."""
    def decorate(f):
        for key in reversed(which):
            f = _OPTIONS[key](f)
        return f
    return decorate


_RUN_HELP = """Run CMD in the job's VM as the job's user, in the current directory when the VM has
it (the shared work dir), with stdin, stdout and stderr streamed and the job's environment (GPU
indices in the guest's numbering); with --container-image, in a container of that image.
Its exit status is CMD's; TERM, INT, HUP, USR1, USR2 and QUIT reach CMD; if dgxvm run dies,
CMD is stopped in the guest. Every flag is checked before anything is pulled or the VM is
reached; dgxvm's own failures (a bad flag included) exit 125.

Root may name any job (--job): the run is then the job's user's, exactly as if they ran it
(root's privileges are dropped for good first; the user's cache and registry credentials,
never root's)."""


@click.command(context_settings={"ignore_unknown_options": False,
                                 "allow_interspersed_args": False}, help=_RUN_HELP)
@_job_option
@_container_options("image", "mounts", "workdir", "env", "name", "remap", "no_remap",
                    "writable", "readonly")
@click.option("--quiet", "-q", is_flag=True, help="No notes on stderr (cwd not shared, ...).")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]...")
@click.pass_obj
def run(c, job_id, quiet, command, **opts):
    raise click.exceptions.Exit(run_command(lambda: c.env, job_ids=job_id, argv=tuple(command),
                                            options=opts, quiet=quiet, say=_say))



_SHELL_HELP = """An interactive login shell in the job's VM (a terminal when stdin is one: window size,
Ctrl-C, full-screen programs), in the current directory when the VM has it; with
--container-image, /bin/sh in a container of that image. Flags are checked as for dgxvm run;
root naming a user's job (--job) gets the job's user's shell, as for dgxvm run."""


@click.command(help=_SHELL_HELP)
@_job_option
@_container_options("shell_image", "mounts", "name", "remap", "no_remap", "writable",
                    "readonly")
@click.pass_obj
def shell(c, job_id, **opts):
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    raise click.exceptions.Exit(shell_command(lambda: c.env, job_ids=job_id, options=opts,
                                              tty=tty, say=_say))


# dgxvm's own failures exit 125 (cli.main.main): the status is the command's
for _command in (run, shell):
    _command.failure_exit_code = EXIT_RUN_FAILED

COMMANDS = (run, shell)
