"""The VM lifecycle: a placement made into a running VM, and back.

create:  place + record in the ledger -> VM directory -> keys, address, seed -> overlay (+ data
         disk) -> design the domain (+ fit to this host) -> define -> FM partition -> start ->
         wait until the guest agent answers -> record "running".
delete:  graceful shutdown (bounded) -> destroy -> undefine -> FM partition off -> address ->
         VM directory -> ledger.  Idempotent: whatever a failed create or a crash left is cleaned.

One cleanup path: every create step registers its undo on an ExitStack; a failure anywhere
unwinds exactly what was done, in reverse, and re-raises the first error.

``virsh shutdown`` / ``virsh start`` (and a guest that powers itself off or crashes) go through
libvirt's qemu hook (:func:`hook`): "release" gives the VM's GPUs, NVSwitches, CPUs, memory and
FM partition back to the ledger and keeps its drives; "prepare" takes them again from the VM
record, or refuses the start naming who holds them now. So the ledger stays true whoever starts
or stops the domain.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import shlex
import time
import uuid as uuid_mod
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable

from . import hypervisor, images as images_mod, seed as seed_mod
from .config import Config
from .design import RealHost, VmInputs, design, domain_xml, fit_to_host, mac_for, share_tag
from .errors import (DgxvmError, DomainExists, DomainNotFound, HostError, HypervisorError,
                     LedgerConflict, RequestError, ShareRefused)
from .fabric import Fabric
from .guest import wait_ready
from .ledger import Allocation, Ledger, domain_key, job_key
from .names import account_name_problem, domain_name
from .placement import Policy, Request, place
from .records import (CONSOLE_LOG, DATA_DISK, DOMAIN_XML, HOST_KEY, KNOWN_HOSTS, OS_DISK, SEED,
                      SHARE_SPEC, SHARE_WRAPPER, USER_KEY, VmRecord, VmStore)
from .shares import policy as share_policy, virtiofsd as share_server
from .topology import SysfsRoot, discover
from .topology.nvml import query as nvml_query

log = logging.getLogger("dgxvm.lifecycle")

Progress = Callable[[str], None]


def _quiet(_stage: str) -> None:
    pass


@dataclass(frozen=True)
class CreateRequest:
    """What a VM is asked for: by an admin (``dgxvm create``) or by a Slurm job's Prolog."""

    name: str
    placement: Request                # GPUs and sizes, as ``dgxvm plan`` takes them
    data_disk_gib: int | None = None
    image: str | None = None          # None = the store's default
    owner: str = "domain"             # domain | job
    job_id: int | None = None
    user: str = "root"
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()     # the user's supplementary gids (the guest account gets them)
    home: str | None = None
    workdir: str | None = None        # shared into the guest at the same path
    alignment: str | None = None      # strict | prefer; None = [placement] alignment


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


class Env:
    """Everything the lifecycle works with, built lazily from the config once."""

    def __init__(self, cfg: Config, *, host=None):
        self.cfg = cfg
        if host is not None:
            self.__dict__["host"] = host

    @cached_property
    def host(self):
        c = self.cfg.host
        return discover(SysfsRoot(c.sysfs_root), machine=c.machine or None,
                        module_ids=c.module_ids or None, nvml=nvml_query)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.cfg.host.state_dir, lock_timeout=self.cfg.ledger.lock_timeout_s)

    @cached_property
    def policy(self) -> Policy:
        return Policy.from_config(self.cfg)

    @cached_property
    def vms(self) -> VmStore:
        return VmStore(self.cfg.host.state_dir)

    @cached_property
    def images(self) -> images_mod.ImageStore:
        return images_mod.ImageStore(self.cfg.images.store)

    @cached_property
    def fabric(self) -> Fabric:
        return Fabric.from_config(self.cfg)

    @property
    def uri(self) -> str:
        return self.cfg.libvirt.uri

    def connect(self):
        return hypervisor.connect(self.uri)

    def fit(self, host) -> bool:
        mode = self.cfg.libvirt.fit_to_host
        return mode == "always" or (mode == "auto" and host.simulated is not None)

    def image_users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for rec in self.vms.all():
            out.setdefault(rec.image, []).append(rec.name)
        return out


