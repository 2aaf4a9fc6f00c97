"""create: a placement made into a running VM.

The steps, in order (each a method of :class:`_Creation`, named as the progress line it
reports): place and record in the ledger -> the VM directory -> keys, address and seed -> disks
-> design the domain (fit to this host) -> record -> define -> FM partition -> start -> wait
until the guest agent answers -> record "running". Each is timed as one of the create stages
of :mod:`slurm_dgxvm.observe.stages` (:meth:`_Creation.steps` says which); the record keeps
them, and every create, failed or not, is counted in :mod:`slurm_dgxvm.observe.opstats`.

One cleanup path: every step that takes something registers its undo on the one ExitStack; a
failure anywhere unwinds exactly what was done, in reverse, and re-raises the first error.

The VM name's lock (:mod:`.vmlock`) is held from before the ledger is written until the create
returns or its undo is done, so ``dgxvm reconcile`` never takes a create in progress for the
leftovers of a killed one.
"""

from __future__ import annotations

import logging
import os
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from .. import failpoints, ibpart, images as images_mod, seed as seed_mod
from ..virt import hypervisor
from ..observe import opstats
from ..config import Config
from ..design import (FabricNic, RealHost, VmInputs, design, domain_xml, fit_to_host,
                      image_cache_tag, share_tag)
from ..errors import (ContainerCacheError, DomainExists, HostError, HypervisorError,
                      ImageCacheRefused, NoFit, ShareRefused, ShareTimeout, is_job_fault)
from ..fsutil import atomic_write
from ..jobnet.apply import apply as apply_job_fabric, teardown as teardown_job_fabric
from ..jobnet import sshkeys
from ..jobnet.plan import JobFabric
from ..virt.guest import wait_ready
from ..ledger import Allocation, domain_key, job_key
from ..names import domain_name
from ..placement import Occupancy, Placement, Request, place
from ..records import (CONSOLE_LOG, DATA_DISK, DOMAIN_XML, HOST_KEY, IMAGE_CACHE_SPEC,
                       IMAGE_CACHE_WRAPPER, KNOWN_HOSTS, OS_DISK, RANLOG, SEED, SHARE_SPEC,
                       SHARE_WRAPPER, USER_KEY, WARM_CANCEL, VmRecord)
from ..shares import policy as share_policy, virtiofsd as share_server
from ..observe.stages import StageTimer
from . import vmlock
from .cachedir import user_cache_dir
from .env import Env, Progress, quiet
from .identity import group_names, hostname_for

log = logging.getLogger("dgxvm.lifecycle")


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
    fabric: JobFabric | None = None   # a multi-node job's fabric on this node (jobnet.plan)
    warm: str | None = None           # booted ahead for partition NAME's jobs to claim
                                      # (lifecycle.warm; "": no partition named)


def create(env: Env, req: CreateRequest, progress: Progress = quiet,
           timer: StageTimer | None = None) -> VmRecord:
    """Create, start and wait for the VM ``req`` asks for; return its record (state running,
    ``create_stages`` the seconds of each stage).

    ``timer`` (a new one by default) is told each stage as it runs: a caller that passes its
    own still has the stages a failed create reached (the Prolog puts them in the job's
    AdminComment). The create is counted in :mod:`slurm_dgxvm.observe.opstats`, failed or not,
    unless :meth:`_Creation.preflight` refused the request for its own fault (nothing was taken).

    Raises: BadName (bad name), DomainExists, ImageError, RequestError / NoFit (placement),
    ShareRefused (the work dir; ImageCacheRefused: the user's image cache, ShareTimeout: the
    user's files did not answer in time), ContainerCacheError (``<cache_dir>`` itself),
    LedgerConflict / LedgerLockTimeout, SeedError, DiskError, FabricError, HypervisorError,
    GuestTimeout, LockTimeout (another dgxvm kept the name's lock, see :mod:`.vmlock`). On any
    of them nothing is left behind.
    """
    timer = timer if timer is not None else StageTimer()
    c = _Creation(env, req, progress)
    state_dir = env.cfg.host.state_dir
    with ExitStack() as lock:
        try:
            with timer.stage("preflight"):
                # the name's lock, before the ledger is written and until the undo is done:
                # `dgxvm reconcile` leaves a VM alone while it is held (vmlock)
                lock.enter_context(vmlock.held(state_dir, c.name, timeout=vmlock.wait_s(env.cfg)))
                c.preflight()
            with ExitStack() as undo:
                c.undo = undo
                for stage, step in c.steps():
                    with timer.stage(stage):
                        step()
                    failpoints.hit(state_dir, f"after:{step.__name__}", c.name)
                c.finish(timer)
                undo.pop_all()
        except BaseException as exc:
            # a request refused before anything was taken (a work dir that may not be shared)
            # writes nothing on this node: Slurm's accounting has the refusal
            if timer.failed != "preflight" or not is_job_fault(exc):
                opstats.observe(state_dir, "create", timer, failure=exc)
            raise
    opstats.observe(env.cfg.host.state_dir, "create", timer)
    log.info("%s: running, GPUs %s, %s", c.name, list(c.placement.gpus), c.address)
    return c.record


