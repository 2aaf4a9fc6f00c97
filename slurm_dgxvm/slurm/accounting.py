"""The VM record of a job in Slurm's own accounting: the job's AdminComment.

The Prolog writes it with ``scontrol update job=ID AdminComment=...`` once the VM is up (or
refused); the Epilog, after the job has ended, can only use ``sacctmgr -i modify job``, which
turns ``"`` and ``'`` into backticks and lowercases the whole value (seen: ``%3B`` came back as
``%3b``). So the record is a line of ``key=value`` words whose values are percent-encoded,
capitals included (no quote, space, ``|``, ``%`` or capital letter appears raw), and it survives
both paths::

    dgxvm/1 state=ended domain=job-42 gpus=8-11 slurm_gpus=0-3 aligned=yes ...

``sacct -j 42 -o JobID,AdminComment%600`` shows it; :func:`decode` reads it back (``dgxvm
report``). Writing it is best effort: a failure is logged and never fails the job.

The stages' times (:mod:`slurm_dgxvm.observe.stages`) are two words, ``create_stages`` and
``teardown_stages``, of ``stage:seconds`` pairs joined with ``,`` in the order they ran, the
seconds to the ms without trailing zeros (``placement:0.004,seed:1.52,...``): about 110 and
45 characters, nothing to escape. Records written before them have neither;
:func:`parse_stages` reads a missing or damaged word as no stages.

A job on several nodes has one VM per node, each with its own record, ``node=NAME`` in each,
joined with ``;`` (never in a record: it is escaped) in one AdminComment. Each node's Prolog and
Epilog writes only its own record into what it reads (:func:`merge`) and reads it back until
its record has stayed there (:func:`converge`): Slurm has no append, so two nodes writing at
once would otherwise keep only the last one's.

After the teardown's GPU reset (:mod:`slurm_dgxvm.health`): ``reset_max_s``, the slowest
device's reset, and ``quarantined``, the devices the check after it quarantined with the reason
(``0000:34:00.0 (reset failed: ...)``): the job that was on a GPU that failed says so.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from urllib.parse import unquote

from ..ranges import format_index_list
from ..records import VmRecord
from ..observe.stages import ordered

PREFIX = "dgxvm/1"
SEP = ";"                   # between the records of a multi-node job's VMs (escaped in values)
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._~:@+/,")   # everything else is %XX


def _escape(value: str) -> str:
    """%XX (UTF-8) for every character outside _SAFE: capitals too, sacctmgr lowercases."""
    return "".join(ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode())
                   for ch in value)

# Order of the keys in the line (readability in sacct); unknown keys follow.
KEYS = ("node", "state", "domain", "gpus", "slurm_gpus", "aligned", "remapped", "nvswitches", "fm",
        "image", "vcpus", "memory_mib", "numa", "address", "boot_s", "lock_s", "teardown_s",
        "held_s", "create_stages", "teardown_stages", "reset_max_s", "quarantined", "ended",
        "fitted", "warm", "claim_s", "cause", "containers")


def encode(fields: dict) -> str:
    keys = [k for k in KEYS if k in fields] + sorted(k for k in fields if k not in KEYS)
    words = [PREFIX]
    for key in keys:
        value = fields[key]
        if value is None:
            continue
        if isinstance(value, bool):
            value = "yes" if value else "no"
        words.append(f"{key}={_escape(str(value))}")
    return " ".join(words)


def decode(text: str | None) -> dict | None:
    """The fields of an AdminComment written by :func:`encode` (the first node's, for a
    multi-node job: :func:`decode_all` has every one); None when it is not ours."""
    records = decode_all(text)
    return records[0] if records else None


def decode_all(text: str | None) -> list[dict]:
    """Every record of an AdminComment (one per node that wrote one); [] when it is not ours.
    A part that is not a dgxvm record is left out."""
    if not text:
        return []
    out = []
    for part in text.split(SEP):
        words = part.split()
        if not words or words[0] != PREFIX:
            continue
        rec = {}
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if eq:
                rec[key] = unquote(value)
        out.append(rec)
    return out


def merge(text: str | None, node: str, fields: dict) -> str:
    """``text`` (an AdminComment) with ``node``'s record replaced by ``fields`` (``node`` set),
    every other node's kept, ordered by node name; a record without a node (one a single-node
    job's Prolog wrote) is kept first."""
    mine = encode({**fields, "node": node})
    others = [r for r in decode_all(text) if r.get("node") != node]
    records = [encode(r) for r in others] + [mine]
    return f" {SEP} ".join(sorted(records, key=lambda r: (decode(r) or {}).get("node", "")))


