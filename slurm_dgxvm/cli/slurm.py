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

from ..errors import BadInput, DgxvmError
from ..records import KNOWN_HOSTS, USER_KEY
from ..slurm import hooks, log as hook_log
from ..slurm.commands import Slurm
from ..slurm.job import domain_for
from ..slurm.report import render, summarize


def _interruptible() -> None:
    """SIGTERM/SIGINT (slurmd giving up on the hook) unwind what was done, then exit; a second
    signal is ignored so that the cleanup itself is not cut short."""
    def handler(signum, _frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise hooks.Interrupted(signal=signal.Signals(signum).name)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


def _hook(c, which: str, run) -> None:
    _interruptible()
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line.replace("\n", " | "))   # one line per event
    try:
        env = c.env
        env.cfg  # noqa: B018 - read the config now: a bad one is this hook's failure
    except DgxvmError as exc:
        emit(f"dgxvm {which}: job {os.environ.get('SLURM_JOB_ID', '?')}: failed at reading the "
             f"config: {exc}; exit 1 drains the node")
        hook_log.write(lines, failed=True, setting="")
        raise click.exceptions.Exit(hooks.EXIT_DRAIN)
    rc = run(env, os.environ, Slurm(env.cfg.slurm), emit)
    hook_log.write(lines, failed=rc != 0, setting=env.cfg.slurm.log_file)
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
                   "DGXVM_USER, DGXVM_KEY, DGXVM_KNOWN_HOSTS, DGXVM_DOMAIN, DGXVM_SSH.")
@click.pass_obj
def job(c, job_id, as_json, as_env):
    """Show the VM of a job on this node: its address and how to reach it (for batch scripts)."""
    if job_id is None:
        raw = os.environ.get("SLURM_JOB_ID")
        if not raw or not raw.isdigit():
            raise BadInput("no job: give --job ID or run inside a Slurm job ($SLURM_JOB_ID)",
                           value=raw)
        job_id = int(raw)
    env = c.env
    name = domain_for(env.cfg, job_id)
    rec = env.vms.load(name)
    if rec is None or rec.state not in ("running", "stopped"):
        raise BadInput(f"job {job_id} has no VM on this node"
                       + (f" (it is {rec.state})" if rec else ""), value=job_id)
    vmdir = env.vms.dir(name)
    ssh = (f"ssh -i {vmdir / USER_KEY} -o UserKnownHostsFile={vmdir / KNOWN_HOSTS} "
           f"-o StrictHostKeyChecking=yes -o BatchMode=yes {rec.user}@{rec.address}")
    if as_json:
        doc = rec.to_json()
        doc.update(key=str(vmdir / USER_KEY), known_hosts=str(vmdir / KNOWN_HOSTS), ssh=ssh)
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    elif as_env:
        for k, v in (("DGXVM_DOMAIN", name), ("DGXVM_ADDRESS", rec.address),
                     ("DGXVM_USER", rec.user), ("DGXVM_KEY", str(vmdir / USER_KEY)),
                     ("DGXVM_KNOWN_HOSTS", str(vmdir / KNOWN_HOSTS)), ("DGXVM_SSH", ssh)):
            click.echo(f"export {k}={shlex.quote(v or '')}")
    else:
        p = rec.placement
        click.echo(f"job {job_id}: VM {name} ({rec.state}) at {rec.address}, GPUs "
                   f"{','.join(map(str, p.get('gpus', [])))}, image {rec.image}")
        click.echo(f"  {ssh}")


@click.command()
@click.option("--since", default="now-7days", show_default=True, metavar="TIME",
              help="Start of the period, in sacct's -S syntax (2026-11-01, now-1days, ...).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def report(c, since, as_json):
    """GPU-hours in VMs, jobs, median boot/teardown and failures per user and account (sacct)."""
    rows = Slurm(c.config.slurm).sacct(since=since)
    summaries = summarize(rows)
    if as_json:
        click.echo(json.dumps({"since": since, "users": [s.to_json() for s in summaries]},
                              indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(summaries, since))


COMMANDS = (prolog, epilog, job, report)
