"""``dgxvm share check``: can this node serve the job's work dir as the job's user
(shares.check). Registered by name in ``cli.main.LAZY_COMMANDS``."""

from __future__ import annotations

import json

import click

from .context import Context, pass_ctx


@click.group()
def share():
    """The job's work dir share (served as the job's user)."""


@share.command("check")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def share_check(c: Context, as_json):
    """Check that this node can serve shares as the job's user (virtiofsd, user namespaces,
    seccomp, the share roots). Exit 3 when it cannot."""
    from ..errors import EXIT_HOST
    from ..shares.check import node_findings
    rows = node_findings(c.config.vm)
    if as_json:
        click.echo(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        if not rows:
            click.echo("vm.share = \"none\": nothing is shared")
        for row in rows:
            click.echo(f"{'ok  ' if row.ok else 'FAIL'} {row.check}: {row.detail}")
    if not all(row.ok for row in rows):
        raise click.exceptions.Exit(EXIT_HOST)


COMMANDS = (share,)
