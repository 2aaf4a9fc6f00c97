"""``dgxvm host check|setup|revert``: is this host ready for GPU VMs, and making it so
(:mod:`slurm_dgxvm.host`)."""

from __future__ import annotations

import json

import click

from .context import pass_ctx

_ROOTS = "dgxvm.host.roots"


@click.group()
@click.option("--etc-root", metavar="DIR", envvar="DGXVM_ETC_ROOT",
              help="Where /etc is (modprobe.d, systemd, libvirt hooks, slurm). [env "
                   "DGXVM_ETC_ROOT; default /etc, or etc/ inside a simulated sysfs root]")
@click.option("--proc-root", metavar="DIR", envvar="DGXVM_PROC_ROOT",
              help="Where /proc is. [default /proc, or proc/ inside a simulated sysfs root]")
@click.option("--dev-root", metavar="DIR", envvar="DGXVM_DEV_ROOT",
              help="Where /dev is. [default /dev, or dev/ inside a simulated sysfs root]")
@click.pass_context
def host(ctx, etc_root, proc_root, dev_root):
    """Check whether this host can run GPU VMs; prepare it; undo that."""
    ctx.meta[_ROOTS] = {"etc": etc_root, "proc": proc_root, "dev": dev_root}


def _roots(c):
    from ..host.roots import HostRoots
    cfg = c.config
    return HostRoots.make(cfg.host.sysfs_root, cfg.host.state_dir,
                          **click.get_current_context().meta[_ROOTS])


def _sim(roots) -> str:
    return f"SIMULATED host ({roots.simulated}): " if roots.simulated else ""


@host.command("check")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@pass_ctx
def check(c, as_json):
    """Say, check by check, whether this host can run GPU VMs, with the fix for each failure.

    Exit 0 when nothing FAILs (WARNs are said, not failed), 1 when something does."""
    from ..host.check import Probes, check_host
    roots = _roots(c)
    report = check_host(roots, c.config, Probes.real(c.config))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        if roots.simulated:
            click.echo(f"{_sim(roots)}sysfs {roots.sysfs.root}, /proc {roots.proc}, "
                       f"/dev {roots.dev}, /etc {roots.etc}")
        for f in report.findings:
            click.echo(f"{f.status:<4} {f.check}: {f.detail}")
            if f.fix:
                click.echo(f"     fix: {f.fix}")
    if not report.ok:
        raise click.exceptions.Exit(1)


@host.command("setup")
@click.option("--dry-run", is_flag=True, help="Print every change; make none.")
@click.option("--dgxvm-path", metavar="PATH",
              help="The dgxvm the libvirt hook runs. [default: this one, as found on PATH]")
@pass_ctx
def setup(c, dry_run, dgxvm_path):
    """Bind the GPUs to vfio-pci, reserve huge pages, install the libvirt hook and gres.conf,
    now and at every boot; print what needs a reboot or an admin (the kernel command line).
    Every change is recorded for `dgxvm host revert`. Running it again changes nothing."""
    from ..host.kernel import for_roots
    from ..host.setup import apply, plan_setup
    roots = _roots(c)
    binder, pages = for_roots(roots)
    plan = plan_setup(roots, c.config, c.host, binder, pages, dgxvm_path=dgxvm_path)
    sim = _sim(roots)
    if not plan.changes:
        click.echo(f"{sim}nothing to change: this host is set up")
    elif dry_run:
        for ch in plan.changes:
            click.echo(f"{sim}would {ch.text}")
    else:
        apply(plan, roots, binder, pages, say=lambda t: click.echo(f"{sim}{t}"))
        click.echo(f"{sim}recorded in {roots.record_path}; `dgxvm host revert` undoes it")
    for m in plan.manual:
        click.echo(f"{sim}by hand: {m}")


@host.command("revert")
@click.option("--dry-run", is_flag=True, help="Print what would be undone; undo nothing.")
@pass_ctx
def revert_cmd(c, dry_run):
    """Undo every change `dgxvm host setup` recorded: the GPUs back on the host's driver, the
    huge page pools, the files as they were. Exit 0 (also with no record: nothing to undo);
    1 when something changed since setup and was left as it is."""
    from ..host.kernel import for_roots
    from ..host.setup import revert
    roots = _roots(c)
    binder, pages = for_roots(roots)
    sim = _sim(roots)
    prefix = "would " if dry_run else ""
    result = revert(roots, binder, pages, dry_run=dry_run,
                    say=lambda t: click.echo(f"{sim}{prefix if not t.startswith('left') else ''}{t}"))
    if not result.had_record:
        click.echo(f"{sim}nothing to revert: no setup record at {roots.record_path}")
    elif not result.left and not dry_run:
        click.echo(f"{sim}reverted; removed {roots.record_path}")
    if result.left:
        click.echo(f"{sim}{len(result.left)} change(s) left as they are (changed since setup); "
                   f"the record {roots.record_path} stays", err=True)
        raise click.exceptions.Exit(1)