class _Creation:
    """One create in progress: what each step made, for the steps after it and for undo."""

    undo: ExitStack
    placement: Placement
    alloc: Allocation
    vmdir: Path
    address: str
    mac: str
    xml: str
    record: VmRecord
    lock_s: float | None = None
    share: share_policy.ShareSpec | None = None
    share_refused: str | None = None
    image_cache: share_policy.ShareSpec | None = None
    image_cache_refused: str | None = None
    data_gib: int = 0
    fitted: tuple[str, ...] = ()
    job_ssh: tuple | None = None     # (user key, host key, known_hosts) of a multi-node job

    def __init__(self, env: Env, req: CreateRequest, progress: Progress):
        self.env, self.req, self.progress, self.cfg = env, req, progress, env.cfg
        self.t0 = time.monotonic()
        self.name = domain_name(req.name)
        self.key = job_key(req.job_id) if req.owner == "job" else domain_key(self.name)

    def preflight(self) -> None:
        """What can be refused before anything is taken: the name, the image, the shares (the
        work dir, and the user's image cache, each opened and pinned as the user), the site's
        secret for a multi-node job's SSH keys."""
        env, name = self.env, self.name
        self.conn = env.connect()
        if hypervisor.lookup(self.conn, name) is not None:
            raise DomainExists(name=name, where=f" in libvirt ({env.uri})")
        if env.vms.exists(name):
            raise DomainExists(name=name, where=f" ({env.vms.dir(name)})")
        self.image = env.images.get(self.req.image)
        if self.req.uid:
            self.progress("checking the shares as the job's user")
        self.share, self.share_refused = check_share(self.cfg, self.req)
        self.image_cache, self.image_cache_refused = check_image_cache(self.cfg, self.req,
                                                                       self.share)
        self.job_ssh = self._job_ssh()
        self.host = env.host

    def steps(self) -> Iterator[tuple[str, Callable[[], None]]]:
        """(stage, step) in the order they run, after :meth:`preflight`. Lazy: whether there
        is an ``fm`` stage is known once :meth:`place` has run."""
        yield "placement", self.place
        yield "seed", self.make_dir
        yield "seed", self.keys_address_seed
        yield "disks", self.disks
        yield "define", self.design
        yield "define", self.define
        yield "define", self.arm_reset
        if self.placement.fm_partition is not None:     # no Fabric Manager: no fm stage
            yield "fm", self.activate_fabric
        if self.placement.ib and self.req.job_id is not None:   # its InfiniBand partition key
            yield "ib", self.join_ib_partition
        if self.req.fabric is not None:                 # a multi-node job: its fabric here
            yield "jobnet", self.make_job_fabric
        yield "start", self.start
        yield "ready", self.wait_for_guest

    def place(self) -> None:
        """Place and record in the ledger, leaving quarantined devices out; then check the
        devices chosen (``[health] check_before_launch``): one that fails is quarantined and
        the placement made again without it."""
        self.progress("placing")
        env, req = self.env, self.req
        policy = env.policy
        if req.alignment and req.alignment != policy.alignment:
            policy = replace(policy, alignment=req.alignment)
        for _attempt in range(len(self.host.gpus) + len(self.host.nvswitches) + 1):
            self._place_once(policy)
            bad = self._check_chosen()
            if not bad:
                return
            env.ledger.release(self.key)
            for v in bad:
                log.warning("%s: %s failed its check before launch and is quarantined: %s",
                            self.name, v.pci, v.reason)
        # each round quarantines at least one more device: placement runs out before this
        raise HostError("placement kept choosing devices that fail their check before launch")

    def _place_once(self, policy) -> None:
        env, req = self.env, self.req
        with env.ledger.transaction() as txn:
            # read inside the ledger's lock: a teardown quarantines before it releases
            quarantined = env.health.quarantined()
            taken = txn.occupancy()
            if quarantined:
                taken = Occupancy.union([taken, quarantine_occupancy(self.host, quarantined)])
            try:
                self.placement = place(self.host, taken, req.placement, policy)
            except NoFit as exc:
                if quarantined:
                    exc.message = (f"{exc.message}; quarantined (`dgxvm gpu show`): "
                                   + ", ".join(sorted(quarantined)))
                    exc.args = (exc.message,)
                raise
            self.alloc = txn.allocate(Allocation.from_placement(
                self.key, self.placement, owner=req.owner, job_id=req.job_id, domain=self.name,
                user=req.user))
        self.lock_s = env.ledger.last_held_s

    def _check_chosen(self):
        """The chosen devices' check before launch; the ones that failed (now quarantined)."""
        h = self.cfg.health
        if not h.check_before_launch:
            self.undo.callback(self.env.ledger.release, self.key)
            return ()
        from ..health import check
        devices = tuple(self.alloc.gpu_pcis) + tuple(self.alloc.nvswitches)
        who = f"create of {self.name}" + (f" (job {self.req.job_id})" if self.req.job_id else "")
        try:
            bad = check(self.env.sysfs, self.env.health, devices, by=who, job=self.req.job_id,
                        vm=self.name).bad
        except BaseException:
            self.env.ledger.release(self.key)
            raise
        if not bad:
            self.undo.callback(self.env.ledger.release, self.key)
        return bad

    def make_dir(self) -> None:
        vms = self.env.vms
        try:
            self.vmdir = vms.make_dir(self.name)
        except FileExistsError:
            raise DomainExists(name=self.name, where=f" ({vms.dir(self.name)})") from None
        self.undo.callback(vms.remove_dir, self.name)

    def keys_address_seed(self) -> None:
        self.progress("keys, address and seed")
        cfg, req, name, vmdir = self.cfg, self.req, self.name, self.vmdir
        job_ssh = self.job_ssh
        if job_ssh is not None:            # the host key every VM of the job knows this one by
            host = job_ssh[1]
            atomic_write(vmdir / HOST_KEY, host.private, mode=0o600)
            atomic_write(vmdir / (HOST_KEY + ".pub"), host.public + "\n", mode=0o644)
            host_pub = host.public
        else:
            host_pub = seed_mod.generate_keypair(vmdir / HOST_KEY, f"root@{name}")
        net = hypervisor.ensure_network(self.conn, cfg.libvirt.network,
                                        cfg.libvirt.network_cidr, cfg.host.state_dir)
        self.mac, self.address = hypervisor.take_address(self.conn, net, cfg.host.state_dir,
                                                         name, cfg.libvirt.network_cidr)
        self.undo.callback(hypervisor.give_back_address, self.conn, cfg.libvirt.network,
                           cfg.host.state_dir, name, self.mac)
        user_pub = user_files(vmdir, req, name, self.address, host_pub)
        mounts = tuple(s.mount for s in share_files(cfg, vmdir, self.share, self.image_cache))
        home = req.home or (f"/home/{req.user}" if req.uid else "/root")
        seed_mod.write_seed(seed_mod.SeedSpec(
            instance_id=f"{name}-{int(time.time())}", hostname=hostname_for(name),
            user_name=req.user, uid=req.uid, gid=req.gid, home=home,
            authorized_keys=(user_pub,) + ((job_ssh[0].public,) if job_ssh else ()),
            host_key_private=(vmdir / HOST_KEY).read_text(),
            host_key_public=host_pub, mounts=mounts, groups=group_names(req.groups),
            fabric=fabric_seed(req.fabric, job_ssh[0] if job_ssh else None,
                               job_ssh[2] if job_ssh else "")),
            vmdir / SEED, name=name)

    def _job_ssh(self):
        """(the job's user key, this VM's host key, the job's known_hosts) of a multi-node job
        when the site has a secret to derive them from ([jobnet] ssh_secret), else None."""
        fab = self.req.fabric
        if fab is None:
            return None
        secret = sshkeys.read_secret(self.cfg.jobnet.ssh_secret)
        if secret is None:
            return None
        return (sshkeys.user_key(secret, fab.job_id),
                sshkeys.host_key(secret, fab.job_id, fab.index),
                sshkeys.known_hosts(secret, fab.job_id, fab.hosts))

    def disks(self) -> None:
        self.progress("disks")
        images_mod.create_overlay(self.image, self.vmdir / OS_DISK, self.placement.disk_gib)
        req = self.req
        self.data_gib = req.data_disk_gib if req.data_disk_gib is not None \
            else self.cfg.vm.data_disk_gib
        if self.data_gib:
            images_mod.create_disk(self.vmdir / DATA_DISK, self.data_gib)

    def design(self) -> None:
        """Design the domain (fitted to this host when it is simulated) and write the record
        that says what this VM is and holds, state "creating"."""
        self.progress("designing the domain")
        cfg, req, vmdir, share, cache = self.cfg, self.req, self.vmdir, self.share, self.image_cache
        vm_uuid = str(uuid_mod.uuid4())
        spec = design(self.host, self.placement, self.image, VmInputs(
            name=self.name, uuid=vm_uuid, owner=req.owner, job_id=req.job_id, user=req.user,
            os_disk=str(vmdir / OS_DISK), seed=str(vmdir / SEED),
            data_disk=str(vmdir / DATA_DISK) if self.data_gib else None,
            console_log=str(vmdir / CONSOLE_LOG), network=cfg.libvirt.network, mac=self.mac,
            share=cfg.vm.share, workdir=share.path if share else None,
            share_binary=str(vmdir / SHARE_WRAPPER) if share else None, address=self.address,
            image_cache=cache.path if cache else None,
            image_cache_binary=str(vmdir / IMAGE_CACHE_WRAPPER) if cache else None,
            fabric=fabric_nic(req.fabric), shares_later=req.warm is not None),
            domain_type=cfg.libvirt.domain_type, machine_type=cfg.libvirt.machine_type)
        if self.env.fit(self.host):
            spec, self.fitted = fit_to_host(spec, RealHost.probe(), max_vcpus=cfg.vm.fit_vcpus,
                                            max_memory_mib=cfg.vm.fit_memory_mib)
            for line in self.fitted:
                log.info("%s: fit to this host: %s", self.name, line)
        self.xml = domain_xml(spec)
        atomic_write(vmdir / DOMAIN_XML, self.xml, mode=0o600)
        self.record = VmRecord(
            name=self.name, uuid=vm_uuid, state="creating", owner=req.owner,
            ledger_key=self.key, job_id=req.job_id, user=req.user, uid=req.uid, gid=req.gid,
            workdir=share.path if share else None, image=self.image.name,
            image_version=self.image.version, address=self.address, mac=self.mac,
            network=cfg.libvirt.network, allocation=self.alloc, placement=self.placement,
            fitted=self.fitted, created=time.time(),
            lock_s=round(self.lock_s, 6) if self.lock_s is not None else None,
            image_cache=cache.path if cache else None, groups=tuple(req.groups),
            jobnet=fabric_record(req.fabric),
            extra={k: v for k, v in (("share_refused", self.share_refused),
                                     ("image_cache_refused", self.image_cache_refused)) if v}
            | (_warm_extra(req.warm, self.data_gib) if req.warm is not None else {}))
        self.env.vms.save(self.record)

    def define(self) -> None:
        self.progress("defining")
        with hypervisor.libvirt_errors(self.env.uri, f"define domain {self.name}"):
            self.dom = self.conn.defineXML(self.xml)
        self.undo.callback(hypervisor.undefine, self.dom)

    def arm_reset(self) -> None:
        """Undone after destroy and the FM partition's deactivation, before undefine: a VM
        that was started had the devices; they are reset and checked as after any VM."""
        self.undo.callback(self._check_after_failed_start)

    def _check_after_failed_start(self) -> None:
        if getattr(self, "started", None) is None:
            return
        from .delete import check_devices
        check_devices(self.env, self.name,
                      tuple(self.alloc.gpu_pcis) + tuple(self.alloc.nvswitches), self.req.job_id)

    def activate_fabric(self) -> None:
        fm = self.placement.fm_partition      # not None: steps() runs this only then
        self.progress(f"activating fabric manager partition {fm}")
        self.env.fabric.activate(fm)
        self.undo.callback(self.env.fabric.deactivate, fm)

    def join_ib_partition(self) -> None:
        """The VM's InfiniBand functions into the job's partition key (:mod:`slurm_dgxvm.ibpart`):
        each VF's GUID set, then the GUIDs added to the key at the subnet manager; taken out
        again by the undo. On a simulated host there is no PF to set a VF's GUID on: the
        commands are logged as simulated, not run."""
        plan = ibpart.plan_for(self.req.job_id, self.placement, self.host,
                               pkey_min=self.cfg.ib.pkey_min, pkey_max=self.cfg.ib.pkey_max)
        self.progress(f"InfiniBand partition key {plan.pkey_hex} ({len(plan.members)} "
                      f"function(s))")
        self.undo.callback(ibpart.remove, plan, self.cfg)
        ibpart.apply(plan, self.cfg, run=ib_runner(self.env, self.host, self.name))

    def make_job_fabric(self) -> None:
        """The job's fabric on this node (its VXLAN segment, bridge, forwarding entries to the
        job's other nodes, the firewall's entry for it), before the domain that plugs into it
        starts; removed by the undo."""
        fab = self.req.fabric
        self.progress(f"job fabric {fab.bridge} (VNI {fab.vni}, {len(fab.peers)} peer(s))")
        self.undo.callback(teardown_job_fabric, fab.vni)
        apply_job_fabric(fab)

    def start(self) -> None:
        self.progress("starting")
        try:
            hypervisor.start(self.dom, self.env.uri, f"start domain {self.name}")
        except HypervisorError:
            # the job's fault: its work dir or its image cache changed since the check
            _share_refusal(self.vmdir, self.image_cache.path if self.image_cache else None)
            raise
        self.undo.callback(hypervisor.destroy, self.dom)
        self.started = time.time()

    def wait_for_guest(self) -> None:
        self.progress("waiting for the guest")
        cancel = self.vmdir / WARM_CANCEL

        def cancelled() -> str | None:      # a job's claim found this warm VM in its way
            return "a job needs its devices" if cancel.exists() else None
        wait_ready(self.dom, name=self.name, timeout_s=self.cfg.libvirt.ready_timeout_s,
                   console_log=self.vmdir / CONSOLE_LOG, readiness=self.image.readiness,
                   cancelled=cancelled if self.req.warm is not None else None)

    def finish(self, timer: StageTimer) -> None:
        """Record "running", with the boot time and the stages' times; a warm VM's user key
        removed (root's, which nobody is to hold) and its record marked waiting."""
        extra = self.record.extra
        if self.req.warm is not None:
            for f in (USER_KEY, USER_KEY + ".pub", KNOWN_HOSTS):
                (self.vmdir / f).unlink(missing_ok=True)
            extra = {**extra, "warm": "waiting"}
        self.record = self.record.with_(state="running", started=self.started,
                                        boot_s=round(time.monotonic() - self.t0, 3),
                                        create_stages=timer.seconds(), extra=extra)
        self.env.vms.save(self.record)


