"""``dgxvm``: the command line. Thin: build the context once, call the library, format the result.

Errors: library code raises DgxvmError subclasses; this module is the one place (with the Slurm
hooks, later) that turns them into one line on stderr and the error's exit code.

Start-up: ``dgxvm run`` runs once per task of a job, so this module imports only what every
command needs. The commands of the other cli modules are imported when they are looked up
(:class:`LazyGroup`), and the commands defined here import their library code when they run.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import __version__
from .. import config as config_mod
from ..errors import DgxvmError, EXIT_BAD_INPUT, EXIT_INTERNAL, ModuleMissing
from .params import GIB, GPU_LIST, MIB, request_flags

if TYPE_CHECKING:
    from ..ledger import Ledger
    from ..placement import Policy


class Context:
    """What every command needs, built lazily once: config, host model, ledger."""

    def __init__(self, config_path: str | None, sysfs_root: str | None, state_dir: str | None):
        self._config_path = config_path
        self._sysfs_root = sysfs_root
        self._state_dir = state_dir

    @cached_property
    def config(self) -> config_mod.Config:
        return config_mod.load(self._config_path).with_overrides(
            sysfs_root=self._sysfs_root, state_dir=self._state_dir)

    @cached_property
    def env(self):
        """The library's environment on this config: host model, ledger, policy, and for the VM
        verbs libvirt, images and VM records (all built lazily, once)."""
        from ..lifecycle import Env
        return Env(self.config)

    @property
    def host(self):
        return self.env.host

    @property
    def ledger(self) -> Ledger:
        return self.env.ledger

    @property
    def policy(self) -> Policy:
        return self.env.policy

    def ledger_state(self):
        """The ledger for display; a state dir that does not exist yet is an empty ledger."""
        return self.ledger.read()

    def image_users(self) -> dict[str, list[str]]:
        return self.env.image_users()


pass_ctx = click.make_pass_decorator(Context)

#: the exit status of every failure of dgxvm itself when the verb passes a command's status
#: through (``dgxvm run``/``shell``: 125); None: each error's own code
_failure_code: int | None = None

#: the commands defined in the other cli modules: name -> "module:attribute", relative to this
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
    global _failure_code
    ctx.obj = Context(config_path, sysfs_root, state_dir)
    if ctx.invoked_subcommand in PRELOADED and not ctx.resilient_parsing:
        from ..preload import preload
        preload()
    if LAZY_COMMANDS.get(ctx.invoked_subcommand or "", "").startswith(".run:"):
        from . import run as run_cli   # imported already: click looks a command up first
        if ctx.invoked_subcommand in run_cli.VERBS:
            # dgxvm run's own status is the command's: dgxvm's failures must not look like one
            _failure_code = run_cli.EXIT_RUN_FAILED


# -- topology --------------------------------------------------------------------------------------
@cli.group()
def topology():
    """The host's GPUs, NVSwitches, NUMA nodes and who holds what."""


@topology.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@pass_ctx
def topology_show(c: Context, as_json):
    """Show the host: GPUs per baseboard and NUMA node, NVSwitches, VM sizes, holders."""
    from ..placement import templates
    from . import render
    host, state = c.host, c.ledger_state()
    quarantined = {p: d.reason or "" for p, d in c.env.health.quarantined().items()}
    if as_json:
        doc = host.to_json()
        holders = render.holders(state)
        for g in doc["gpus"]:
            g["held_by"] = holders.get(g["pci"])
            g["quarantined"] = quarantined.get(g["pci"])
        for s in doc["nvswitches"]:
            s["held_by"] = holders.get(s["pci"])
            s["quarantined"] = quarantined.get(s["pci"])
        doc["degraded"] = bool(quarantined or host.missing_gpus)
        doc["allocations"] = {k: a.to_json() for k, a in state.allocations.items()}
        doc["vm_sizes"] = [t.__dict__ | {"numa_nodes": list(t.numa_nodes)}
                           for t in templates(host, c.policy)]
        _emit_json(doc)
        return
    click.echo(render.topology_picture(host, state, templates(host, c.policy),
                                       color=sys.stdout.isatty(), quarantined=quarantined))


# -- plan ------------------------------------------------------------------------------------------
@cli.command()
@click.option("--gpu-count", type=click.IntRange(min=1), required=True, metavar="N",
              help="GPUs for the VM (a legal block size of the machine).")
@click.option("--gpu-index", type=click.IntRange(min=0), metavar="I",
              help="First GPU of the block, as nvidia-vm's --gpu-index (must be aligned).")