# -- create ----------------------------------------------------------------------------------------
def create(env: Env, req: CreateRequest, progress: Progress = _quiet) -> VmRecord:
    """Create, start and wait for the VM ``req`` asks for; return its record (state running).

    Raises: NameError_ (bad name), DomainExists, ImageError, RequestError / NoFit (placement),
    LedgerConflict / LedgerLockTimeout, SeedError, DiskError, FabricError, HypervisorError,
    GuestTimeout. On any of them nothing is left behind.
    """
    t0 = time.monotonic()
    name = domain_name(req.name)
    cfg = env.cfg
    conn = env.connect()
    if hypervisor.lookup(conn, name) is not None:
        raise DomainExists(name=name, where=f" in libvirt ({env.uri})")
    if env.vms.exists(name):
        raise DomainExists(name=name, where=f" ({env.vms.dir(name)})")
    image = env.images.get(req.image)
    share, share_refused = check_share(cfg, req)
    host = env.host
    key = job_key(req.job_id) if req.owner == "job" else domain_key(name)

    with ExitStack() as undo:
        progress("placing")
        policy = env.policy
        if req.alignment and req.alignment != policy.alignment:
            policy = replace(policy, alignment=req.alignment)
        with env.ledger.transaction() as txn:
            placement = place(host, txn.occupancy(), req.placement, policy)
            alloc = txn.allocate(Allocation.from_placement(
                key, placement, owner=req.owner, job_id=req.job_id, domain=name, user=req.user))
        lock_s = env.ledger.last_held_s
        undo.callback(env.ledger.release, key)

        try:
            vmdir = env.vms.make_dir(name)
        except FileExistsError:
            raise DomainExists(name=name, where=f" ({env.vms.dir(name)})") from None
        undo.callback(env.vms.remove_dir, name)

        progress("keys, address and seed")
        user_pub = seed_mod.generate_keypair(vmdir / USER_KEY, f"{req.user}@{name}")
        os.chown(vmdir / USER_KEY, req.uid, req.gid)
        os.chown(vmdir / (USER_KEY + ".pub"), req.uid, req.gid)
        host_pub = seed_mod.generate_keypair(vmdir / HOST_KEY, f"root@{name}")
        net = hypervisor.ensure_network(conn, cfg.libvirt.network, cfg.libvirt.network_cidr,
                                       cfg.host.state_dir)
        mac = mac_for(name)
        address = hypervisor.reserve_address(conn, net, cfg.host.state_dir, mac, name,
                                             cfg.libvirt.network_cidr)
        undo.callback(hypervisor.release_address, conn, cfg.libvirt.network,
                      cfg.host.state_dir, mac)
        _write_private(vmdir / KNOWN_HOSTS, f"{address} {host_pub}\n", 0o600)
        os.chown(vmdir / KNOWN_HOSTS, req.uid, req.gid)
        mounts = ()
        if share is not None:
            share.save(vmdir / SHARE_SPEC)
            _write_private(vmdir / SHARE_WRAPPER, share_server.wrapper_script(
                vmdir / SHARE_SPEC, virtiofsd=cfg.vm.virtiofsd), 0o700)
            mounts = (seed_mod.Mount(tag=share_tag(share.path), path=share.path,
                                     fstype=cfg.vm.share),)
        home = req.home or (f"/home/{req.user}" if req.uid else "/root")
        seed_mod.write_seed(seed_mod.SeedSpec(
            instance_id=f"{name}-{int(time.time())}", hostname=hostname_for(name), user_name=req.user,
            uid=req.uid, gid=req.gid, home=home, authorized_keys=(user_pub,),
            host_key_private=(vmdir / HOST_KEY).read_text(), host_key_public=host_pub,
            mounts=mounts, groups=group_names(req.groups)), vmdir / SEED, name=name)

        progress("disks")
        images_mod.create_overlay(image, vmdir / OS_DISK, placement.disk_gib)
        data_gib = req.data_disk_gib if req.data_disk_gib is not None else cfg.vm.data_disk_gib
        if data_gib:
            images_mod.create_disk(vmdir / DATA_DISK, data_gib)

        progress("designing the domain")
        vm_uuid = str(uuid_mod.uuid4())
        spec = design(host, placement, image, VmInputs(
            name=name, uuid=vm_uuid, owner=req.owner, job_id=req.job_id, user=req.user,
            os_disk=str(vmdir / OS_DISK), seed=str(vmdir / SEED),
            data_disk=str(vmdir / DATA_DISK) if data_gib else None,
            console_log=str(vmdir / CONSOLE_LOG), network=cfg.libvirt.network, mac=mac,
            share=cfg.vm.share, workdir=share.path if share else None,
            share_binary=str(vmdir / SHARE_WRAPPER) if share else None, address=address),
            domain_type=cfg.libvirt.domain_type, machine_type=cfg.libvirt.machine_type)
        fitted: tuple[str, ...] = ()
        if env.fit(host):
            spec, fitted = fit_to_host(spec, RealHost.probe(), max_vcpus=cfg.vm.fit_vcpus,
                                       max_memory_mib=cfg.vm.fit_memory_mib)
            for line in fitted:
                log.info("%s: fit to this host: %s", name, line)
        xml = domain_xml(spec)
        _write_private(vmdir / DOMAIN_XML, xml, 0o600)

        record = VmRecord(
            name=name, uuid=vm_uuid, state="creating", owner=req.owner, ledger_key=key,
            job_id=req.job_id, user=req.user, uid=req.uid, gid=req.gid,
            workdir=share.path if share else None,
            image=image.name, image_version=image.version, address=address, mac=mac,
            network=cfg.libvirt.network, allocation=alloc.to_json(),
            placement=placement.to_json(), fitted=fitted, created=time.time(),
            lock_s=round(lock_s, 6) if lock_s is not None else None,
            extra={"share_refused": share_refused} if share_refused else {})
        env.vms.save(record)

        progress("defining")
        with hypervisor.libvirt_errors(env.uri, f"define domain {name}"):
            dom = conn.defineXML(xml)
        undo.callback(hypervisor.undefine, dom)

        if placement.fm_partition is not None:
            progress(f"activating fabric manager partition {placement.fm_partition}")
            env.fabric.activate(placement.fm_partition)
            undo.callback(env.fabric.deactivate, placement.fm_partition)

        progress("starting")
        try:
            with hypervisor.libvirt_errors(env.uri, f"start domain {name}"):
                dom.create()
        except HypervisorError:
            _share_refusal(vmdir)        # the job's fault: its work dir changed since the check
            raise
        undo.callback(hypervisor.destroy, dom)
        started = time.time()

        progress("waiting for the guest")
        wait_ready(dom, name=name, timeout_s=cfg.libvirt.ready_timeout_s,
                   console_log=vmdir / CONSOLE_LOG)
        record = record.with_(state="running", started=started,
                              boot_s=round(time.monotonic() - t0, 3))
        env.vms.save(record)
        undo.pop_all()
    log.info("%s: running, GPUs %s, %s", name, list(placement.gpus), address)
    return record