def ib_runner(env: Env, host, name: str):
    """How the ``ip link`` commands that set VF GUIDs run: for real on a real host; logged as
    simulated on a simulated one (its PFs have no network interface to set them through)."""
    if not env.fit(host):
        return ibpart.run_ip

    def simulated(argv, _timeout, pkey):
        log.info("%s: simulated (no HCA here), partition key %s: %s", name, pkey, " ".join(argv))
    return simulated


def user_files(vmdir: Path, req: CreateRequest, name: str, address: str, host_pub: str) -> str:
    """What the VM's user gets in its directory, theirs: the key pair they log in with, the
    known_hosts pinning the guest's host key ``host_pub`` at ``address``, and the empty log of
    the images their dgxvm run ran (the Epilog reads it, checked). Returns the public key."""
    user_pub = seed_mod.generate_keypair(vmdir / USER_KEY, f"{req.user}@{name}")
    os.chown(vmdir / USER_KEY, req.uid, req.gid)
    os.chown(vmdir / (USER_KEY + ".pub"), req.uid, req.gid)
    atomic_write(vmdir / KNOWN_HOSTS, f"{address} {host_pub}\n", mode=0o600,
                 uid=req.uid, gid=req.gid)
    atomic_write(vmdir / RANLOG, "", mode=0o600, uid=req.uid, gid=req.gid)
    return user_pub


