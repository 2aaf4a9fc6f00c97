"""The Slurm verbs: ``dgxvm prolog`` / ``dgxvm epilog`` (what Slurm's Prolog= and Epilog= run,
through prolog/dgxvm-prolog and epilog/dgxvm-epilog), ``dgxvm job`` (a job's VM, for its batch
script) and ``dgxvm report`` (accounting per user and account)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys

import click

from ..errors import DgxvmError, Interrupted
from ..access.target import Target, job_from_env, view_for
from ..slurm import hooks, log as hook_log
from ..slurm.commands import Slurm
from ..slurm.report import render, summarize, summarize_nodes, summarize_stages


def _interruptible() -> None:
    """SIGTERM/SIGINT (slurmd giving up on the hook) unwind what was done, then exit; a second
    signal is ignored so that the cleanup itself is not cut short."""
    def handler(signum, _frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signal=signal.Signals(signum).name)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


def _hook(c, which: str, run) -> None:
    _interruptible()
    environ = os.environ          # the job as slurmd describes it: the hook and its log read it
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line.replace("\n", " | "))   # one line per event
    try:
        env = c.env
        env.cfg  # noqa: B018 - read the config now: a bad one is this hook's failure
    except DgxvmError as exc:
        emit(f"dgxvm {which}: job {environ.get('SLURM_JOB_ID', '?')}: failed at reading the "
             f"config: {exc}; exit 1 drains the node")
        hook_log.write(lines, failed=True, setting="", environ=environ)
        raise click.exceptions.Exit(hooks.EXIT_DRAIN) from None
    rc = run(env, environ, Slurm(env.cfg.slurm), emit)
    hook_log.write(lines, failed=rc != 0, setting=env.cfg.slurm.log_file, environ=environ)
    raise click.exceptions.Exit(rc)


@click.command()
@click.pass_obj
def prolog(c):
    """Slurm Prolog: carve and boot the job's VM (reads only Slurm's environment)."""
    _hook(c, "prolog", hooks.prolog)


@click.command()
@click.pass_obj
def epilog(c):
    """Slurm Epilog: tear the job's VM down, whatever state it is in (idempotent)."""
    _hook(c, "epilog", hooks.epilog)


@click.command()
@click.option("--job", "job_id", type=click.IntRange(min=1), metavar="ID",
              help="The job (default: $SLURM_JOB_ID).")
@click.option("--json", "as_json", is_flag=True, help="The VM record as JSON.")
@click.option("--env", "as_env", is_flag=True,
              help="Shell assignments: eval \"$(dgxvm job --env)\" sets DGXVM_ADDRESS, "
                   "DGXVM_USER, DGXVM_KEY, DGXVM_KNOWN_HOSTS, DGXVM_DOMAIN, DGXVM_SSH "
                   "(and DGXVM_FABRIC_ADDRESS for a multi-node job).")
@click.pass_obj
def job(c, job_id, as_json, as_env):
    """Show the VM of a job on this node: its address and how to reach it (for batch scripts);
    for a multi-node job, its job fabric and every node's VM on it."""
    job_id = job_from_env(job_id, os.environ)
    env = c.env
    view = view_for(env, job_id)
    name = view["name"]
    ssh = Target.from_view(job_id, view).shell_line()
    if as_json:
        click.echo(json.dumps({**view, "ssh": ssh}, indent=2, sort_keys=True))
    elif as_env:
        for k, v in (("DGXVM_DOMAIN", name), ("DGXVM_ADDRESS", view["address"]),
                     ("DGXVM_USER", view["user"]), ("DGXVM_KEY", view["key"]),
                     ("DGXVM_KNOWN_HOSTS", view["known_hosts"]), ("DGXVM_SSH", ssh)):
            click.echo(f"export {k}={shlex.quote(v or '')}")
        if view.get("job_fabric"):
            click.echo("export DGXVM_FABRIC_ADDRESS="
                       + shlex.quote(view["job_fabric"]["address"].split("/")[0]))
    else:
        click.echo(f"job {job_id}: VM {name} ({view['state']}) at {view['address']}, GPUs "
                   f"{','.join(map(str, view.get('gpus') or []))}, image {view['image']}")
        click.echo(f"  {ssh}")
        for key in ("share_refused", "image_cache_refused"):
            if view.get(key):
                click.echo(f"  not shared: {view[key]}")
        fabric = view.get("job_fabric")
        if fabric:
            click.echo(f"  job fabric: this is node {fabric['node']} (index {fabric['index']}), "
                       f"fabric address {fabric['address']}, mtu {fabric['mtu']}; the job's "
                       f"VMs by node:")
            for node, address in fabric["hosts"]:
                click.echo(f"    {node:<20} {name:<16} {address}")


@click.command()
@click.option("--since", default="now-7days", show_default=True, metavar="TIME",
              help="Start of the period, in sacct's -S syntax (2026-11-01, now-1days, ...).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def report(c, since, as_json):
    """GPU-hours in VMs, jobs, median boot/teardown and failures per user and account; VMs,
    GPU-hours and failures per node; each create/teardown stage's median and p95 (sacct)."""
    rows = Slurm(c.config.slurm).sacct(since=since)
    summaries, stages, nodes = summarize(rows), summarize_stages(rows), summarize_nodes(rows)
    if as_json:
        click.echo(json.dumps({"since": since, "users": [s.to_json() for s in summaries],
                               "stages": [s.to_json() for s in stages],
                               "nodes": [n.to_json() for n in nodes]},
                              indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(summaries, since, stages, nodes))


COMMANDS = (prolog, epilog, job, report)