def check_share(cfg: Config,
                req: CreateRequest) -> tuple[share_policy.ShareSpec | None, str | None]:
    """(what to share, why the work dir is not shared) for ``req``, before anything is taken.

    Raises ShareRefused when the work dir may not be shared and ``vm.share_refused`` is
    "refuse"; with "no-share" the VM boots without it and the reason is returned.
    """
    if not req.workdir or cfg.vm.share == "none":
        return None, None
    try:
        if req.uid == 0:
            raise ShareRefused(value=req.workdir, reason="a VM of root gets no share")
        return share_policy.check(req.workdir, cfg.vm.share_roots, req.uid, req.gid,
                                  (req.gid, *req.groups)), None
    except ShareRefused as exc:
        if cfg.vm.share_refused == "refuse":
            raise
        log.warning("%s: %s; the VM boots without it (vm.share_refused = no-share)",
                    req.name, exc)
        return None, str(exc)


def _share_refusal(vmdir) -> None:
    """Why the share's virtiofsd stopped the start: ShareRefused when it refused the directory
    (the job's fault), HostError when the node could not serve it; nothing when it said nothing
    (then libvirt's own error stands)."""
    try:
        line = (vmdir / share_server.ERROR_FILE).read_text().strip()
    except OSError:
        return
    if line.startswith(share_server.REFUSED_PREFIX):
        raise ShareRefused(line[len(share_server.REFUSED_PREFIX):])
    raise HostError(reason=f"the work dir share could not be served: {line} "
                           f"(`dgxvm share check` tells what this node lacks)")