@dataclass(frozen=True)
class ServedShare:
    """A share of the VM: how the guest mounts it, its spec and the wrapper that serves it as
    the job's user (:mod:`slurm_dgxvm.shares.virtiofsd`)."""

    mount: seed_mod.Mount
    spec: Path
    wrapper: Path


def share_files(cfg: Config, vmdir: Path, share: share_policy.ShareSpec | None,
                cache: share_policy.ShareSpec | None) -> tuple[ServedShare, ...]:
    """Write the specs and wrappers of the work dir ``share`` and the image ``cache`` (read-only)
    into ``vmdir``; the shares, work dir first."""
    out = []
    if share is not None:
        share.save(vmdir / SHARE_SPEC)
        atomic_write(vmdir / SHARE_WRAPPER, share_server.wrapper_script(
            vmdir / SHARE_SPEC, virtiofsd=cfg.vm.virtiofsd), mode=0o700)
        out.append(ServedShare(seed_mod.Mount(tag=share_tag(share.path), path=share.path,
                                              fstype=cfg.vm.share),
                               vmdir / SHARE_SPEC, vmdir / SHARE_WRAPPER))
    if cache is not None:
        cache.save(vmdir / IMAGE_CACHE_SPEC)
        atomic_write(vmdir / IMAGE_CACHE_WRAPPER, share_server.wrapper_script(
            vmdir / IMAGE_CACHE_SPEC, virtiofsd=cfg.vm.virtiofsd,
            what="The container image cache share", read_only=True), mode=0o700)
        out.append(ServedShare(seed_mod.Mount(tag=image_cache_tag(cache.path), path=cache.path,
                                              fstype=cfg.vm.share, read_only=True),
                               vmdir / IMAGE_CACHE_SPEC, vmdir / IMAGE_CACHE_WRAPPER))
    return tuple(out)


