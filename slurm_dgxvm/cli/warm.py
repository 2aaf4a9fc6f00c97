"""``dgxvm warm``: VMs booted ahead of the jobs that will claim them (slurm_dgxvm.lifecycle.warm).

``dgxvm warm boot`` boots one for a partition's job of N GPUs (the partition's sizes and image);
``dgxvm warm list`` shows the warm VMs no job has claimed; ``dgxvm warm refill`` boots what a
partition's ``warm`` policy lacks (the Epilog starts it after a job of that partition);
``dgxvm warm stop`` stops refills and deletes the warm VMs, ``dgxvm warm start`` allows refills
again. ``dgxvm delete --domain warm-N`` removes one.
"""

from __future__ import annotations

import json
import time

import click

from ..ranges import format_index_list


@click.group()
def warm():
    """VMs booted ahead of the jobs that claim them."""


@warm.command()
@click.option("--gpu-count", type=click.IntRange(min=1), required=True, metavar="N",
              help="GPUs of the jobs it is for (a legal block size of the machine).")
@click.option("--gpu-index", type=click.IntRange(min=0), metavar="I",
              help="First GPU of its block (aligned); default: the best free block.")
@click.option("--partition", metavar="NAME",
              help="The partition whose jobs it is for: their sizes and image (default: "
                   "[partitions.default]).")
@click.option("--json", "as_json", is_flag=True, help="Print the VM record as JSON.")
@click.pass_obj
def boot(c, gpu_count, gpu_index, partition, as_json):
    """Boot a warm VM: a job of this partition whose placement is its block claims it."""
    from ..lifecycle import warm as warm_mod
    from .params import request_flags
    with request_flags():
        rec = warm_mod.boot_for(c.env, partition or "default", gpu_count, gpu_index=gpu_index)
    if as_json:
        click.echo(json.dumps(rec.to_json(), indent=2, sort_keys=True))
        return
    p = rec.placement
    click.echo(f"{rec.name}: warm in {rec.boot_s:.1f}s; GPUs {format_index_list(p.gpus)} "
               f"(NUMA {format_index_list(p.numa_nodes)}), {p.vcpus} vCPUs, {p.memory_mib} MiB, "
               f"image {rec.image} {rec.image_version}")


@warm.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per warm VM.")
@click.pass_obj
def list_cmd(c, as_json):
    """The warm VMs no job has claimed yet."""
    from ..lifecycle import warm as warm_mod
    rows = []
    for name, a in sorted(warm_mod.waiting(c.env).items()):
        rec = c.env.vms.load(name)
        rows.append({"name": name, "gpus": list(a.gpus), "nvswitches": list(a.nvswitches),
                     "age_s": round(time.time() - a.created, 1),
                     "partition": rec.extra.get("partition", "") if rec else ""})
    if as_json:
        for r in rows:
            click.echo(json.dumps(r, sort_keys=True))
        return
    if not rows:
        click.echo("no warm VM")
    for r in rows:
        click.echo(f"{r['name']}  GPUs {format_index_list(r['gpus'])}  partition "
                   f"{r['partition'] or '-'}  waiting {r['age_s']:.0f}s")
    for pname, part in sorted(c.env.cfg.partitions.items()):
        if part.keeps_warm:
            counts = warm_mod.policy(c.env, pname)
            why = f"warm = {list(part.warm)}"
            if part.warm_recent:
                why += (f"; its last {part.warm_recent} jobs here: "
                        f"{warm_mod.recent(c.env, pname) or 'none yet'}")
            click.echo(f"partition {pname} keeps {counts or 'none'} GPU(s) warm ({why})")


@warm.command()
@click.option("--partition", metavar="NAME", default="default", show_default=True,
              help="The partition whose [partitions.NAME] warm policy to meet.")
@click.option("--node", metavar="NAME",
              help="This node's Slurm name, to ask its state (default: $SLURMD_NODENAME, "
                   "else the short host name).")
@click.pass_obj
def refill(c, partition, node):
    """Boot the warm VMs the partition's policy lacks on this node, one at a time, while the
    node is in service in Slurm and refills are not stopped."""
    import os
    from ..lifecycle import warm as warm_mod
    from ..slurm import liveness
    from ..slurm.commands import Slurm
    node = liveness.node_name(os.environ, node)
    slurm = Slurm(c.env.cfg.slurm)
    booted, why = warm_mod.refill(c.env, partition, lambda: slurm.node_state(node)[0],
                                  progress=lambda line: click.echo(f"{time.strftime('%F %T')} "
                                                                   f"{line}"))
    for name in booted:
        click.echo(f"{name}: warm for partition {partition}")
    click.echo(f"refill of partition {partition} on {node}: "
               + (f"stopped: {why}" if why else "the policy is met"))


@warm.command()
@click.pass_obj
def stop(c):
    """Stop refills on this node and delete its warm VMs (their GPUs go back to jobs)."""
    from ..lifecycle import warm as warm_mod
    gone = warm_mod.stop(c.env)
    click.echo("refills stopped; " + (f"deleted {', '.join(gone)}" if gone else "no warm VM"))


@warm.command()
@click.pass_obj
def start(c):
    """Allow refills again on this node (after dgxvm warm stop)."""
    from ..lifecycle import warm as warm_mod
    warm_mod.start(c.env)
    click.echo("refills allowed; the next job of a partition with a warm policy refills it "
               "(or run dgxvm warm refill)")