def _write_private(path, text: str, mode: int) -> None:
    """Write a root-only file of the VM directory (created with ``mode``, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


# -- delete ----------------------------------------------------------------------------------------
def delete(env: Env, name: str, progress: Progress = _quiet, *,
           job_id: int | None = None) -> VmRecord | None:
    """Stop and remove the VM ``name`` and everything it holds; return its last record.

    Works on whatever is left: a record without a domain, a domain that is off, a ledger entry
    whose record is gone, a VM directory a crashed create left without a record, a DHCP
    reservation. Raises DomainNotFound when there is nothing of that name, and refuses a libvirt
    domain that dgxvm did not make: one with no record and no ledger entry, unless ``job_id`` is
    given and the domain's dgxvm metadata names that job (the Epilog after a crash).
    """
    t0 = time.monotonic()
    name = domain_name(name)
    rec = env.vms.load(name)
    conn = env.connect()
    dom = hypervisor.lookup(conn, name)
    held = None if rec else _ledger_entry_of(env, name)
    key = rec.ledger_key if rec else (held.key if held else None)
    if rec is None and key is None:
        if dom is not None and (job_id is None or _domain_job(dom) != job_id):
            raise DomainNotFound(name=f"{name} (a libvirt domain dgxvm did not create; "
                                      f"use virsh for it)")
        if dom is None and not env.vms.dir(name).exists():
            raise DomainNotFound(name=name)
    if rec is not None:
        env.vms.save(rec.with_(state="deleting"))
    how = "not running"
    if dom is not None:
        progress("shutting down")
        how = hypervisor.shutdown(dom, env.cfg.libvirt.shutdown_timeout_s)
        progress("undefining")
        with hypervisor.libvirt_errors(env.uri, f"undefine domain {name}"):
            hypervisor.undefine(dom)
    progress("releasing")
    fm = rec.allocation.get("fm_partition") if rec else (held.fm_partition if held else None)
    if fm is not None:
        env.fabric.deactivate(fm)
    hypervisor.release_address(conn, rec.network if rec else env.cfg.libvirt.network,
                               env.cfg.host.state_dir, rec.mac if rec else mac_for(name))
    env.vms.remove_dir(name)
    if key is not None:
        env.ledger.release(key)
    teardown = round(time.monotonic() - t0, 3)
    log.info("%s: deleted (%s) in %.2fs", name, how, teardown)
    if rec is None:
        return None
    return rec.with_(state="deleted", teardown_s=teardown, ended=f"deleted ({how})",
                     held_s=round(time.time() - rec.created, 3) if rec.created else None)


def _domain_job(dom) -> int | None:
    """The job id in a domain's dgxvm metadata, or None."""
    try:
        xml = dom.XMLDesc(0)
    except Exception:  # noqa: BLE001 - a domain that vanished has no job
        return None
    m = re.search(r"<dgxvm:job>(\d+)</dgxvm:job>", xml)
    return int(m.group(1)) if m else None


def _ledger_entry_of(env: Env, name: str) -> Allocation | None:
    for alloc in env.ledger.read().allocations.values():
        if alloc.domain == name:
            return alloc
    return None


# -- list ------------------------------------------------------------------------------------------
def list_vms(env: Env) -> list[dict]:
    """Every dgxvm VM: its record, libvirt's view of it, and whether the ledger holds it."""
    conn = env.connect()
    held = {a.domain: a for a in env.ledger.read().allocations.values()}
    now = time.time()
    out = []
    for rec in env.vms.all():
        dom = hypervisor.lookup(conn, rec.name)
        state = hypervisor.state_name(dom) if dom is not None else "undefined"
        alloc = rec.allocation
        out.append({
            "name": rec.name, "state": state, "job_id": rec.job_id, "user": rec.user,
            "gpus": alloc.get("gpus", []), "slurm_gpus": alloc.get("slurm_gpus"),
            "numa_nodes": sorted(int(n) for n in alloc.get("memory_mib", {})),
            "vcpus": rec.placement.get("vcpus"), "memory_mib": rec.placement.get("memory_mib"),
            "nvswitches": alloc.get("nvswitches", []), "fm_partition": alloc.get("fm_partition"),
            "image": rec.image, "address": rec.address,
            "uptime_s": round(now - rec.started, 1) if state == "running" and rec.started else None,
            "held": rec.name in held, "fitted": list(rec.fitted), "boot_s": rec.boot_s,
        })
    known = {r["name"] for r in out}
    for name, alloc in held.items():
        if name not in known:
            out.append({"name": name, "state": "no-record", "job_id": alloc.job_id,
                        "user": alloc.user, "gpus": list(alloc.gpus),
                        "slurm_gpus": list(alloc.slurm_gpus) if alloc.slurm_gpus else None,
                        "numa_nodes": sorted(alloc.memory_mib), "vcpus": len(alloc.cpus),
                        "memory_mib": sum(alloc.memory_mib.values()),
                        "nvswitches": list(alloc.nvswitches), "fm_partition": alloc.fm_partition,
                        "image": None, "address": None, "uptime_s": None, "held": True,
                        "fitted": [], "boot_s": None})
    return sorted(out, key=lambda r: r["name"])