def _warm_extra(partition: str, data_gib: int) -> dict:
    """A warm VM's record marks (lifecycle.warm): booting until the create is done."""
    return {"warm": "booting", "data_disk_gib": data_gib} | \
        ({"partition": partition} if partition else {})


def fabric_nic(fab: JobFabric | None) -> FabricNic | None:
    """The VM's NIC on its job's fabric, as the designer takes it."""
    if fab is None:
        return None
    return FabricNic(bridge=fab.bridge, mac=fab.mac, mtu=fab.mtu, address=str(fab.vm_address.ip))


def fabric_seed(fab: JobFabric | None, user_key: sshkeys.KeyPair | None = None,
                known_hosts: str = "") -> seed_mod.Fabric | None:
    """What the guest is told of its job's fabric: its NIC, every node's name and address, and
    (when the site derives them) the job's SSH key and every node's VM's host key."""
    if fab is None:
        return None
    return seed_mod.Fabric(mac=fab.mac, address=str(fab.vm_address), mtu=fab.mtu,
                           hosts=tuple((n, str(a)) for n, a in fab.hosts),
                           ssh_key=user_key.private if user_key else None,
                           ssh_key_public=user_key.public if user_key else None,
                           known_hosts=known_hosts)


def fabric_record(fab: JobFabric | None) -> dict | None:
    """The job fabric in the VM's record: what the teardown removes (the VNI) and what the
    job's user is shown (``dgxvm job``)."""
    return fab.to_dict() if fab is not None else None


