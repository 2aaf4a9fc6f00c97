"""``dgxvm version show``: versions of dgxvm and what it runs on (slurm_dgxvm.versions).
Registered by name in ``cli.main.LAZY_COMMANDS``."""

from __future__ import annotations

import json

import click


@click.group()
def version():
    """Versions of dgxvm and what it runs on."""


@version.command("show")
@click.option("--json", "as_json", is_flag=True)
def version_show(as_json):
    """Show dgxvm's version (as `nvidia-vm version show`)."""
    from ..versions import versions
    doc = versions()
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(f"dgxvm {doc['dgxvm']} (python {doc['python']})")


COMMANDS = (version,)