# -- libvirt's qemu hook ---------------------------------------------------------------------------
def hook(env: Env, name: str, op: str, sub_op: str) -> str | None:
    """Keep the ledger true when a domain starts or stops outside dgxvm (virsh, a crash).

    Called by libvirtd (etc/libvirt/hooks/qemu) with the domain name and the operation; it must
    not call back into libvirt. ``prepare begin``: take the VM's resources again from its record
    (nothing to do when the ledger already holds them, e.g. during ``dgxvm create``); a
    conflict raises LedgerConflict, which makes libvirt refuse the start with our message.
    ``release end``: give them back (the drives stay). Domains without a dgxvm record are
    ignored. Returns a line saying what was done, or None.
    """
    try:
        domain_name(name)
    except DgxvmError:
        return None
    rec = env.vms.load(name)
    if rec is None:
        return None
    fm = rec.allocation.get("fm_partition")
    if op == "prepare" and sub_op == "begin":
        if rec.state in ("creating", "deleting"):
            return None
        alloc = Allocation.from_json(rec.allocation)
        with env.ledger.transaction() as txn:
            taken_now = rec.ledger_key not in txn.allocations
            if taken_now:
                try:
                    txn.allocate(alloc)
                except LedgerConflict as exc:
                    raise LedgerConflict(key=rec.ledger_key,
                                         reason=f"cannot start {name}: {exc.reason}") from exc
        if taken_now and fm is not None:
            try:
                env.fabric.activate(fm)
            except DgxvmError:
                env.ledger.release(rec.ledger_key)
                raise
        env.vms.save(rec.with_(state="running", started=time.time(), ended=None))
        return f"{name}: took GPUs {alloc.gpus} again"
    if op == "release" and sub_op == "end":
        if rec.state in ("creating", "deleting"):
            return None
        if fm is not None:
            env.fabric.deactivate(fm)
        env.ledger.release(rec.ledger_key)
        env.vms.save(rec.with_(state="stopped", started=None, ended="stopped outside dgxvm"))
        return f"{name}: stopped; its GPUs, CPUs and memory are free, its drives are kept"
    return None


HOOK_OPS = ("prepare", "release")


def libvirt_hook_script(dgxvm: str = "/usr/local/bin/dgxvm", config: str | None = None) -> str:
    """The text of /etc/libvirt/hooks/qemu that runs ``dgxvm hook`` (etc/libvirt/hooks/qemu is
    this with the defaults). libvirtd reads hooks when it starts."""
    env = f"DGXVM_CONFIG={shlex.quote(config)} " if config else ""
    return (
        "#!/bin/sh\n"
        "# libvirt qemu hook installed for slurm-dgxvm: keeps dgxvm's ledger true when a domain\n"
        "# starts or stops outside dgxvm (virsh start/shutdown/destroy, a guest that powers off\n"
        "# or crashes). \"prepare\" takes the VM's GPUs/CPUs/memory again or refuses the start;\n"
        "# \"release\" gives them back, keeping the drives. Other domains are left alone.\n"
        "# Install: install -m 0755 THIS /etc/libvirt/hooks/qemu, then restart libvirtd.\n"
        f"case \"$2\" in {'|'.join(HOOK_OPS)}) ;; *) exit 0 ;; esac\n"
        f"exec env {env}{shlex.quote(dgxvm)} hook qemu \"$@\" </dev/null\n"
    )