def quarantine_occupancy(host, quarantined) -> Occupancy:
    """Quarantined devices (PCI addresses) as an occupancy placement must leave alone."""
    switches = {s.pci for s in host.nvswitches}
    return Occupancy(gpus=frozenset(p for p in quarantined if p not in switches),
                     nvswitches=frozenset(p for p in quarantined if p in switches))


def check_share(cfg: Config,
                req: CreateRequest) -> tuple[share_policy.ShareSpec | None, str | None]:
    """(what to share, why the work dir is not shared) for ``req``, before anything is taken.

    Raises ShareRefused when the work dir may not be shared and ``vm.share_refused`` is
    "refuse"; with "no-share" the VM boots without it and the reason is returned.
    """
    if not req.workdir or cfg.vm.share == "none":
        return None, None

    def check() -> share_policy.ShareSpec:
        if req.uid == 0:
            raise ShareRefused(value=req.workdir, reason="a VM of root gets no share")
        return share_policy.check(req.workdir, cfg.vm.share_roots, req.uid, req.gid,
                                  (req.gid, *req.groups))
    return _under_share_policy(cfg, req, check, ShareRefused)


def check_image_cache(cfg: Config, req: CreateRequest, share: share_policy.ShareSpec | None
                      ) -> tuple[share_policy.ShareSpec | None, str | None]:
    """(the image cache share, why the VM gets none) for ``req``, before anything is taken:
    :func:`image_cache_share` under the work dir's policy. Raises ImageCacheRefused when the
    job's user has made their cache unusable and ``vm.share_refused`` is "refuse"; with
    "no-share" the VM boots without it and the reason is returned (logged, and kept in the VM
    record as ``image_cache_refused``)."""
    return _under_share_policy(cfg, req, lambda: image_cache_share(cfg, req, share),
                               ImageCacheRefused)


