"""``dgxvm reconcile``: compare the node's pieces (libvirt, the ledger, the VM directories,
DHCP reservations, Fabric Manager, Slurm's jobs here) and remove what belongs to no live job or
admin VM (:mod:`slurm_dgxvm.reconcile.plan` says what and why). Run at node start, by an
admin, and safe beside Prologs and Epilogs. Registered by name in ``cli.main.LAZY_COMMANDS``."""

from __future__ import annotations

import json
import os

import click

from ..reconcile import apply as reconciler
from ..names import shown
from ..slurm import liveness
from ..slurm.commands import Slurm


@click.command()
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.option("--rebuild-ledger", is_flag=True,
              help="Rebuild a corrupt ledger from libvirt's domains and the VM records (the "
                   "corrupt file is kept aside). Without it a corrupt ledger is only reported.")
@click.option("--node", metavar="NAME",
              help="This node's name in Slurm. [default: $SLURMD_NODENAME, else hostname -s]")
@click.pass_obj
def reconcile(c, dry_run, as_json, rebuild_ledger, node):
    """Remove what belongs to no live job or admin VM; print what and why."""
    env = c.env
    node = liveness.node_name(os.environ, node)
    jobs = liveness.jobs_on_node(Slurm(env.cfg.slurm), node)
    report = reconciler.run(env, jobs, dry_run=dry_run, rebuild_ledger=rebuild_ledger)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        for out in report.outcomes:
            click.echo(out.line())
            for line in out.finding.details:
                click.echo(f"  {shown(line)}")     # names from a user's cache among them
        click.echo(summary(report))
    if report.exit_code:
        raise click.exceptions.Exit(report.exit_code)


def summary(report: reconciler.Report) -> str:
    """The last line: consistent, or how many findings came to what."""
    head = f"reconcile {report.node}{' (dry run)' if report.dry_run else ''}: "
    if not report.outcomes:
        return head + "consistent, nothing to do"
    counts: dict[str, int] = {}
    for out in report.outcomes:
        counts[out.result] = counts.get(out.result, 0) + 1
    parts = ", ".join(f"{n} {result}" for result, n in counts.items())
    return head + f"{len(report.outcomes)} finding(s): {parts}; exit {report.exit_code}"


COMMANDS = (reconcile,)
