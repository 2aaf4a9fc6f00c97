"""``dgxvm topology show``, ``dgxvm plan`` and ``dgxvm gres-conf``: the host's GPUs, NVSwitches
and NUMA nodes, who holds what, where a VM would go, and the gres.conf of the host
(placement.report, placement, topology.gres). Registered by name in ``cli.main.LAZY_COMMANDS``."""

from __future__ import annotations

import sys

import click

from .context import Context, pass_ctx
from .params import GIB, GPU_LIST, MIB, request_flags


@click.group()
def topology():
    """The host's GPUs, NVSwitches, NUMA nodes and who holds what."""


@topology.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@pass_ctx
def topology_show(c: Context, as_json):
    """Show the host: GPUs per baseboard and NUMA node, NVSwitches, VM sizes, holders."""
    from ..placement import templates
    from ..placement.report import topology_doc
    from . import render
    host, state = c.host, c.ledger_state()
    quarantined = {p: d.reason or "" for p, d in c.env.health.quarantined().items()}
    if as_json:
        render.emit_json(topology_doc(host, state, templates(host, c.policy), quarantined))
        return
    click.echo(render.topology_picture(host, state, templates(host, c.policy),
                                       color=sys.stdout.isatty(), quarantined=quarantined))


@click.command()
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
@click.option("--ib", type=click.Choice(["none", "vf", "port"]), default="none", show_default=True,
              help="InfiniBand beside each GPU, as a partition's ib: an SR-IOV VF or the whole "
                   "port of its nearest HCA.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@pass_ctx
def plan(c: Context, gpu_count, gpu_index, slurm_gpus, vcpus, memory, disk_size, ib, as_json):
    """Show where a VM would go, without taking anything."""
    from ..placement import Request, place
    from ..placement.report import plan_doc
    from . import render
    if gpu_index is not None and slurm_gpus is not None:
        raise click.UsageError("--gpu-index and --slurm-gpus exclude each other")
    request = Request(count=gpu_count, gpu_index=gpu_index, slurm_gpus=slurm_gpus, vcpus=vcpus,
                      memory_mib=memory, disk_gib=disk_size, ib=ib)
    host = c.host
    with request_flags():
        placement = place(host, c.ledger_state().occupancy(), request, c.policy)
    if as_json:
        render.emit_json(plan_doc(host, placement))
    else:
        click.echo(render.placement_text(host, placement))


@click.command("gres-conf")
@click.option("--dev-dir", default="/dev/vfio", show_default=True, metavar="DIR",
              help="Directory of the VFIO group devices.")
@click.option("--node-name", metavar="NAME", help="Prefix every line with NodeName=NAME.")
@pass_ctx
def gres_conf_cmd(c: Context, dev_dir, node_name):
    """Print a gres.conf for this host (File= per VFIO group, Cores= per socket)."""
    from ..topology.gres import gres_conf
    click.echo(gres_conf(c.host, dev_dir=dev_dir, node_name=node_name), nl=False)


COMMANDS = (topology, plan, gres_conf_cmd)
