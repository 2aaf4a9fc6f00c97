"""The ledger's document and its allocations, in memory: :class:`Allocation`, the parsed
:class:`LedgerState` (``ledger.json``'s format: :func:`parse_document`, ``LedgerState.encode``)
and the staged changes of one transaction (:class:`LedgerTxn`). No file is opened here:
:mod:`.store` reads, locks and writes (the package's docstring says why it is so).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from slurm_dgxvm.errors import LedgerConflict, LedgerCorrupt
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
    ``created`` is epoch seconds. ``ib_functions``: the InfiniBand VFs or whole HCA ports passed
    into the VM, by PCI address (absent from the record when there are none, as releases before
    it wrote every record).

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
    ib_functions: tuple[str, ...] = ()

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
        put("ib_functions", _str_tuple("ib_functions", self.ib_functions))
        if len(self.gpus) != len(self.gpu_pcis):
            raise ValueError(f"gpus has {len(self.gpus)} entries but gpu_pcis has "
                             f"{len(self.gpu_pcis)}")
        for name in ("gpus", "gpu_pcis", "nvswitches", "cpus", "ib_functions"):
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
                     self.fm_partition, self.cpus, tuple(self.memory_mib.items()), self.created,
                     self.ib_functions))

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
            ib_functions=tuple(f.pci for f in placement.ib),
        )

    def occupancy(self) -> Occupancy:
        """What this allocation takes from the host, as an :class:`Occupancy`."""
        return Occupancy(
            gpus=frozenset(self.gpu_pcis),
            nvswitches=frozenset(self.nvswitches),
            cpus=frozenset(self.cpus),
            memory_mib=dict(self.memory_mib),
            fm_partitions=frozenset({self.fm_partition} if self.fm_partition is not None else ()),
            ib_functions=frozenset(self.ib_functions),
        )

    def to_json(self) -> dict:
        """The on-disk record. Keys are stable; ``memory_mib`` keys are decimal strings;
        ``ib_functions`` only when it holds any."""
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
            **({"ib_functions": list(self.ib_functions)} if self.ib_functions else {}),
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
        extra = sorted(k for k in data if k not in _RECORD_FIELDS + _OPTIONAL_FIELDS)
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
        if "ib_functions" in fields and not fields["ib_functions"]:
            raise ValueError("ib_functions is present but empty (it is left out when empty)")
        for name in ("gpus", "gpu_pcis", "nvswitches", "cpus", *_OPTIONAL_FIELDS):
            if name in fields and not isinstance(fields[name], list):
                raise ValueError(f"{name} must be a list, not {type(fields[name]).__name__}")
        if fields["slurm_gpus"] is not None and not isinstance(fields["slurm_gpus"], list):
            raise ValueError(f"slurm_gpus must be a list or null, "
                             f"not {type(fields['slurm_gpus']).__name__}")
        return cls(**fields)


_RECORD_FIELDS = ("key", "owner", "job_id", "domain", "user", "machine", "gpus", "gpu_pcis",
                  "slurm_gpus", "aligned", "nvswitches", "fm_partition", "cpus", "memory_mib",
                  "created")
_OPTIONAL_FIELDS = ("ib_functions",)    # absent when empty: the records of before stay the same


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
    for pci in sorted(alloc.ib_functions):
        yield "IB function", pci


_RESOURCE_NAMES = {"GPU": "gpu", "NVSwitch": "nvswitch", "CPU": "cpu",
                   "FM partition": "fm_partition", "IB function": "ib_function"}


def _occupancy_of(allocations) -> Occupancy:
    """``Occupancy.union(a.occupancy() for a in allocations)``, without building an Occupancy
    per allocation first (it is computed inside the lock, by every Prolog)."""
    gpus: set[str] = set()
    sws: set[str] = set()
    cpus: set[int] = set()
    fms: set[int] = set()
    ibs: set[str] = set()
    mem: dict[int, int] = {}
    for a in allocations:
        gpus.update(a.gpu_pcis)
        sws.update(a.nvswitches)
        cpus.update(a.cpus)
        ibs.update(a.ib_functions)
        if a.fm_partition is not None:
            fms.add(a.fm_partition)
        for node, mib in a.memory_mib.items():
            mem[node] = mem.get(node, 0) + mib
    return Occupancy(frozenset(gpus), frozenset(sws), frozenset(cpus), mem, frozenset(fms),
                     frozenset(ibs))


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


def salvaged_generation(raw: bytes) -> int:
    """The generation a corrupt document still names, or 0 (:meth:`.store.Ledger.replace_corrupt`
    writes the next one)."""
    try:
        gen = json.loads(raw.decode("utf-8")).get("generation")
    except (ValueError, AttributeError, RecursionError):
        return 0
    return gen if _is_int(gen) and gen >= 0 else 0
