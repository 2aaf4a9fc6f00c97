"""The node-local allocation ledger: which job or domain holds which physical resources.

Slurm's gres/gpu is only the admission *count*; this ledger is the authority for *which* physical
GPUs, NVSwitches, host CPUs, memory (MiB per NUMA node) and Fabric Manager partitions a VM holds
(DESIGN.md, decision 1). Prologs of different jobs run concurrently on one node, and admins run
``dgxvm create`` by hand, so every read-modify-write goes through one file lock and one JSON file:

    <state_dir>/ledger.json   the document (mode 0644: ``dgxvm list`` / status read it unprivileged)
    <state_dir>/ledger.lock   the lock file (:func:`fsutil.locked`) that serialises writers

Decisions that live here:

* **Atomic replace, not in-place writes.** A new document is written with
  :func:`fsutil.atomic_write`: a temporary file in the same directory, flushed and fsync'ed, then
  ``os.replace``'d over ``ledger.json`` and the directory fsync'ed. A crash (or a killed Prolog)
  therefore leaves either the old or the new document, never a mix, and readers
  (``Ledger.read``) need no lock: a rename is atomic, so any open() sees one complete version.
  A transaction makes (and fsyncs) its temp file before it takes the lock
  (:func:`fsutil.pending_write`), so that under the lock its fsyncs carry its own change and not
  what the rest of the node left pending in the filesystem's journal; the temp file of a
  transaction that writes nothing is removed. A process SIGKILLed while it waits for the lock
  leaves its empty ``.ledger.json.<pid>.*.tmp`` behind: the next transaction removes the temp
  files of writers that are dead (:func:`fsutil.sweep_dead_temps`); no reader opens those
  names.
* **A checksum over the allocations.** The rename protects against torn writes by *us*; the
  checksum (sha256 of the canonical JSON of ``allocations``) catches everything else: a hand
  edit, a partial copy back from a backup, a filesystem that lost data. A ledger that lies is
  worse than no ledger — it would hand one GPU to two VMs — so a mismatch is corruption.
* **One serialisation per record.** The file holds the document one allocation per line, each
  record in exactly the canonical JSON the checksum is computed over, so a record is serialised
  once for both, and a record a transaction keeps is not serialised again (its text, from the
  parse or the write that made it, is reused). Any JSON layout of the same document reads the
  same (a hand-written ``indent=2`` file is fine).
* **Corruption stops the node, it is never "repaired".** Invalid JSON, a wrong format or version,
  a checksum mismatch, a malformed record, one resource held twice inside the file, or an empty
  (0-byte) file (a torn write by something that did not use this module) raise
  :class:`~slurm_dgxvm.errors.LedgerCorrupt`; the file is left exactly as it is for an admin to
  inspect, and ``transaction()`` refuses to proceed. Resetting it would silently forget VMs that
  are running.
* **Conflicts are explicit.** Recording a key twice, or any GPU (by PCI address), NVSwitch, host
  CPU or FM partition that another allocation holds, raises
  :class:`~slurm_dgxvm.errors.LedgerConflict` naming the resource and its holder. Nothing is ever
  overwritten. Memory is *not* exclusive: it is a quantity, the ledger only sums it
  (:meth:`Occupancy.union`) and placement checks it against the node's capacity.
* **Writes only when something changed.** A transaction that ends with the same allocations it
  started with leaves the file (and its generation) alone; a transaction that raises writes
  nothing.
* **The critical section is measured.** Each transaction records the time spent waiting for the
  lock and the time the lock was held on the :class:`Ledger` (``last_lock_wait_s``,
  ``last_held_s``) so benchmarks can check the < 10 ms target (DESIGN.md, targets), and where
  the hold went (``last_times``: read, the caller's block, encoding, write, fsyncs).

No module-level state: everything hangs off a :class:`Ledger` instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from slurm_dgxvm import fsutil
from slurm_dgxvm.errors import LedgerConflict, LedgerCorrupt, LedgerError, LedgerLockTimeout
from slurm_dgxvm.placement.model import Occupancy, Placement

log = logging.getLogger("dgxvm.ledger")

FORMAT = "dgxvm-ledger"
VERSION = 1
LEDGER_FILE = "ledger.json"
LOCK_FILE = "ledger.lock"
FILE_MODE = 0o644
DIR_MODE = 0o755
DEFAULT_LOCK_TIMEOUT = 30.0

OWNERS = ("job", "domain")

_DOC_KEYS = frozenset({"format", "version", "generation", "checksum", "allocations"})


def job_key(job_id: int) -> str:
    """The ledger key of a Slurm job's VM: ``job:<id>``."""
    return f"job:{int(job_id)}"


