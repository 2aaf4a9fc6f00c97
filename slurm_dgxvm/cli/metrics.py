"""``dgxvm metrics``: this node's VMs, GPUs, stage times and failures for Prometheus, as a
textfile for node_exporter (:mod:`slurm_dgxvm.observe.metrics`). Registered by name in
``cli.main.LAZY_COMMANDS``."""

from __future__ import annotations

import sys

import click

from ..observe import metrics as metrics_mod, opstats


def _textfile(_ctx, _param, value: str) -> str:
    if value != "-" and not value.endswith(metrics_mod.TEXTFILE_SUFFIX):
        raise click.BadParameter(f"{value!r}: node_exporter's textfile collector reads only "
                                 f"files named *{metrics_mod.TEXTFILE_SUFFIX}")
    return value


@click.command()
@click.option("--textfile", default="-", show_default=True, metavar="PATH", callback=_textfile,
              help="Write the metrics here, replacing the file atomically: a *.prom file in "
                   "node_exporter's --collector.textfile.directory. '-': standard output.")
@click.pass_obj
def metrics(c, textfile):
    """This node for Prometheus: VMs by state, GPUs held/free/quarantined, stage times, failures."""
    env = c.env
    host = env.host
    text = metrics_mod.render(
        metrics_mod.collect(host, env.ledger.read(), env.vms, opstats.read(env.cfg.host.state_dir),
                            quarantined=frozenset(env.health.quarantined())),
        simulated=host.simulated)
    if textfile == "-":
        sys.stdout.write(text)
    else:
        metrics_mod.write_textfile(textfile, text)


COMMANDS = (metrics,)
