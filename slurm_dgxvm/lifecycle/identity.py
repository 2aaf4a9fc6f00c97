"""Who a VM is for and what it is called: the host account it maps, the groups its guest account
gets, its hostname, and a Slurm job's VM name (:func:`domain_for` for a VM made for the job,
:func:`vm_of_job` for the one it has, which the Epilog and ``dgxvm run`` need)."""

from __future__ import annotations

import grp
import os
import pwd
import re
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import LedgerCorrupt, RequestError
from ..ledger import job_key
from ..names import account_name_problem

if TYPE_CHECKING:
    from .env import Env


def account(user: str | None) -> tuple[str, int, int, str]:
    """(name, uid, gid, home) of ``user`` (default: who ran sudo, else who runs this)."""
    name = user or os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise RequestError(reason=f"no user {name!r} on this host") from None
    problem = account_name_problem(pw.pw_name)
    if problem:
        raise RequestError(reason=f"user {pw.pw_name!r} cannot be a VM's account: {problem}")
    home = pw.pw_dir if pw.pw_uid != 0 else "/root"
    return pw.pw_name, pw.pw_uid, pw.pw_gid, home


def group_names(gids: tuple[int, ...]) -> tuple[tuple[str, int], ...]:
    """(name, gid) of each supplementary group as the guest gets it: the host's name, or
    ``g<gid>`` for a gid without a name or with one a seed cannot carry (``domain users``)."""
    out = []
    for gid in gids:
        try:
            name = grp.getgrgid(gid).gr_name
        except (KeyError, OverflowError):
            name = ""
        out.append((name if account_name_problem(name) is None else f"g{gid}", gid))
    return tuple(out)


def hostname_for(name: str) -> str:
    """The guest's hostname: the domain name as a DNS label (``job_42.a`` -> ``job-42-a``)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "dgxvm"


def domain_for(cfg: Config, job_id: int) -> str:
    """The name a VM made for job ``job_id`` gets: ``[slurm] domain_prefix`` and the job id."""
    return f"{cfg.slurm.domain_prefix}{job_id}"


def vm_of_job(env: Env, job_id: int) -> str:
    """The VM of job ``job_id`` on this node: the one the job's ledger entry names, else the
    name a VM made for the job gets (:func:`domain_for`). The two differ for a VM that had its
    name before the job had it (libvirt renames only a domain that is shut off) and when the
    domain prefix changed since the job's Prolog. The ledger is every user's to read; one that
    cannot be read names nothing."""
    try:
        entry = env.ledger.read().allocations.get(job_key(job_id))
    except (LedgerCorrupt, OSError):
        entry = None
    if entry is not None and entry.domain:
        return entry.domain
    return domain_for(env.cfg, job_id)
