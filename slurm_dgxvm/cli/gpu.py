"""``dgxvm gpu show|check|clear`` (the quarantine, docs/admin/operations.md)
and ``dgxvm health`` (Slurm's HealthCheckProgram). Registered by name in
``cli.main.LAZY_COMMANDS``."""

from __future__ import annotations

import getpass
import json
import os
import sys
import time

import click

from ..errors import DeviceStillFailing, DeviceUnknown, DgxvmError, SlurmCommandError
from ..host.node_health import check_host
from ..slurm import liveness
from ..slurm.commands import Slurm
from ..topology.model import FULL_PASSTHROUGH

#: the prefix of the Reason dgxvm health drains with: it resumes only nodes it drained itself
#: (as LBNL NHC does)
REASON_PREFIX = "dgxvm health:"


def _utc(epoch) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)) if epoch else "-"


def _devices(host):
    """(index or None, pci, kind) of every device dgxvm gives to VMs, GPUs first."""
    out = [(g.index, g.pci, "gpu") for g in host.gpus]
    if host.nvswitch_model == FULL_PASSTHROUGH:
        out += [(None, s.pci, "nvswitch") for s in host.nvswitches]
    return out


def _resolve(host, ident: str) -> str:
    ident = ident.strip()
    devs = _devices(host)
    if ident.isascii() and ident.isdigit():
        for index, pci, _kind in devs:
            if index == int(ident):
                return pci
    else:
        want = ident.lower() if ident.count(":") == 2 else f"0000:{ident.lower()}"
        for _index, pci, _kind in devs:
            if pci == want:
                return pci
    raise DeviceUnknown(pci=ident, hint=f" (GPUs: 0-{len(host.gpus) - 1} or their PCI "
                                        f"addresses; see `dgxvm gpu show`)")


def _admin() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


@click.group()
def gpu():
    """GPU (and NVSwitch) health: quarantine, resets, history."""


@gpu.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.pass_obj
def gpu_show(c, as_json):
    """Every GPU (and passed-through NVSwitch): free, held or quarantined, its resets and the
    reason history."""
    env = c.env
    host, known = env.host, env.health.read()
    held = {}
    for key, a in env.ledger.read().allocations.items():
        for pci in (*a.gpu_pcis, *a.nvswitches):
            held[pci] = key
    rows = []
    for index, pci, kind in _devices(host):
        d = known.get(pci)
        state = ("quarantined" if d is not None and d.quarantined
                 else ("held" if pci in held else "free"))
        rows.append({"index": index, "pci": pci, "kind": kind, "state": state,
                     "held_by": held.get(pci), "reason": d.reason if d else None,
                     "since": d.since if d else None, "job": d.job if d else None,
                     "vm": d.vm if d else None, "resets": d.resets if d else 0,
                     "last_reset": d.last_reset if d else None,
                     "history": list(d.history) if d else []})
    missing = [{"pci": m.pci, "slot": m.slot, "board": m.board} for m in host.missing_gpus]
    faults = (env.sysfs.simulated() or {}).get("faults", []) if host.simulated else []
    if as_json:
        click.echo(json.dumps({"simulated": host.simulated, "simulated_faults": faults,
                               "devices": rows, "missing": missing}, indent=2, sort_keys=True))
        return
    q = sum(r["state"] == "quarantined" for r in rows)
    head = f"GPU health on {host.display_name}"
    if host.simulated:
        head += f"  ** SIMULATED ({host.simulated}): signals from `dgxvm simulate` **"
    click.echo(head)
    click.echo(f"  {len(rows)} device(s): {q} quarantined, "
               f"{sum(r['state'] == 'held' for r in rows)} held, {len(missing)} missing"
               + ("  -> DEGRADED" if q or missing else ""))
    click.echo(f"{'IDX':>3}  {'PCI':<13} {'KIND':<8} {'STATE':<12} {'RESETS':>6}  "
               f"{'LAST RESET':<22} DETAIL")
    for r in rows:
        lr = r["last_reset"]
        last = (f"{lr.get('s', 0):.3f}s {'ok' if lr.get('ok') else 'FAILED'}"
                + (f" ({lr['method']})" if lr.get("method") else "")) if lr else "-"
        detail = (r["reason"] if r["state"] == "quarantined"
                  else (r["held_by"] or ""))
        state = r["state"].upper() if r["state"] == "quarantined" else r["state"]
        click.echo(f"{'' if r['index'] is None else r['index']:>3}  {r['pci']:<13} "
                   f"{r['kind']:<8} {state:<12} {r['resets']:>6}  {last:<22} {detail}")
    for m in missing:
        click.echo(f"  -  {m['pci']:<13} gpu      MISSING      (slot {m['slot']}: not on the "
                   f"PCI bus at discovery)")
    events = sorted(((e, r["pci"]) for r in rows for e in r["history"]),
                    key=lambda x: x[0].get("at") or 0)
    if events:
        click.echo("History")
        for e, pci in events:
            what = e.get("reason") or e.get("was") or ""
            job = f" (job {e['job']})" if e.get("job") else ""
            click.echo(f"  {_utc(e.get('at'))}  {pci}  {e.get('event')} by {e.get('by')}"
                       f"{job}: {what}")
    for f in faults:
        click.echo(f"  simulated fault: {f.get('gpu')} {f.get('kind')} at {f.get('at')}")


