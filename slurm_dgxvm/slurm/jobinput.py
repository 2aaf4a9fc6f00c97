"""Every value a Slurm job controls, checked in one place before anything is allocated.

The job's user controls every sbatch option, so every value slurmd hands the Prolog is input
from the job: its environment (SLURM_JOB_*), its comment, its work dir, and which user and
groups it runs as. Slurm drains a node for any non-zero Prolog status, so a value the job got
wrong must never look like a fault of the node: every check here raises
:class:`JobInputError` (``what`` = the variable, ``value`` = the bad value, ``reason``), which
the Prolog turns into a refusal (the job is cancelled, exit 0, the node stays in service).

The one exception is a job id that is missing or not a job id: without it there is no job to
refuse, the hook was not run by slurmd for a job (:class:`NotAJob`, exit 1, as before). A
missing SLURM_JOB_UID / _GID / _USER is the same (slurmd always sets them).

What passes (see :mod:`slurm_dgxvm.names` for the name and path rules):

==========================  ========================================================================
SLURM_JOB_ID                decimal digits only, 1 .. 2**31-1
SLURM_JOB_UID, _GID         decimal digits only, 0 .. 2**32-2 (uid/gid 0: refused, root gets no VM)
SLURM_JOB_USER              a name the host accepts (john.doe, Alice, u2), and the name of
                            SLURM_JOB_UID in the host's passwd
SLURM_JOB_GID               a group that exists on the host
SLURM_JOB_GPUS              an index list, each index < 1024, no duplicates, at most 64
SLURM_JOB_WORK_DIR          absolute, UTF-8, no control character, normalised, <= 4095 bytes
SLURM_JOB_PARTITION         letters, digits, '.', '_', '-'; at most 64
SLURM_JOB_COMMENT           at most 4096 characters, no NUL (its dgxvm: words: job.parse_comment)
SLURM_NODELIST              printable ASCII, at most 65536 characters; a multi-node job's fabric
                            expands it and checks each name (jobnet.plan). slurmd 22.05 gives
                            the Prolog and Epilog this, not SLURM_JOB_NODELIST (read when it
                            is the one set)
==========================  ========================================================================
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Mapping

from ..config import PARTITION_NAME
from ..errors import GpuListError, JobInputError, NotAJob
from ..names import account_name_problem, path_problem
from ..ranges import parse_index_list

JOB_ID_MAX = 2 ** 31 - 1          # Slurm's job ids are 32-bit, MAX_JOB_ID is lower still
ID_MAX = 2 ** 32 - 2              # (uid_t)-1 is "no id"
GPU_INDEX_LIMIT = 1024
GPUS_MAX = 64
COMMENT_MAX = 4096
GROUPS_MAX = 1024                 # supplementary groups carried into the guest

_DECIMAL = re.compile(r"[0-9]{1,20}")


SHOWN_MAX = 200                   # characters of a bad value a log line repeats


def _refuse(what: str, value: object, reason: str) -> JobInputError:
    """The refusal of ``value``; a long value is named by its start and its length (one line
    in slurmd's log, not 10 KiB of it)."""
    if isinstance(value, str) and len(value) > SHOWN_MAX:
        value = f"{value[:SHOWN_MAX // 2]}... ({len(value)} characters)"
    return JobInputError(what=what, value=value, reason=reason)


def decimal(what: str, raw: str, lo: int, hi: int) -> int:
    """``raw`` as a plain decimal number in ``lo..hi`` (no sign, no space, no '_', ASCII digits
    only: ``int()`` alone would take ``' 42'``, ``'+42'``, ``'4_2'`` and ``'٤٢'``)."""
    if not _DECIMAL.fullmatch(raw):
        reason = "negative" if raw.startswith("-") and raw[1:].isdigit() else \
            "not a plain decimal number"
        raise _refuse(what, raw, reason)
    value = int(raw)
    if not lo <= value <= hi:
        raise _refuse(what, raw, f"out of range {lo}..{hi}")
    return value


def job_id(environ: Mapping[str, str]) -> int:
    """SLURM_JOB_ID; NotAJob when it is missing or not a job id (there is no job to refuse)."""
    raw = environ.get("SLURM_JOB_ID")
    if raw is None or raw == "":
        raise NotAJob(reason="SLURM_JOB_ID is not set")
    try:
        return decimal("SLURM_JOB_ID", raw, 1, JOB_ID_MAX)
    except JobInputError as exc:
        raise NotAJob(reason=f"SLURM_JOB_ID={raw!r} is not a job id ({exc.reason})") from None


def required(environ: Mapping[str, str], var: str) -> str:
    """A variable slurmd always sets for a job; NotAJob when it is missing."""
    raw = environ.get(var)
    if raw is None or raw == "":
        raise NotAJob(reason=f"{var} is not set")
    return raw


def account_name(what: str, value: str) -> str:
    problem = account_name_problem(value)
    if problem:
        raise _refuse(what, value, problem)
    return value


def gpus(raw: str | None) -> tuple[int, ...]:
    """SLURM_JOB_GPUS (``0,1,2,3``; ranges too); () when the job asked for no GPU."""
    text = (raw or "").strip()
    if not text:
        return ()
    what = "SLURM_JOB_GPUS"
    if len(text) > 8 * GPUS_MAX:
        raise _refuse(what, raw, f"longer than {8 * GPUS_MAX} characters")
    # bound every number before parse_index_list expands a range such as 0-4294967295
    for number in re.findall(r"[0-9]+", text):
        if len(number) > 4 or int(number) >= GPU_INDEX_LIMIT:
            raise _refuse(what, raw, f"GPU index {number} is not below {GPU_INDEX_LIMIT}")
    try:
        indices = parse_index_list(text)
    except GpuListError as exc:
        raise _refuse(what, raw, exc.reason) from None
    if len(indices) > GPUS_MAX:
        raise _refuse(what, raw, f"more than {GPUS_MAX} GPUs")
    return indices


def work_dir(raw: str | None) -> str | None:
    """SLURM_JOB_WORK_DIR, checked for its form only (whether it may be shared is the share
    policy's decision, in the lifecycle); None when unset."""
    if raw is None or raw == "":
        return None
    problem = path_problem(raw)
    if problem:
        raise _refuse("SLURM_JOB_WORK_DIR", raw, problem)
    return raw


def partition(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if not PARTITION_NAME.fullmatch(raw):
        raise _refuse("SLURM_JOB_PARTITION", raw,
                      "not a partition name (letters, digits, '.', '_', '-'; at most 64)")
    return raw


def comment(raw: str | None) -> str | None:
    """SLURM_JOB_COMMENT: free text; only its ``dgxvm:`` words are read (job.parse_comment)."""
    if raw is None or raw == "":
        return None
    if len(raw) > COMMENT_MAX:
        raise _refuse("SLURM_JOB_COMMENT", raw, f"longer than {COMMENT_MAX} characters")
    if "\0" in raw:
        raise _refuse("SLURM_JOB_COMMENT", raw, "contains NUL")
    return raw


NODELIST_MAX = 65536


NODELIST_VARS = ("SLURM_NODELIST", "SLURM_JOB_NODELIST")


def raw_nodelist(environ: Mapping[str, str]) -> str | None:
    """The job's node list as slurmd gives a Prolog or Epilog: ``SLURM_NODELIST`` (Slurm
    22.05 sets no SLURM_JOB_NODELIST there), else ``SLURM_JOB_NODELIST``."""
    for name in NODELIST_VARS:
        if environ.get(name):
            return environ[name]
    return None


def nodelist(raw: str | None) -> str | None:
    """SLURM_NODELIST: a Slurm hostlist expression (``dgx[01-04]``); its names are checked when
    a job fabric expands it (slurm_dgxvm.jobnet.plan)."""
    if raw is None or raw == "":
        return None
    if len(raw) > NODELIST_MAX:
        raise _refuse("SLURM_NODELIST", raw, f"longer than {NODELIST_MAX} characters")
    if not raw.isascii() or not raw.isprintable() or any(c.isspace() for c in raw):
        raise _refuse("SLURM_NODELIST", raw,
                      "must be printable ASCII without spaces (a hostlist such as dgx[01-04])")
    return raw


def host_account(user: str, uid: int, gid: int) -> tuple[str | None, tuple[int, ...]]:
    """(home, supplementary gids) of the job's user, checked against the host's passwd and group
    databases: the user must be the name of ``uid``, ``gid`` a group that exists, and neither
    may be 0 (root's jobs get no VM: the VM's account is the job's user).

    Raises JobInputError naming the value that does not match."""
    if uid == 0:
        raise _refuse("SLURM_JOB_UID", str(uid), "root's jobs get no VM (submit as a user)")
    if gid == 0:
        raise _refuse("SLURM_JOB_GID", str(gid), "jobs of group root get no VM")
    try:
        pw = pwd.getpwuid(uid)
    except (KeyError, OverflowError):
        raise _refuse("SLURM_JOB_UID", str(uid), "no such user on this host") from None
    if pw.pw_name != user:
        raise _refuse("SLURM_JOB_USER", user,
                      f"is not the name of SLURM_JOB_UID {uid} on this host ({pw.pw_name!r})")
    try:
        grp.getgrgid(gid)
    except (KeyError, OverflowError):
        raise _refuse("SLURM_JOB_GID", str(gid), "no such group on this host") from None
    try:
        listed = os.getgrouplist(user, gid)
    except OSError as exc:
        raise _refuse("SLURM_JOB_USER", user, f"cannot list the user's groups: {exc}") from None
    groups = tuple(sorted({g for g in listed if g != gid and g != 0}))
    if len(groups) > GROUPS_MAX:
        raise _refuse("SLURM_JOB_USER", user, f"in more than {GROUPS_MAX} groups")
    home = pw.pw_dir if pw.pw_dir and path_problem(pw.pw_dir) is None else None
    return home, groups
