"""The nvidia-vm verbs: ``dgxvm create``, ``dgxvm delete``, ``dgxvm list``; and ``dgxvm hook``,
which libvirtd runs (etc/libvirt/hooks/qemu) so the ledger stays true under ``virsh``, and
(etc/libvirt/hooks/network) so dgxvm's network never runs without its firewall."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from .. import lifecycle, netfilter
from ..placement import Request
from ..ranges import format_index_list
from .params import GIB, MIB, WorkDir, request_flags


def _progress(name: str, verb: str):
    """Stages on stderr when it is a terminal (a Slurm log or a pipe gets only the result)."""
    if not sys.stderr.isatty():
        return lifecycle.quiet
    t0 = time.monotonic()

    def show(stage: str) -> None:
        click.echo(f"dgxvm: {verb} {name}: {stage} ... ({time.monotonic() - t0:.1f}s)", err=True)
    return show


@click.command()
@click.option("--gpu-count", type=click.IntRange(min=1), required=True, metavar="N",
              help="GPUs for the VM (a legal block size of the machine).")
@click.option("--gpu-index", type=click.IntRange(min=0), metavar="I",
              help="First GPU of the block (must be aligned); default: the best free block.")
@click.option("--domain", "name", required=True, metavar="NAME", help="The VM's domain name.")
@click.option("--image", metavar="NAME", help="Installed guest image (default: the default).")
@click.option("--vcpus", type=click.IntRange(min=1), help="Override the template's vCPUs.")
@click.option("--memory", type=MIB, metavar="SIZE", help="Override the template's memory (64G).")
@click.option("--disk-size", type=GIB, metavar="SIZE", help="OS disk size (GiB, or 100G).")
@click.option("--data-disk", type=GIB, metavar="SIZE", help="Add a data disk of this size.")
@click.option("--user", metavar="USER",
              help="Guest account and owner of the SSH key (default: who ran sudo, else you).")
@click.option("--workdir", type=WorkDir(),
              metavar="DIR", help="Share this directory into the guest at the same path.")
@click.option("--json", "as_json", is_flag=True, help="Print the VM record as JSON.")
@click.pass_obj
def create(c, gpu_count, gpu_index, name, image, vcpus, memory, disk_size, data_disk, user,
           workdir, as_json):
    """Create and boot a GPU VM (as `nvidia-vm create`), and wait until it is ready."""
    uname, uid, gid, home = lifecycle.account(user)
    req = lifecycle.CreateRequest(
        name=name, placement=Request(count=gpu_count, gpu_index=gpu_index, vcpus=vcpus,
                                     memory_mib=memory, disk_gib=disk_size),
        data_disk_gib=data_disk, image=image, owner="domain",
        user=uname, uid=uid, gid=gid, groups=tuple(os.getgrouplist(uname, gid)), home=home,
        workdir=workdir)
    with request_flags():
        rec = lifecycle.create(c.env, req, _progress(name, "create"))
    if as_json:
        click.echo(json.dumps(rec.to_json(), indent=2, sort_keys=True))
        return
    p = rec.placement
    vmdir = c.env.vms.dir(rec.name)
    click.echo(f"{rec.name}: running in {rec.boot_s:.1f}s; GPUs {format_index_list(p.gpus)} "
               f"(NUMA {format_index_list(p.numa_nodes)}), {p.vcpus} vCPUs, "
               f"{p.memory_mib} MiB, image {rec.image} {rec.image_version}")
    click.echo(f"  ssh -i {vmdir}/id_ed25519 -o UserKnownHostsFile={vmdir}/known_hosts "
               f"{rec.user}@{rec.address}")
    for line in rec.fitted:
        click.echo(f"  fitted to this host: {line}")


@click.command()
@click.option("--domain", "name", required=True, metavar="NAME", help="The VM's domain name.")
@click.pass_obj
def delete(c, name):
    """Shut down and delete a VM with its drives; release its GPUs (as `nvidia-vm delete`)."""
    rec = lifecycle.delete(c.env, name, _progress(name, "delete"))
    if rec is None:
        click.echo(f"{name}: cleaned up (it had no record)")
    else:
        click.echo(f"{name}: deleted in {rec.teardown_s:.2f}s, {rec.ended}")


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.pass_obj
def list_cmd(c, as_json):
    """List dgxvm's VMs: GPUs, NUMA nodes, state, uptime, job."""
    rows = lifecycle.list_vms(c.env)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=2, sort_keys=True))
        return
    if not rows:
        click.echo("no VMs")
        return
    head = f"{'DOMAIN':<20} {'STATE':<12} {'GPUS':<10} {'NUMA':<5} {'VCPUS':>5} {'MEMORY':>9} " \
           f"{'ADDRESS':<15} {'UPTIME':>8} {'JOB':>7}  IMAGE"
    click.echo(head)
    for r in rows:
        up = _duration(r.uptime_s) if r.uptime_s is not None else "-"
        state = r.state
        if r.state == "running" and not r.held:
            state += "!"                 # running but not in the ledger: the hook is missing
        elif r.state == "shut-off" and not r.held:
            state = "off,freed"          # virsh shutdown: GPUs/CPUs free, drives kept
        click.echo(f"{r.name:<20} {state:<12} {format_index_list(r.gpus):<10} "
                   f"{format_index_list(r.numa_nodes):<5} {r.vcpus or '-':>5} "
                   f"{str(r.memory_mib) + 'M':>9} {r.address or '-':<15} {up:>8} "
                   f"{r.job_id if r.job_id is not None else '-':>7}  {r.image or '-'}")
    if any(r.state == "running" and not r.held for r in rows):
        click.echo("\n'!': running but not held in the ledger; install etc/libvirt/hooks/qemu "
                   "(docs/admin/install.md, The libvirt hooks) so virsh start/shutdown keep the ledger true")
    fitted = [r for r in rows if r.fitted]
    if fitted:
        click.echo(f"\n{len(fitted)} VM(s) fitted to this host (simulated machine): passthrough "
                   f"and sizes changed; `dgxvm list --json` lists each change")


def _duration(s: float) -> str:
    s = int(s)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@click.command(hidden=True)
@click.argument("driver")
@click.argument("name")
@click.argument("op")
@click.argument("sub_op")
@click.argument("extra", nargs=-1)
@click.pass_obj
def hook(c, driver, name, op, sub_op, extra):
    """libvirtd's hooks: `dgxvm hook qemu DOMAIN OP SUBOP -` (etc/libvirt/hooks/qemu) and
    `dgxvm hook network NETWORK OP SUBOP -` with the network's XML on stdin
    (etc/libvirt/hooks/network)."""
    if driver == "network":
        cfg = c.env.cfg
        line = netfilter.network_hook(name, op, sub_op, sys.stdin.read,
                                      own_network=cfg.libvirt.network,
                                      services=cfg.host_services)
    elif driver == "qemu":
        line = lifecycle.hook(c.env, name, op, sub_op)
    else:
        return
    if line:
        click.echo(f"dgxvm hook: {line}", err=True)


COMMANDS = (create, delete, list_cmd, hook)