def record_of(text: str | None, node: str) -> dict | None:
    for rec in decode_all(text):
        if rec.get("node") == node:
            return rec
    return None


#: after writing, the record is read back after each of these (seconds, x0.5-1.5 at random);
#: it must be there every time. Longer than a read-modify-write of another node takes, so one
#: that read before our write and wrote after it is seen, and our record written again.
CONFIRM_AFTER_S = (0.25, 1.0)
CONVERGE_TRIES = 8


def converge(read: Callable[[], str | None], write: Callable[[str], None], node: str,
             fields: dict, *, sleep: Callable[[float], None] = time.sleep,
             confirm_after: tuple[float, ...] = CONFIRM_AFTER_S,
             tries: int = CONVERGE_TRIES) -> int:
    """Write ``node``'s record into the AdminComment that ``read`` returns, keeping every other
    node's, until it has been read back unchanged after each of ``confirm_after``. Returns the
    number of writes. Raises SlurmCommandError (from ``read`` or ``write``), or a
    SlurmCommandError when other writers kept overwriting it for ``tries`` reads."""
    from ..errors import SlurmCommandError
    want = decode(encode({**fields, "node": node}))
    writes = confirmed = 0
    for _ in range(tries):
        current = read()
        if record_of(current, node) == want:
            confirmed += 1
            if confirmed > len(confirm_after):
                return writes
        else:
            confirmed = 1
            write(merge(current, node, fields))
            writes += 1
        sleep(confirm_after[confirmed - 1] * random.uniform(0.5, 1.5))
    raise SlurmCommandError(command="AdminComment", reason=f"node {node}'s record was "
                            f"overwritten {tries} times by other nodes' writes")


def format_stages(stages: dict[str, float], op: str) -> str | None:
    """``stage:seconds,...`` in the order ``op`` runs them (None for no stages: no word)."""
    if not stages:
        return None
    return ",".join(f"{name}:{_seconds(s)}" for name, s in ordered(stages, op))


def _seconds(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def parse_stages(text: str | None) -> dict[str, float]:
    """The stages of a ``create_stages`` / ``teardown_stages`` value; {} for none. A pair that
    does not parse is left out (a damaged record loses that stage, not the report)."""
    out = {}
    for pair in (text or "").split(","):
        name, colon, value = pair.partition(":")
        try:
            seconds = float(value)
        except ValueError:
            continue
        if colon and name and seconds >= 0 and seconds != float("inf"):
            out[name] = seconds
    return out


def vm_fields(rec: VmRecord, *, state: str) -> dict:
    """The accounting fields of a VM record (``state``: running, ended)."""
    a, p = rec.allocation, rec.placement
    return {
        "state": state, "domain": rec.name,
        "gpus": format_index_list(a.gpus),
        "slurm_gpus": format_index_list(a.slurm_gpus) if a.slurm_gpus else None,
        "aligned": p.aligned, "remapped": p.remapped,
        "nvswitches": ",".join(a.nvswitches) or None,
        "fm": a.fm_partition,
        "image": f"{rec.image}@{rec.image_version}",
        "vcpus": p.vcpus, "memory_mib": p.memory_mib,
        "numa": format_index_list(p.numa_nodes),
        "address": rec.address, "boot_s": rec.boot_s, "lock_s": rec.lock_s,
        "teardown_s": rec.teardown_s,
        "held_s": rec.held_s, "ended": rec.ended,
        "create_stages": format_stages(rec.create_stages, "create"),
        "teardown_stages": format_stages(rec.teardown_stages, "teardown"),
        # the slowest of the teardown's GPU/NVSwitch resets (they run in parallel), and the
        # devices its check quarantined, each with why: "pci (reason); ..."
        "reset_max_s": max(rec.gpu_resets.values()) if rec.gpu_resets else None,
        "quarantined": "; ".join(f"{p} ({r})" for p, r in rec.quarantined.items()) or None,
        "fitted": bool(rec.fitted) or None,
        # a warm VM the job claimed (lifecycle.warm), and how long its claim took
        "warm": "claimed" if rec.extra.get("warm") == "claimed" else None,
        "claim_s": rec.extra.get("claim_s"),
    }


def failure_fields(*, domain: str, state: str, stage: str, cause: str,
                   slurm_gpus: tuple[int, ...] = (),
                   create_stages: dict[str, float] | None = None) -> dict:
    """The accounting fields of a job that got no VM (state: refused or failed).
    ``create_stages``: the stages its create reached, the one that failed last."""
    return {"state": state, "domain": domain,
            "slurm_gpus": format_index_list(slurm_gpus) if slurm_gpus else None,
            "create_stages": format_stages(create_stages or {}, "create"),
            "ended": f"{state} at {stage}", "cause": cause}