def domain_key(domain: str) -> str:
    """The ledger key of an admin-made (standing) VM: ``domain:<name>``."""
    return f"domain:{domain}"


# -- canonical form and checksum -------------------------------------------------------------------
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                              allow_nan=False)   # what json.dumps would build at every call


def canonical_json(value: Any) -> str:
    """The one serialisation the checksum is computed over: sorted keys, no whitespace, ASCII."""
    return _CANONICAL.encode(value)


def checksum_of(allocations_json: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of the ``allocations`` object."""
    digest = hashlib.sha256(canonical_json(allocations_json).encode("ascii")).hexdigest()
    return f"sha256:{digest}"


def _member(key: str, record_text: str) -> str:
    """One ``"key":{record}`` member of the canonical ``allocations`` object."""
    return f"{canonical_json(key)}:{record_text}"


def _checksum_of_members(members: list[str]) -> str:
    """:func:`checksum_of` from the canonical members in key order, without serialising the
    records again: the canonical JSON of an object is its members, sorted by key, joined by
    commas inside braces."""
    digest = hashlib.sha256(("{" + ",".join(members) + "}").encode("ascii")).hexdigest()
    return f"sha256:{digest}"


# -- one allocation --------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers, not {type(value).__name__}")
    out = tuple(value)
    for v in out:
        if not _is_int(v) or v < 0:
            raise ValueError(f"{name} must hold non-negative integers, got {v!r}")
    return out


def _str_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of strings, not {type(value).__name__}")
    out = tuple(value)
    for v in out:
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must hold non-empty strings, got {v!r}")
    return out


def _no_repeats(name: str, values: tuple) -> None:
    seen: set = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{name} lists {v!r} twice")
        seen.add(v)


@dataclass(frozen=True)
class Allocation:
    """What one job's or one domain's VM holds, as recorded in the ledger.

    ``gpu_pcis`` (PCI addresses) is the identity of the GPUs; ``gpus`` (indices, same order) is for
    display and for comparing with ``slurm_gpus``, the indices Slurm chose (None when Slurm did
    not choose, e.g. an admin's ``dgxvm create``). ``memory_mib`` maps host NUMA node -> MiB.
    ``created`` is epoch seconds.

    Values are normalised (lists become tuples, ``memory_mib`` a read-only mapping) and checked
    on construction; a bad value raises ``ValueError`` (``from_json`` callers turn that into
    :class:`LedgerCorrupt`).
    """

    key: str
    owner: str
    job_id: int | None
    domain: str
    user: str | None
    machine: str
    gpus: tuple[int, ...]
    gpu_pcis: tuple[str, ...]
    slurm_gpus: tuple[int, ...] | None
    aligned: bool
    nvswitches: tuple[str, ...]
    fm_partition: int | None
    cpus: tuple[int, ...]
    memory_mib: Mapping[int, int] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"key must be a non-empty string, got {self.key!r}")
        if self.owner not in OWNERS:
            raise ValueError(f"owner must be one of {', '.join(OWNERS)}, got {self.owner!r}")
        if self.job_id is not None and (not _is_int(self.job_id) or self.job_id < 0):
            raise ValueError(f"job_id must be a non-negative integer or null, got {self.job_id!r}")
        if self.owner == "job" and self.job_id is None:
            raise ValueError("an allocation owned by a job needs a job_id")
        if not isinstance(self.domain, str) or not self.domain:
            raise ValueError(f"domain must be a non-empty string, got {self.domain!r}")
        if self.user is not None and not isinstance(self.user, str):
            raise ValueError(f"user must be a string or null, got {self.user!r}")
        if not isinstance(self.machine, str):
            raise ValueError(f"machine must be a string, got {self.machine!r}")
        if not isinstance(self.aligned, bool):
            raise ValueError(f"aligned must be a boolean, got {self.aligned!r}")

        put("gpus", _int_tuple("gpus", self.gpus))
        put("gpu_pcis", _str_tuple("gpu_pcis", self.gpu_pcis))
        if self.slurm_gpus is not None:
            put("slurm_gpus", _int_tuple("slurm_gpus", self.slurm_gpus))
        put("nvswitches", _str_tuple("nvswitches", self.nvswitches))
        put("cpus", _int_tuple("cpus", self.cpus))
        if len(self.gpus) != len(self.gpu_pcis):
            raise ValueError(f"gpus has {len(self.gpus)} entries but gpu_pcis has "
                             f"{len(self.gpu_pcis)}")
        for name in ("gpus", "gpu_pcis", "nvswitches", "cpus"):
            _no_repeats(name, getattr(self, name))
        if self.fm_partition is not None and (not _is_int(self.fm_partition)
                                              or self.fm_partition < 0):
            raise ValueError(f"fm_partition must be a non-negative integer or null, "
                             f"got {self.fm_partition!r}")

        if not isinstance(self.memory_mib, Mapping):
            raise ValueError(f"memory_mib must be a mapping node -> MiB, got {self.memory_mib!r}")
        mem: dict[int, int] = {}
        for node, mib in self.memory_mib.items():
            if not _is_int(node) or node < 0:
                raise ValueError(f"memory_mib: NUMA node must be a non-negative integer, "
                                 f"got {node!r}")
            if not _is_int(mib) or mib < 0:
                raise ValueError(f"memory_mib: MiB for node {node} must be a non-negative "
                                 f"integer, got {mib!r}")
            mem[node] = mib
        put("memory_mib", MappingProxyType(dict(sorted(mem.items()))))

        if isinstance(self.created, bool) or not isinstance(self.created, (int, float)):
            raise ValueError(f"created must be a number (epoch seconds), got {self.created!r}")
        put("created", float(self.created))

    def __hash__(self):
        return hash((self.key, self.owner, self.job_id, self.domain, self.user, self.machine,
                     self.gpus, self.gpu_pcis, self.slurm_gpus, self.aligned, self.nvswitches,
                     self.fm_partition, self.cpus, tuple(self.memory_mib.items()), self.created))

    @classmethod
    def from_placement(cls, key: str, placement: Placement, *, owner: str,
                       job_id: int | None = None, domain: str, user: str | None = None,
                       now: float | None = None) -> Allocation:
        """The record of what ``placement`` takes. ``now`` defaults to ``time.time()``.

        The CPUs recorded are the pinned vCPU CPUs (``placement.cpus``), exactly what
        :meth:`Placement.occupancy` reports; emulator CPUs are host-reserved and shared.
        """
        return cls(
            key=key,
            owner=owner,
            job_id=job_id,
            domain=domain,
            user=user,
            machine=placement.machine,
            gpus=tuple(placement.gpus),
            gpu_pcis=tuple(placement.gpu_pcis),
            slurm_gpus=tuple(placement.slurm_gpus) if placement.slurm_gpus is not None else None,
            aligned=placement.aligned,
            nvswitches=tuple(placement.nvswitches),
            fm_partition=placement.fm_partition,
            cpus=tuple(placement.cpus),
            memory_mib=placement.memory_per_node,
            created=time.time() if now is None else now,
        )

    def occupancy(self) -> Occupancy:
        """What this allocation takes from the host, as an :class:`Occupancy`."""
        return Occupancy(
            gpus=frozenset(self.gpu_pcis),
            nvswitches=frozenset(self.nvswitches),
            cpus=frozenset(self.cpus),
            memory_mib=dict(self.memory_mib),
            fm_partitions=frozenset({self.fm_partition} if self.fm_partition is not None else ()),
        )

    def to_json(self) -> dict:
        """The on-disk record. Keys are stable; ``memory_mib`` keys are decimal strings."""
        return {
            "key": self.key,
            "owner": self.owner,
            "job_id": self.job_id,
            "domain": self.domain,
            "user": self.user,
            "machine": self.machine,
            "gpus": list(self.gpus),
            "gpu_pcis": list(self.gpu_pcis),
            "slurm_gpus": list(self.slurm_gpus) if self.slurm_gpus is not None else None,
            "aligned": self.aligned,
            "nvswitches": list(self.nvswitches),
            "fm_partition": self.fm_partition,
            "cpus": list(self.cpus),
            "memory_mib": {str(node): mib for node, mib in self.memory_mib.items()},
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: Any) -> Allocation:
        """Parse one record strictly: every field present, no unknown field, right types.

        Raises ``ValueError`` naming the problem.
        """
        if not isinstance(data, dict):
            raise ValueError(f"record must be an object, not {type(data).__name__}")
        missing = [k for k in _RECORD_FIELDS if k not in data]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        extra = sorted(k for k in data if k not in _RECORD_FIELDS)
        if extra:
            raise ValueError(f"unknown field(s) {', '.join(extra)}")
        mem_raw = data["memory_mib"]
        if not isinstance(mem_raw, dict):
            raise ValueError(f"memory_mib must be an object, not {type(mem_raw).__name__}")
        mem: dict[int, Any] = {}
        for node, mib in mem_raw.items():
            if not (node.isascii() and node.isdigit()) or str(int(node)) != node:
                raise ValueError(f"memory_mib: NUMA node key {node!r} is not a decimal integer")
            mem[int(node)] = mib
        fields = dict(data)
        fields["memory_mib"] = mem
        for name in ("gpus", "gpu_pcis", "nvswitches", "cpus"):
            if not isinstance(fields[name], list):
                raise ValueError(f"{name} must be a list, not {type(fields[name]).__name__}")
        if fields["slurm_gpus"] is not None and not isinstance(fields["slurm_gpus"], list):
            raise ValueError(f"slurm_gpus must be a list or null, "
                             f"not {type(fields['slurm_gpus']).__name__}")
        return cls(**fields)


_RECORD_FIELDS = ("key", "owner", "job_id", "domain", "user", "machine", "gpus", "gpu_pcis",
                  "slurm_gpus", "aligned", "nvswitches", "fm_partition", "cpus", "memory_mib",
                  "created")


# -- exclusive resources ---------------------------------------------------------------------------
def _exclusive(alloc: Allocation) -> Iterator[tuple[str, Any]]:
    """(kind, identity) of every resource an allocation holds exclusively, in report order."""
    for pci in sorted(alloc.gpu_pcis):
        yield "GPU", pci
    for pci in sorted(alloc.nvswitches):
        yield "NVSwitch", pci
    for cpu in sorted(alloc.cpus):
        yield "CPU", cpu
    if alloc.fm_partition is not None:
        yield "FM partition", alloc.fm_partition


_RESOURCE_NAMES = {"GPU": "gpu", "NVSwitch": "nvswitch", "CPU": "cpu",
                   "FM partition": "fm_partition"}


def _occupancy_of(allocations) -> Occupancy:
    """``Occupancy.union(a.occupancy() for a in allocations)``, without building an Occupancy
    per allocation first (it is computed inside the lock, by every Prolog)."""
    gpus: set[str] = set()
    sws: set[str] = set()
    cpus: set[int] = set()
    fms: set[int] = set()
    mem: dict[int, int] = {}
    for a in allocations:
        gpus.update(a.gpu_pcis)
        sws.update(a.nvswitches)
        cpus.update(a.cpus)
        if a.fm_partition is not None:
            fms.add(a.fm_partition)
        for node, mib in a.memory_mib.items():
            mem[node] = mem.get(node, 0) + mib
    return Occupancy(frozenset(gpus), frozenset(sws), frozenset(cpus), mem, frozenset(fms))


# -- a version of the ledger -----------------------------------------------------------------------
@dataclass(frozen=True)
class LedgerState:
    """One consistent version of the ledger: its generation and its allocations by key."""

    generation: int = 0
    allocations: Mapping[str, Allocation] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "allocations",
                           MappingProxyType(dict(sorted(self.allocations.items()))))
        # key -> the canonical JSON text of its record: computed once per record (when it is
        # parsed or first written) and reused by every later version that keeps the record.
        # A cache, not state: not a field, not compared.
        object.__setattr__(self, "_texts", {})

    def __hash__(self):
        return hash((self.generation, tuple(self.allocations.items())))

    def _keep_texts(self, base: LedgerState) -> None:
        """Reuse ``base``'s record texts for the records this version holds unchanged (the very
        same Allocation object)."""
        texts = self._texts
        for key, alloc in self.allocations.items():
            text = base._texts.get(key)
            if text is not None and base.allocations.get(key) is alloc:
                texts[key] = text

    def _members(self) -> list[str]:
        """The canonical ``"key":{record}`` members of ``allocations``, in key order."""
        texts = self._texts
        out = []
        for key, alloc in self.allocations.items():
            text = texts.get(key)
            if text is None:
                text = texts[key] = canonical_json(alloc.to_json())
            out.append(_member(key, text))
        return out

    def encode(self) -> bytes:
        """The bytes of the ledger file: the document :meth:`to_json` describes, one allocation
        per line, each record in the canonical form the checksum is computed over, so the
        records are serialised once for both (and only the records this version changed)."""
        members = self._members()
        head = (f'{{"format":{canonical_json(FORMAT)},"version":{VERSION},'
                f'"generation":{self.generation},"checksum":"{_checksum_of_members(members)}",\n'
                f'"allocations":{{')
        body = "\n" + ",\n".join(members) + "\n" if members else ""
        return (head + body + "}}\n").encode("ascii")

    def occupancy(self) -> Occupancy:
        """Everything held by anyone: the union of all allocations."""
        return _occupancy_of(self.allocations.values())

    def holder_of_gpu(self, pci: str) -> str | None:
        """The key holding the GPU at PCI address ``pci``, or None when it is free."""
        for key, alloc in self.allocations.items():
            if pci in alloc.gpu_pcis:
                return key
        return None

    def to_json(self) -> dict:
        """The whole on-disk document, checksum included."""
        allocations = {key: alloc.to_json() for key, alloc in self.allocations.items()}
        return {
            "format": FORMAT,
            "version": VERSION,
            "generation": self.generation,
            "checksum": checksum_of(allocations),
            "allocations": allocations,
        }


EMPTY_STATE = LedgerState()


def parse_document(raw: bytes, path: str, *, known: LedgerState | None = None) -> LedgerState:
    """Parse and verify the bytes of a ledger file; any defect raises :class:`LedgerCorrupt`.

    ``known``: a state parsed (or written) before. A record whose canonical text is the one
    ``known`` holds for its key is the same JSON value, so its :class:`Allocation` is taken from
    ``known`` instead of being built and checked again. Every check on the whole document (JSON,
    format, checksum, keys, nothing held twice) runs all the same.
    """

    def corrupt(reason: str, **extra) -> LedgerCorrupt:
        return LedgerCorrupt(path=path, reason=reason, **extra)

    if not raw:
        raise corrupt("empty file (a torn write?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise corrupt(f"not UTF-8 (byte {e.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise corrupt(f"invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except RecursionError:
        raise corrupt("invalid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise corrupt(f"top level is {type(doc).__name__}, not an object")
    if doc.get("format") != FORMAT:
        raise corrupt(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
    version = doc.get("version")
    if not _is_int(version) or version != VERSION:
        raise corrupt(f"unsupported version {version!r} (this dgxvm reads version {VERSION})")
    missing = sorted(_DOC_KEYS - doc.keys())
    if missing:
        raise corrupt(f"missing key(s) {', '.join(missing)}")
    extra = sorted(doc.keys() - _DOC_KEYS)
    if extra:
        raise corrupt(f"unknown key(s) {', '.join(extra)}")
    generation = doc["generation"]
    if not _is_int(generation) or generation < 0:
        raise corrupt(f"generation {generation!r} is not a non-negative integer")
    allocations_json = doc["allocations"]
    if not isinstance(allocations_json, dict):
        raise corrupt(f"allocations is {type(allocations_json).__name__}, not an object")
    recorded = doc["checksum"]
    try:
        texts = {key: canonical_json(record) for key, record in allocations_json.items()}
    except ValueError:  # NaN / Infinity smuggled in: not canonical JSON
        raise corrupt("allocations hold a non-finite number") from None
    computed = _checksum_of_members([_member(key, texts[key]) for key in sorted(texts)])
    if recorded != computed:
        raise corrupt("checksum mismatch", recorded=recorded, computed=computed)

    allocations: dict[str, Allocation] = {}
    holders: dict[tuple[str, Any], str] = {}
    known_texts = known._texts if known is not None else {}
    for key, record in allocations_json.items():
        if known_texts.get(key) == texts[key]:
            alloc = known.allocations[key]
        else:
            try:
                alloc = Allocation.from_json(record)
            except (ValueError, TypeError) as e:
                raise corrupt(f"allocation {key!r}: {e}") from None
        if alloc.key != key:
            raise corrupt(f"allocation {key!r} records key {alloc.key!r}")
        for resource in _exclusive(alloc):
            other = holders.get(resource)
            if other is not None:
                kind, ident = resource
                raise corrupt(f"{kind} {ident} is held by both {other} and {key}")
            holders[resource] = key
        allocations[key] = alloc
    state = LedgerState(generation=generation, allocations=allocations)
    # an unchanged record is written back as it was read: the same JSON value, the same text
    state._texts.update(texts)
    return state


# -- a transaction ---------------------------------------------------------------------------------
class LedgerTxn:
    """A mutable view of the ledger inside :meth:`Ledger.transaction` (the lock is held).

    Changes are staged in memory and written, all at once, when the ``with`` block ends normally.
    Not usable after the block.
    """

    def __init__(self, base: LedgerState):
        self._base = base
        self._allocs: dict[str, Allocation] = dict(base.allocations)
        self._holders: dict[tuple[str, Any], str] = {
            res: key for key, alloc in self._allocs.items() for res in _exclusive(alloc)}
        self._open = True

    @property
    def generation(self) -> int:
        """The generation the transaction started from."""
        return self._base.generation

    @property
    def allocations(self) -> Mapping[str, Allocation]:
        """Read-only live view of the allocations, including this transaction's changes."""
        return MappingProxyType(self._allocs)

    @property
    def changed(self) -> bool:
        """Whether the allocations differ from those the transaction started with."""
        return self._allocs != dict(self._base.allocations)

    def occupancy(self) -> Occupancy:
        """Everything held right now, this transaction's changes included."""
        return _occupancy_of(self._allocs.values())

    def holder_of_gpu(self, pci: str) -> str | None:
        return self._holders.get(("GPU", pci))

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("ledger transaction used after its with-block ended")

    def allocate(self, allocation: Allocation) -> Allocation:
        """Record ``allocation``. A duplicate key or any exclusive resource held by another
        allocation raises :class:`LedgerConflict`; nothing is recorded then."""
        self._check_open()
        if not isinstance(allocation, Allocation):
            raise TypeError(f"allocate() takes an Allocation, not {type(allocation).__name__}")
        key = allocation.key
        if key in self._allocs:
            raise LedgerConflict(key=key, reason="already recorded", holder=key)
        resources = list(_exclusive(allocation))
        for resource in resources:
            holder = self._holders.get(resource)
            if holder is not None:
                kind, ident = resource
                raise LedgerConflict(key=key, reason=f"{kind} {ident} is held by {holder}",
                                     resource=_RESOURCE_NAMES[kind], value=ident, holder=holder)
        self._allocs[key] = allocation
        for resource in resources:
            self._holders[resource] = key
        return allocation

    def release(self, key: str) -> Allocation | None:
        """Forget ``key`` and return what it held; a key not held is a logged no-op (None)."""
        self._check_open()
        alloc = self._allocs.pop(key, None)
        if alloc is None:
            log.warning("release of %s: not in the ledger, nothing to release", key)
            return None
        for resource in _exclusive(alloc):
            self._holders.pop(resource, None)
        return alloc

    def _result(self) -> LedgerState:
        state = LedgerState(generation=self._base.generation + 1, allocations=self._allocs)
        state._keep_texts(self._base)
        return state


# -- the ledger ------------------------------------------------------------------------------------
LOCK_POLL_S = 0.002


@dataclass
class TxnTimes:
    """Where one transaction's time went (seconds), for benchmarks: the lock's wait and hold,
    and inside the hold: reading the document (``parsed``: whether it had to be parsed then),
    the caller's block, encoding the new document, and its write (``write``: None when nothing
    was written). The rest of the hold is bookkeeping and the lock's release."""

    lock: fsutil.LockTimes = field(default_factory=fsutil.LockTimes)
    read_s: float | None = None
    parsed: bool | None = None
    body_s: float | None = None
    encode_s: float | None = None
    write: fsutil.WriteTimes | None = None


class Ledger:
    """The ledger in ``state_dir``. Cheap to construct; touches the disk only when used.

    ``lock_timeout`` (seconds) bounds the wait for the lock; past it a transaction raises
    :class:`LedgerLockTimeout`. Transactions must not be nested (the inner one would wait for the
    outer one's lock and time out).
    """

    def __init__(self, state_dir: str | os.PathLike[str],
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) \
                or lock_timeout < 0:
            raise ValueError(f"lock_timeout must be a non-negative number, got {lock_timeout!r}")
        self.state_dir = os.fspath(state_dir)
        self.path = os.path.join(self.state_dir, LEDGER_FILE)
        self.lock_path = os.path.join(self.state_dir, LOCK_FILE)
        self.lock_timeout = float(lock_timeout)
        self._times = TxnTimes()                   # of the last transaction
        # the bytes of the last document this instance read or wrote, and what they say
        self._known: tuple[bytes, LedgerState] | None = None

    def __repr__(self) -> str:
        return f"Ledger({self.state_dir!r}, lock_timeout={self.lock_timeout})"

    # reading ------------------------------------------------------------------------------------
    def read(self) -> LedgerState:
        """The current ledger, without taking the lock (writes are atomic renames, so the file
        opened is always one complete version). A missing file is an empty ledger.

        The file is read every time; only its parse is reused, when its bytes are exactly those
        this instance last read or wrote (the state is a pure function of the bytes)."""
        return self._load()[0]

    def _load(self) -> tuple[LedgerState, bool]:
        """The current ledger, and whether its bytes had to be parsed (False: a missing file, or
        the bytes of the last document this instance read or wrote)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return EMPTY_STATE, False
        except OSError as e:
            raise LedgerError(path=self.path, reason=f"cannot read: {e.strerror or e}") from e
        known = self._known
        if known is not None and known[0] == raw:
            return known[1], False
        state = parse_document(raw, self.path, known=known[1] if known is not None else None)
        self._known = (raw, state)
        return state, True

    # writing ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[LedgerTxn]:
        """Lock, load, yield a :class:`LedgerTxn`; on normal exit write if anything changed.

        An exception in the block writes nothing and propagates. A corrupt ledger raises
        :class:`LedgerCorrupt` before the block runs.
        """
        self._ensure_dir()
        self._times = times = TxnTimes()
        clock = time.perf_counter
        txn: LedgerTxn | None = None
        # Parse the document now, before the lock: under it, the same bytes are only compared
        # (and when another writer got in first, its records that this parse already checked
        # are not built again). What counts is still what is read under the lock; a corrupt or
        # unreadable ledger is reported there.
        with contextlib.suppress(LedgerError):
            self._load()
        fsutil.sweep_dead_temps(self.path)
        with contextlib.ExitStack() as stack:
            # The temp file of the write, made and fsynced before the lock: that fsync commits
            # what the filesystem had pending from everyone else, which the write's own fsync
            # would otherwise wait for under the lock (fsutil.pending_write). Not possible here
            # (a read-only state dir): the write, if any, makes its own, as before.
            try:
                pending = stack.enter_context(fsutil.pending_write(self.path, mode=FILE_MODE))
            except OSError:
                pending = None
            # fsutil.locked polls; its default 50 ms poll would make 16 concurrent prologs queue
            # for up to a second behind critical sections of ~2 ms each.
            stack.enter_context(fsutil.locked(
                self.lock_path, timeout=self.lock_timeout, poll_s=LOCK_POLL_S, mode=FILE_MODE,
                times=times.lock,
                timed_out=lambda: LedgerLockTimeout(path=self.lock_path,
                                                    timeout=self.lock_timeout),
                failed=lambda e: LedgerError(path=self.lock_path,
                                             reason=f"cannot lock: {e.strerror or e}")))
            try:
                t0 = clock()
                base, times.parsed = self._load()
                txn = LedgerTxn(base)
                times.read_s = clock() - t0
                t0 = clock()
                yield txn
                times.body_s = clock() - t0
                txn._open = False
                if txn.changed:
                    self._write(txn._result(), times, pending)
            finally:
                if txn is not None:
                    txn._open = False

    @property
    def last_lock_wait_s(self) -> float | None:
        """Seconds the last transaction waited for the lock (None before the first)."""
        return self._times.lock.waited_s

    @property
    def last_held_s(self) -> float | None:
        """Seconds the last transaction held the lock, acquired -> released (None before the
        first, during one, and after a lock time-out)."""
        return self._times.lock.held_s

    @property
    def last_times(self) -> TxnTimes:
        """Where the last transaction's time went (:class:`TxnTimes`; all None before the
        first)."""
        return self._times

    def allocate(self, allocation: Allocation) -> Allocation:
        """Record one allocation in its own transaction (see :meth:`LedgerTxn.allocate`)."""
        with self.transaction() as txn:
            return txn.allocate(allocation)

    def release(self, key: str) -> Allocation | None:
        """Release one key in its own transaction (see :meth:`LedgerTxn.release`)."""
        with self.transaction() as txn:
            return txn.release(key)

    # a corrupt ledger ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's lock for the block without reading the ledger (it may be corrupt):
        :meth:`replace_corrupt` is called inside it."""
        self._ensure_dir()
        with fsutil.locked(self.lock_path, timeout=self.lock_timeout, poll_s=LOCK_POLL_S,
                           mode=FILE_MODE,
                           timed_out=lambda: LedgerLockTimeout(path=self.lock_path,
                                                               timeout=self.lock_timeout),
                           failed=lambda e: LedgerError(path=self.lock_path,
                                                        reason=f"cannot lock: {e.strerror or e}")):
            yield

    def replace_corrupt(self, state: LedgerState, *, now: float | None = None) -> str:
        """Replace a corrupt ledger with ``state``; return where the corrupt file was kept.

        Only inside :meth:`locked`, and only for a ledger that is corrupt now (LedgerError
        otherwise: one that parses is never replaced). The corrupt file is first given a second
        name, ``ledger.json.corrupt-<UTC time>`` (made durable), then the new document is
        written atomically over ``ledger.json`` with the next generation the corrupt one
        names, if any can be read. Never a reset by accident: ``dgxvm reconcile
        --rebuild-ledger`` calls it, saying what it wrote.
        """
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise LedgerError(path=self.path, reason="there is no ledger to replace") from None
        except OSError as e:
            raise LedgerError(path=self.path, reason=f"cannot read: {e.strerror or e}") from e
        try:
            parse_document(raw, self.path)
        except LedgerCorrupt:
            pass
        else:
            raise LedgerError(path=self.path, reason="it is not corrupt: not replaced")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        aside = f"{self.path}.corrupt-{stamp}"
        n = 1
        while os.path.lexists(aside):
            n += 1
            aside = f"{self.path}.corrupt-{stamp}-{n}"
        try:
            os.link(self.path, aside)
            fsutil.fsync_dir(self.state_dir)
        except OSError as e:
            raise LedgerError(path=aside, reason=f"cannot keep the corrupt ledger aside: "
                                                 f"{e.strerror or e}") from e
        self._write(LedgerState(generation=_salvaged_generation(raw) + 1,
                                allocations=state.allocations))
        log.warning("ledger %s was corrupt: rebuilt with %d allocation(s), the corrupt file "
                    "kept as %s", self.path, len(state.allocations), aside)
        return aside

    # internals ----------------------------------------------------------------------------------
    def _ensure_dir(self) -> None:
        if os.path.isdir(self.state_dir):
            return
        try:
            os.makedirs(self.state_dir, mode=DIR_MODE, exist_ok=True)
            os.chmod(self.state_dir, DIR_MODE)  # mode= is filtered by the umask
        except OSError as e:
            raise LedgerError(path=self.state_dir,
                              reason=f"cannot create state dir: {e.strerror or e}") from e

    def _write(self, state: LedgerState, times: TxnTimes | None = None,
               pending: fsutil.PendingWrite | None = None) -> None:
        """Atomically replace the ledger file with ``state`` (:func:`fsutil.atomic_write`, or
        the ``pending`` one's commit)."""
        t0 = time.perf_counter()
        data = state.encode()
        write_times = None
        if times is not None:
            times.encode_s = time.perf_counter() - t0
            times.write = write_times = fsutil.WriteTimes()
        try:
            if pending is not None:
                pending.commit(data, times=write_times)
            else:
                fsutil.atomic_write(self.path, data, mode=FILE_MODE, times=write_times)
        except OSError as e:
            raise LedgerError(path=self.path, reason=f"cannot write: {e.strerror or e}") from e
        self._known = (data, state)


def _salvaged_generation(raw: bytes) -> int:
    """The generation a corrupt document still names, or 0."""
    try:
        gen = json.loads(raw.decode("utf-8")).get("generation")
    except (ValueError, AttributeError, RecursionError):
        return 0
    return gen if _is_int(gen) and gen >= 0 else 0


__all__ = [
    "Allocation", "Ledger", "LedgerState", "LedgerTxn", "TxnTimes", "EMPTY_STATE", "FORMAT",
    "VERSION", "canonical_json", "checksum_of", "domain_key", "job_key", "parse_document",
]
