"""VM records: one directory per VM under ``<state_dir>/vms/<name>/`` holding everything that VM
owns (record.json, the OS overlay, the data disk, the NoCloud seed, the keys, the console log,
the domain XML as defined). Deleting the VM removes the directory; nothing of a VM lives
elsewhere on the host except its ledger entry and its DHCP reservation.

``record.json`` is written atomically (:func:`slurm_dgxvm.fsutil.atomic_write`). It is what the
libvirt hook reads to take a stopped VM's resources again on ``virsh start``, so it keeps the
allocation: a typed :class:`~slurm_dgxvm.ledger.Allocation` and the
:class:`~slurm_dgxvm.placement.Placement` it came from, in their own JSON forms.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import RecordCorrupt
from .fsutil import atomic_write_json
from .ledger import Allocation
from .placement.model import Placement

FORMAT = "dgxvm-vm"
VERSION = 1
RECORD = "record.json"

# Files of a VM, relative to its directory.
OS_DISK = "os.qcow2"
DATA_DISK = "data.qcow2"
SEED = "seed.iso"
USER_KEY = "id_ed25519"
HOST_KEY = "ssh_host_ed25519_key"
KNOWN_HOSTS = "known_hosts"
CONSOLE_LOG = "console.log"
WARM_CANCEL = "warm.cancel"        # a warm VM still booting is not wanted: a job needs it
DOMAIN_XML = "domain.xml"
SHARE_SPEC = "share.json"          # the checked work dir (slurm_dgxvm.shares), root only
SHARE_WRAPPER = "virtiofsd"        # the script libvirt runs as the share's virtiofsd
IMAGE_CACHE_SPEC = "image-cache.json"      # the user's container image cache share, root only
IMAGE_CACHE_WRAPPER = "virtiofsd-images"   # its virtiofsd (read-only in the guest)
JOB_VIEW = "job.json"              # what `dgxvm job` shows the VM's own user (owned by them)
RANLOG = "containers.log"          # the images the job's dgxvm run ran (theirs; containers.ranlog)

# Who may read what: the VM directory lets everyone through (QEMU, which runs as another user,
# opens its disks by path) but lists nothing; record.json, the domain XML, the seed, the host key
# and the share's files are root's alone; the user key, known_hosts and job.json belong to the
# VM's user, who needs them in the batch script. Nothing of one job is readable by another.
VM_DIR_MODE = 0o711

@dataclass(frozen=True)
class VmRecord:
    name: str
    uuid: str
    state: str                          # creating, running, stopped, deleting
    owner: str                          # job | domain
    ledger_key: str
    job_id: int | None
    user: str
    uid: int
    gid: int
    workdir: str | None
    image: str
    image_version: str
    address: str | None
    mac: str
    network: str
    allocation: Allocation              # what the ledger holds for it: what start takes again
    placement: Placement                # the design's input, for reports
    fitted: tuple[str, ...] = ()
    created: float = 0.0
    started: float | None = None
    boot_s: float | None = None
    teardown_s: float | None = None
    ended: str | None = None            # how the VM ended: deleted, shutdown, crashed, failed: ...
    lock_s: float | None = None         # how long create held the ledger lock
    held_s: float | None = None         # created -> resources released (GPU-hours in reports)
    image_cache: str | None = None      # the user's container image cache, shared read-only at
                                        # this path (None: none; records before it had none)
    groups: tuple[int, ...] = ()        # the user's supplementary gids, as the guest has them
                                        # (records before it: none known)
    # seconds per stage (slurm_dgxvm.observe.stages), ms rounded; records before them: {}
    create_stages: dict[str, float] = field(default_factory=dict)
    teardown_stages: dict[str, float] = field(default_factory=dict)
    # the teardown's GPU (and NVSwitch) resets: PCI address -> seconds; and the devices the
    # check after it quarantined: PCI address -> reason (slurm_dgxvm.health)
    gpu_resets: dict[str, float] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)
    # the job fabric of a multi-node job (slurm_dgxvm.jobnet: JobFabric.to_dict()): the VNI, the
    # devices, this VM's fabric NIC and every node's address; None: no fabric (left out of the
    # JSON, as records before it have it)
    jobnet: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["allocation"] = self.allocation.to_json()
        doc["placement"] = self.placement.to_json()
        doc["fitted"] = list(self.fitted)
        doc["groups"] = list(self.groups)
        if doc["jobnet"] is None:
            del doc["jobnet"]
        return {"format": FORMAT, "version": VERSION, **doc}

    @classmethod
    def from_json(cls, doc: Any, path: str) -> VmRecord:
        """Parse a record; RecordCorrupt naming ``path`` and the problem otherwise."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise RecordCorrupt(path=path, reason=f"not a {FORMAT} v{VERSION} record")
        body = {k: v for k, v in doc.items() if k not in ("format", "version")}
        try:
            body["fitted"] = tuple(body.get("fitted", ()))
            body["groups"] = tuple(int(g) for g in body.get("groups", ()))
            for key in ("create_stages", "teardown_stages", "gpu_resets"):
                body[key] = _stage_times(body.get(key, {}))
            body["quarantined"] = {str(k): str(v) for k, v in body.get("quarantined", {}).items()}
            if body.get("jobnet") is not None and not isinstance(body["jobnet"], dict):
                raise ValueError(f"jobnet {body['jobnet']!r} is not an object")
            body["allocation"] = Allocation.from_json(body["allocation"])
            body["placement"] = Placement.from_json(body["placement"])
            return cls(**body)
        except KeyError as exc:
            raise RecordCorrupt(path=path, reason=f"missing {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise RecordCorrupt(path=path, reason=str(exc)) from exc

    def with_(self, **changes) -> VmRecord:
        return replace(self, **changes)


def _stage_times(doc: Any) -> dict[str, float]:
    """A record's ``{stage: seconds}``; ValueError for anything else."""
    if not isinstance(doc, dict):
        raise ValueError(f"stage times {doc!r} are not an object")
    out = {}
    for name, seconds in doc.items():
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValueError(f"stage {name!r}: {seconds!r} is not a number of seconds")
        out[str(name)] = float(seconds)
    return out


def job_view(rec: VmRecord, vmdir: Path) -> dict:
    """What the VM's own user may read about it: how to reach it, nothing of the host's."""
    return {"name": rec.name, "state": rec.state, "ended": rec.ended, "job_id": rec.job_id,
            "user": rec.user,
            "uid": rec.uid, "gid": rec.gid, "groups": list(rec.groups),
            "address": rec.address, "image": rec.image,
            "image_version": rec.image_version, "workdir": rec.workdir,
            "image_cache": rec.image_cache,
            "gpus": list(rec.placement.gpus),
            "slurm_gpus": (None if rec.placement.slurm_gpus is None
                           else list(rec.placement.slurm_gpus)),
            "allocation": rec.allocation.to_json(),  # the VM's own GPUs, CPUs, memory, switches
            "key": str(vmdir / USER_KEY), "known_hosts": str(vmdir / KNOWN_HOSTS),
            "share_refused": rec.extra.get("share_refused"),
            "image_cache_refused": rec.extra.get("image_cache_refused"),
            "job_fabric": jobnet_view(rec.jobnet)}


def jobnet_view(fabric: dict | None) -> dict | None:
    """The job fabric as the VM's user sees it: this node's name and index, the VM's fabric
    address, and every node of the job with its VM's fabric address (what the guest's
    /etc/hosts says). None for a VM without a fabric."""
    if not fabric:
        return None
    return {"node": fabric.get("node"), "index": fabric.get("index"),
            "address": fabric.get("vm_address"), "mtu": fabric.get("mtu"),
            "hosts": [list(h) for h in fabric.get("hosts", ())]}


class VmStore:
    """The ``vms/`` directory of the state dir."""

    def __init__(self, state_dir: str | os.PathLike):
        self.root = Path(state_dir) / "vms"

    def dir(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.dir(name)).exists()

    def make_dir(self, name: str) -> Path:
        """Create the VM's directory; FileExistsError if it is there (a name already taken)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=VM_DIR_MODE)
        os.chmod(self.root, VM_DIR_MODE)
        d = self.dir(name)
        d.mkdir(mode=VM_DIR_MODE)
        os.chmod(d, VM_DIR_MODE)   # QEMU runs as another user and must reach its disks
        return d

    def remove_dir(self, name: str) -> None:
        shutil.rmtree(self.dir(name), ignore_errors=True)

    def load(self, name: str) -> VmRecord | None:
        path = self.dir(name) / RECORD
        try:
            raw = path.read_text()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise RecordCorrupt(path=str(path), reason=f"invalid JSON: {exc}") from exc
        return VmRecord.from_json(doc, str(path))

    def save(self, rec: VmRecord) -> None:
        """Write record.json (root's, 0600) and the VM user's view of it, job.json."""
        d = self.dir(rec.name)
        atomic_write_json(d / RECORD, rec.to_json(), mode=0o600)
        atomic_write_json(d / JOB_VIEW, job_view(rec, d), mode=0o600, uid=rec.uid)

    def load_view(self, name: str) -> dict | None:
        """job.json of VM ``name`` (what its user may see), or None."""
        try:
            return json.loads((self.dir(name) / JOB_VIEW).read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise RecordCorrupt(path=str(self.dir(name) / JOB_VIEW),
                                reason=f"invalid JSON: {exc}") from exc

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def all(self) -> list[VmRecord]:
        out = []
        for name in self.names():
            rec = self.load(name)
            if rec is not None:
                out.append(rec)
        return out