def _under_share_policy(cfg: Config, req: CreateRequest,
                        check: Callable[[], share_policy.ShareSpec | None],
                        refusal: type[ShareRefused]
                        ) -> tuple[share_policy.ShareSpec | None, str | None]:
    """(``check()``, None), or when it raises ``refusal``: raised again under ``vm.share_refused
    = "refuse"``; (None, why) under "no-share", the VM then booting without that share."""
    try:
        return check(), None
    except refusal as exc:
        if cfg.vm.share_refused == "refuse":
            raise
        log.warning("%s: %s; the VM boots without it (vm.share_refused = no-share)",
                    req.name, exc)
        return None, str(exc)


def image_cache_share(cfg: Config, req: CreateRequest,
                      share: share_policy.ShareSpec | None) -> share_policy.ShareSpec | None:
    """The user's container image cache (``<cache_dir>/<uid>``, made if missing), pinned for
    its share as the work dir is; None when the VM gets none: a VM of root, no
    ``containers.cache_dir``, ``vm.share`` other than "virtiofs", or a work dir share that is
    that very directory (already shared, read-write).

    Two owners, two faults. ``<cache_dir>``, the path to it and the entry ``<uid>`` in it are
    root's to make (:func:`user_cache_dir`): anything wrong there (a symlink, an entry of
    another uid, a parent the user cannot traverse) is ContainerCacheError, the node's fault.
    The directory itself is the user's: one they made unusable for its share as themselves
    (``chmod 000``; a stopped process or FUSE mount of theirs in the way: opened as the user
    with a deadline) is ImageCacheRefused, the job's fault.
    """
    if req.uid == 0 or not cfg.containers.cache_dir or cfg.vm.share != "virtiofs":
        return None
    path = str(user_cache_dir(cfg, req.uid, req.gid))
    if share is not None and share.path == path:
        return None
    try:
        return share_policy.pin(path, req.uid, req.gid, (req.gid, *req.groups))
    except ShareTimeout as exc:
        raise ImageCacheRefused(value=path, reason=exc.reason) from None
    except ShareRefused as exc:
        at = exc.fields.get("at")
        if at is not None and at != path:     # above the user's own directory: root's path
            raise ContainerCacheError(path=path, reason=f"the job's user cannot open it "
                                                        f"({exc.reason}); containers.cache_dir "
                                                        f"must be reachable by every user"
                                      ) from None
        raise ImageCacheRefused(value=path, reason=f"the job's user cannot open it as "
                                                   f"themselves: {exc.reason}") from None


def _share_refusal(vmdir: Path, image_cache: str | None = None) -> None:
    """Why a share's virtiofsd stopped the start: ShareRefused when the work dir's refused its
    directory, ImageCacheRefused when the image cache's did (the job's fault, both: the user
    changed or shut out the directory since the check), HostError when the node could not
    serve a share; nothing when none said anything (then libvirt's own error stands)."""
    line = _read_line(vmdir / share_server.ERROR_FILE)
    if line is None:
        line = _read_line(share_server.error_file_of(vmdir / IMAGE_CACHE_SPEC))
        if line is None:
            return
        if line.startswith(share_server.REFUSED_PREFIX):
            said = line[len(share_server.REFUSED_PREFIX):]
            path = image_cache or "(the image cache)"
            # its virtiofsd says it as ShareRefused does, of a work dir: keep the reason
            prefix = str(ShareRefused(value=path, reason=""))
            raise ImageCacheRefused(value=path, reason=f"when the VM started: "
                                                       f"{said.removeprefix(prefix)}")
        raise HostError(reason=f"the container image cache share could not be served: "
                               f"{line}")
    if line.startswith(share_server.REFUSED_PREFIX):
        raise ShareRefused(line[len(share_server.REFUSED_PREFIX):])
    raise HostError(reason=f"the work dir share could not be served: {line} "
                           f"(`dgxvm share check` tells what this node lacks)")


def _read_line(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