@click.option("--slurm-gpus", type=GPU_LIST, metavar="LIST",
              help="The indices Slurm chose (SLURM_JOB_GPUS), e.g. 5,6,7,11.")
@click.option("--vcpus", type=click.IntRange(min=1), help="Override the template's vCPUs.")
@click.option("--memory", type=MIB, metavar="SIZE",
              help="Override the template's memory (64G, 512M, or MiB).")
@click.option("--disk-size", type=GIB, metavar="SIZE", help="Override the OS disk size (GiB).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@pass_ctx
def plan(c: Context, gpu_count, gpu_index, slurm_gpus, vcpus, memory, disk_size, as_json):
    """Show where a VM would go, without taking anything."""
    from ..placement import Request, place
    from . import render
    if gpu_index is not None and slurm_gpus is not None:
        raise click.UsageError("--gpu-index and --slurm-gpus exclude each other")
    request = Request(count=gpu_count, gpu_index=gpu_index, slurm_gpus=slurm_gpus, vcpus=vcpus,
                      memory_mib=memory, disk_gib=disk_size)
    host = c.host
    with request_flags():
        placement = place(host, c.ledger_state().occupancy(), request, c.policy)
    if as_json:
        doc = placement.to_json()
        doc["simulated"] = host.simulated
        _emit_json(doc)
    else:
        click.echo(render.placement_text(host, placement))


# -- gres.conf -------------------------------------------------------------------------------------
@cli.command("gres-conf")
@click.option("--dev-dir", default="/dev/vfio", show_default=True, metavar="DIR",
              help="Directory of the VFIO group devices.")
@click.option("--node-name", metavar="NAME", help="Prefix every line with NodeName=NAME.")
@pass_ctx
def gres_conf_cmd(c: Context, dev_dir, node_name):
    """Print a gres.conf for this host (File= per VFIO group, Cores= per socket)."""
    from ..topology.gres import gres_conf
    click.echo(gres_conf(c.host, dev_dir=dev_dir, node_name=node_name), nl=False)


# -- simulate --------------------------------------------------------------------------------------
@cli.command()
@click.argument("machine", metavar="[MACHINE]", required=False)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Directory to write MACHINE's sysfs tree into (empty, or an earlier simulation).")
@click.option("--missing-gpu", "missing", multiple=True, metavar="PCI",
              help="Leave this GPU off the bus (a GPU that failed to enumerate). Repeatable.")
@click.option("--unknown-numa", "unknown_numa", multiple=True, metavar="PCI",
              help="Make this device's numa_node read -1 (a BIOS quirk). Repeatable.")
@click.option("--fault", "fault_specs", multiple=True, metavar="GPU:KIND",
              help="Inject a fault into GPU (an index or a PCI address): with MACHINE into the "
                   "new tree, without it into the tree of --into. Repeatable; GPU indices count "
                   "the GPUs on the bus before the first fault.")
@click.option("--into", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="An existing simulated tree to inject the --fault's into (no MACHINE): "
                   "nothing is re-rendered, earlier faults and AER counts stay.")
def simulate(machine, out, missing, unknown_numa, fault_specs, into):
    """Write the sysfs tree of a known machine (dgx2, dgx-a100, dgx-h100), or inject GPU faults.

    \b
    dgxvm simulate MACHINE --out DIR [--fault GPU:KIND]...
    dgxvm simulate --fault GPU:KIND [--fault GPU:KIND]... --into DIR

    The tree is for --sysfs-root. A fault changes the files a real host shows changed for a GPU
    bound to vfio-pci, and the tree's simulation marker records it. KIND:

    \b
      fell-off-bus     config reads all ones (vendor 0xffff): the GPU fell off the bus (Xid 79)
      aer-fatal        aer_dev_fatal: MalfTLP and TOTAL_ERR_FATAL + 1
      aer-nonfatal     aer_dev_nonfatal: CmpltTO and TOTAL_ERR_NONFATAL + 1
      aer-correctable  aer_dev_correctable: RxErr and TOTAL_ERR_COR + 1 (alone, no cause to quarantine)
      reset-fail       writing 1 to reset fails (OSError, EISDIR): the kernel refuses the reset
      reset-hang       opening reset for writing blocks: a reset that never returns
      missing          the GPU leaves the bus (sys/bus/pci/devices/<pci> goes)
      clear            undo every fault on the GPU (AER counters stay, as on a real host)
    """
    from ..simulate import FAULT_KINDS, MACHINES, inject_all, parse_fault, render as render_tree
    from ..topology.sysfs import SIMULATED_MARKER
    if machine is not None and into is not None:
        raise click.UsageError("MACHINE writes a new tree (--out DIR); --into DIR injects faults "
                               "into an existing one: give one of them")
    if machine is None and (out is not None or missing or unknown_numa):
        raise click.UsageError("missing MACHINE: --out, --missing-gpu and --unknown-numa write "
                               "a new tree")
    if machine is None and into is None:
        raise click.UsageError("give MACHINE --out DIR, or --fault GPU:KIND --into DIR")
    if machine is not None and out is None:
        raise click.UsageError("MACHINE needs --out DIR")
    if into is not None and not fault_specs:
        raise click.UsageError("--into DIR needs at least one --fault GPU:KIND "
                               f"(kinds: {', '.join(FAULT_KINDS)})")
    faults = []
    for spec in fault_specs:
        try:
            faults.append(parse_fault(spec))
        except DgxvmError as exc:
            raise click.BadParameter(exc.reason, param_hint="--fault") from None
    if into is not None:
        root, records = into, inject_all(into, faults)
    else:
        if machine not in MACHINES:
            raise click.BadParameter(f"{machine!r} is not a known machine "
                                     f"(known: {', '.join(MACHINES)})", param_hint="MACHINE")
        root = render_tree(machine, out, missing_gpus=missing, unknown_numa=unknown_numa,
                           faults=faults)
        records = json.loads((root / SIMULATED_MARKER).read_text()).get("faults", [])
        click.echo(f"simulated {machine} written to {root}; use: dgxvm --sysfs-root {root} "
                   "topology show")
    for r in records:
        click.echo(f"fault {r['kind']} on GPU {r['gpu']} (simulated), recorded in "
                   f"{root / SIMULATED_MARKER}")


# -- VMs and images (the nvidia-vm verbs), the Slurm verbs, run and shell: LAZY_COMMANDS above ------


# -- shares ----------------------------------------------------------------------------------------
@cli.group()
def share():
    """The job's work dir share (served as the job's user)."""


@share.command("check")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def share_check(c: Context, as_json):
    """Check that this node can serve shares as the job's user (virtiofsd, user namespaces,
    seccomp, the share roots). Exit 3 when it cannot."""
    from ..errors import EXIT_HOST
    from ..shares.check import findings
    vm = c.config.vm
    rows = findings(vm.virtiofsd, vm.share_roots) if vm.share != "none" else []
    if as_json:
        click.echo(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        if not rows:
            click.echo("vm.share = \"none\": nothing is shared")
        for row in rows:
            click.echo(f"{'ok  ' if row.ok else 'FAIL'} {row.check}: {row.detail}")
    if not all(row.ok for row in rows):
        raise click.exceptions.Exit(EXIT_HOST)


# -- version ---------------------------------------------------------------------------------------
@cli.group()
def version():
    """Versions of dgxvm and what it runs on."""


@version.command("show")
@click.option("--json", "as_json", is_flag=True)
def version_show(as_json):
    """Show dgxvm's version (as `nvidia-vm version show`)."""
    import platform
    doc = {"dgxvm": __version__, "python": platform.python_version(),
           "click": _dist_version("click")}
    try:
        import libvirt  # noqa: F401  (optional until the VM lifecycle lands)
        doc["libvirt_python"] = libvirt.getVersion()
    except Exception:
        doc["libvirt_python"] = None
    if as_json:
        _emit_json(doc)
    else:
        click.echo(f"dgxvm {__version__} (python {doc['python']})")


def _dist_version(name: str) -> str | None:
    # click.__version__ is deprecated (a DeprecationWarning on every call, gone in click 9.1)
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _emit_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def main(argv=None) -> int:
    """Entry point: run the CLI, turning our errors into one line and an exit code (for
    ``dgxvm run``/``shell``, every failure of dgxvm itself is 125: their status is the
    command's)."""
    global _failure_code
    _failure_code = None
    rc, failed = _main(argv)
    return _failure_code if failed and _failure_code is not None else rc


def _main(argv) -> tuple[int, bool]:
    """(exit code, whether dgxvm itself failed)."""
    try:
        rv = cli.main(args=argv, prog_name="dgxvm", standalone_mode=False)
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
    except Exception as exc:  # a bug: still one line (Slurm logs), the traceback on request
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
