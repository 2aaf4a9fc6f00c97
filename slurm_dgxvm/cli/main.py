"""``dgxvm``: the command line. Thin: build the context once, call the library, format the result.

Errors: library code raises DgxvmError subclasses; this module is the one place (with the Slurm
hooks, later) that turns them into one line on stderr and the error's exit code.

Start-up: ``dgxvm run`` runs once per task of a job, so this module imports only what every
command needs. Each command is in a cli module of its own, imported when it is looked up
(:class:`LazyGroup`), and the commands import their library code when they run.

The group's object (:class:`~.context.Context`) is made by :func:`main` and carries back the
exit status of dgxvm's own failures for the command invoked (its ``failure_exit_code``:
``dgxvm run``/``shell``, whose status is the command's).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from .. import config as config_mod
from ..errors import DgxvmError, EXIT_BAD_INPUT, EXIT_INTERNAL, ModuleMissing
from .context import Context


#: the commands, each in a cli module of its own: name -> "module:attribute", relative to this
#: package, imported when click looks the name up (to run it, or for ``dgxvm --help``)
LAZY_COMMANDS = {
    "create": ".vms:create", "delete": ".vms:delete", "list": ".vms:list_cmd",
    "hook": ".vms:hook",
    "prolog": ".slurm:prolog", "epilog": ".slurm:epilog", "job": ".slurm:job",
    "report": ".slurm:report",
    "run": ".run:run", "shell": ".run:shell",
    "image": ".images:image",
    "image-cache": ".image_cache:image_cache",
    "metrics": ".metrics:metrics",
    "reconcile": ".reconcile:reconcile",
    "gpu": ".gpu:gpu", "health": ".gpu:health",
    "host": ".host:host",
    "warm": ".warm:warm",
    "topology": ".topology:topology", "plan": ".topology:plan",
    "gres-conf": ".topology:gres_conf_cmd",
    "simulate": ".simulate:simulate",
    "share": ".share:share",
    "version": ".version:version",
}


#: Commands that change a node's VMs and run for seconds to minutes (the Prolog's boot wait): they
#: read the whole package before they begin, so that a package upgrade cannot mix two versions
#: into one of them (slurm_dgxvm/preload.py). ``dgxvm run`` is left lazy: it starts on every
#: srun, where its start time is the job's.
PRELOADED = frozenset({"prolog", "epilog", "create", "delete", "reconcile"})


#: click >= 8.4's error for a mistyped command name (older click suggests no name)
_NoSuchCommand = getattr(click.exceptions, "NoSuchCommand", None)


class LazyGroup(click.Group):
    """A group whose subcommands in other modules are imported on demand (click's documented
    pattern, "Lazily Loading Subcommands"): ``dgxvm run`` imports the run verbs' module, not
    the image store's, the ledger's or libvirt's. ``list_commands`` names them all, so help
    lists each with its short help as an eagerly built group would."""

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands:
            return self._load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            if _NoSuchCommand is None or not isinstance(exc, _NoSuchCommand):
                raise
            # click suggests close names ("Did you mean 'run'?") from self.commands, which
            # holds only the commands loaded so far: suggest from every name, as before
            raise _NoSuchCommand(exc.command_name, possibilities=self.list_commands(ctx),
                                 ctx=exc.ctx) from None

    def _load(self, cmd_name: str) -> click.Command:
        module_name, attr = self.lazy_subcommands[cmd_name].split(":")
        command = getattr(importlib.import_module(module_name, __package__), attr)
        if not isinstance(command, click.Command) or command.name != cmd_name:
            raise TypeError(f"{module_name}:{attr} is not the command {cmd_name!r}")
        return command


@click.group(cls=LazyGroup, lazy_subcommands=LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", envvar=config_mod.ENV_CONFIG, metavar="FILE",
              help=f"Config file (TOML). [env {config_mod.ENV_CONFIG}; "
                   f"default {config_mod.DEFAULT_CONFIG_PATH}]")
@click.option("--sysfs-root", envvar=config_mod.ENV_SYSFS_ROOT, metavar="DIR",
              help="Read the host from this sysfs root, e.g. the output of `dgxvm simulate`. "
                   f"[env {config_mod.ENV_SYSFS_ROOT}; config host.sysfs_root; default /]")
@click.option("--state-dir", envvar=config_mod.ENV_STATE_DIR, metavar="DIR",
              help="Where the ledger lives. "
                   f"[env {config_mod.ENV_STATE_DIR}; config host.state_dir; default /var/lib/dgxvm]")
@click.pass_context
def cli(ctx, config_path, sysfs_root, state_dir):
    """Topology-aligned GPU virtual machines for Slurm jobs on DGX-class servers."""
    c = ctx.ensure_object(Context).locate(config_path, sysfs_root, state_dir)
    if ctx.invoked_subcommand in PRELOADED and not ctx.resilient_parsing:
        from ..preload import preload
        preload()
    if ctx.invoked_subcommand:
        # dgxvm run's own status is the command's: dgxvm's failures must not look like one
        # (the command is loaded already: click looks a command up before this runs)
        command = ctx.command.get_command(ctx, ctx.invoked_subcommand)
        c.failure_code = getattr(command, "failure_exit_code", None)


def main(argv=None) -> int:
    """Entry point: run the CLI, turning our errors into one line and an exit code (for
    ``dgxvm run``/``shell``, every failure of dgxvm itself is 125: their status is the
    command's)."""
    obj = Context()
    rc, failed = _main(argv, obj)
    return obj.failure_code if failed and obj.failure_code is not None else rc


def _main(argv, obj: Context) -> tuple[int, bool]:
    """(exit code, whether dgxvm itself failed; ``obj``: the group's object, which says the
    exit status of dgxvm's own failures for the command invoked)."""
    try:
        rv = cli.main(args=argv, prog_name="dgxvm", standalone_mode=False, obj=obj)
        if isinstance(rv, int):
            return rv, False  # click returns the code of a ctx.exit()/Exit without standalone_mode
    except DgxvmError as exc:
        click.echo(f"dgxvm: error: {exc}", err=True)
        return exc.exit_code, True
    except click.exceptions.Abort:
        click.echo("dgxvm: aborted", err=True)
        return 1, True
    except click.ClickException as exc:
        # usage errors too are one `dgxvm: error:` line (scripts and Slurm logs grep for it)
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} -h')"
        click.echo(f"dgxvm: error: {exc.format_message()}{hint}", err=True)
        return (exc.exit_code if exc.exit_code else EXIT_BAD_INPUT), True
    except click.exceptions.Exit as exc:
        return exc.exit_code, False
    except Exception as exc:  # noqa: BLE001 - a bug: still one line (Slurm logs), the traceback on request
        if os.environ.get("DGXVM_DEBUG"):
            traceback.print_exc()
        if isinstance(exc, ModuleNotFoundError) and \
                (exc.name or "").split(".")[0] not in ("", "slurm_dgxvm"):
            # a host missing python3-libvirt (say): an installation fault, named with its
            # package; our own module missing stays a bug
            err = ModuleMissing(exc.name)
            click.echo(f"dgxvm: error: {err}", err=True)
            return err.exit_code, True
        click.echo(f"dgxvm: error: internal error: {type(exc).__name__}: {exc} "
                   f"(DGXVM_DEBUG=1 shows the traceback)", err=True)
        return EXIT_INTERNAL, True
    return 0, False


if __name__ == "__main__":
    sys.exit(main())