@gpu.command("check")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.pass_obj
def gpu_check(c, as_json):
    """Check every device no VM holds (at host start, or by hand); quarantine any that fails."""
    from ..health import check
    env = c.env
    host = env.host
    held = {p for a in env.ledger.read().allocations.values() for p in (*a.gpu_pcis,
                                                                        *a.nvswitches)}
    quarantined = env.health.quarantined()
    free = [p for _i, p, _k in _devices(host) if p not in held and p not in quarantined]
    result = check(env.sysfs, env.health, free, by="dgxvm gpu check")
    if as_json:
        click.echo(json.dumps({"checked": [{"pci": v.pci, "ok": v.ok, "reason": v.reason,
                                            "note": v.note} for v in result.verdicts],
                               "skipped_held": sorted(held),
                               "already_quarantined": sorted(quarantined),
                               "simulated": host.simulated}, indent=2, sort_keys=True))
        return
    for v in result.verdicts:
        click.echo(f"{v.pci}  {'ok' if v.ok else 'QUARANTINED: ' + (v.reason or '')}"
                   + (f"  ({v.note})" if v.note else ""))
    click.echo(f"checked {len(free)} free device(s): {len(result.newly)} newly quarantined; "
               f"{len(held)} held by VMs and {len(quarantined)} already quarantined not checked"
               + ("  (SIMULATED host)" if host.simulated else ""))


@gpu.command("clear")
@click.argument("device", metavar="ID")
@click.option("--note", default="", metavar="TEXT", help="Why (kept in the history).")
@click.option("--force", is_flag=True,
              help="Clear even when the device still fails its check now.")
@click.pass_obj
def gpu_clear(c, device, note, force):
    """Give the quarantined GPU or NVSwitch ID (index or PCI address) back to placement.

    The device is checked first (on the bus, config space readable); its AER counters as
    they read now become its new baseline."""
    from ..health import judge, probe
    env = c.env
    pci = _resolve(env.host, device)
    facts = probe(env.sysfs, pci)
    verdict = judge(facts, baseline=facts.aer)
    if not verdict.ok and not force:
        raise DeviceStillFailing(pci=pci, reason=verdict.reason)
    d = env.health.clear(pci, by=f"admin {_admin()}", facts=facts, note=note)
    click.echo(f"{pci}: cleared (resets so far: {d.resets}); it is offered to VMs again")


@click.command()
@click.option("--node", metavar="NAME",
              help="This node's name in Slurm. [default: $SLURMD_NODENAME, else hostname -s]")
@click.option("--no-drain", is_flag=True,
              help="Report only: never drain or resume the node in Slurm.")
@click.option("--no-gpu-check", is_flag=True,
              help="Do not probe the free GPUs (only the record of the quarantined ones).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.pass_obj
def health(c, node, no_drain, no_gpu_check, as_json):
    """Can this node serve GPU VMs? One line and exit 0 (yes) or 1 (no, and the node is
    drained with the reason), for slurm.conf's HealthCheckProgram."""
    env = c.env
    node = liveness.node_name(os.environ, node)
    hh = check_host(env, check_gpus=not no_gpu_check)
    slurm_note = ""
    if not no_drain:
        slurm_note = _drain_or_resume(Slurm(env.cfg.slurm), node, hh)
    if as_json:
        click.echo(json.dumps(hh.to_json() | {"node": node, "slurm": slurm_note},
                              indent=2, sort_keys=True))
    else:
        sim = " (SIMULATED host)" if hh.simulated else ""
        if hh.ok:
            cap = next((f.detail for f in hh.findings if f.check == "capacity"), "")
            # what works but is not whole (a VM whose partition Fabric Manager lost) is said too
            more = "".join(f"; {f.check}: {f.detail}" for f in hh.findings
                           if f.check != "capacity" and f.detail.startswith("DEGRADED"))
            click.echo(f"{REASON_PREFIX} {node} OK{sim}: {cap}{more}"
                       + (f"; {slurm_note}" if slurm_note else ""))
        else:
            f = hh.failed[0]
            click.echo(f"{_reason(hh)}{sim}; fix: {f.fix}"
                       + (f"; {slurm_note}" if slurm_note else ""))
    if not hh.ok:
        raise click.exceptions.Exit(1)


def _reason(hh) -> str:
    f = hh.failed[0]
    more = f" (+{len(hh.failed) - 1} more)" if len(hh.failed) > 1 else ""
    # one line, no '=' (scontrol's Reason= parsing), bounded
    text = f"{REASON_PREFIX} {f.check}: {f.detail}{more}".replace("\n", " ").replace("=", ":")
    return text[:250]


def _drain_or_resume(slurm: Slurm, node: str, hh) -> str:
    try:
        state, reason = slurm.node_state(node)
        if not hh.ok:
            if "DRAIN" in state and not reason.startswith(REASON_PREFIX):
                return f"node already drained ({reason or 'no reason'}): left as it is"
            slurm.drain(node, _reason(hh))
            return "node drained"
        if "DRAIN" in state and reason.startswith(REASON_PREFIX):
            slurm.resume(node)
            return "node resumed (dgxvm health had drained it)"
        return ""
    except SlurmCommandError as exc:
        print(f"dgxvm health: cannot reach Slurm: {exc}", file=sys.stderr)
        return "Slurm not reachable: node state unchanged"
    except DgxvmError as exc:
        return f"node state unchanged: {exc}"


COMMANDS = (gpu, health)
