"""Every error slurm-dgxvm raises on purpose.

Each error has a message template filled from keyword arguments (kept as attributes, so callers
and tests can look at the bad value rather than parse text) and an exit code. Only the CLI and the
Slurm hooks turn an error into a message and an exit status; library code just raises.

Exit codes (stable, scripts may rely on them; docs/reference/exit-codes.md is generated from them):
    1  internal / unexpected (a bug), or a Slurm hook stopped by a signal (Interrupted)
    2  bad input (usage, malformed values, unknown config keys, a job's refused value)
    3  the host cannot be read or cannot do what was asked: sysfs, catalog, a host tool
       (ssh-keygen, xorriso, qemu-img create, fmpm, nft, Slurm's commands), the InfiniBand
       subnet manager (UFM, OpenSM)
    4  no fit: the request is well formed but cannot be placed now
    5  state: the ledger is corrupt or in conflict, a lock (the ledger's, the network's, a
       container cache entry's) was not acquired in time, the container cache is unusable
    6  VM lifecycle: libvirt/QEMU refused or failed, or the guest never became ready

Errors about one quantity of a placement request (:class:`RequestError`, :class:`NoFit`) carry
it as ``quantity`` (the Request field: ``gpu_index``, ``vcpus``, ``memory_mib``, ``disk_gib``)
and ``value``, and their message calls it by its own name ("vcpus 5", "memory 9999 MiB"): the
library cannot know where a value came from. The edge that does renames it
(:meth:`QuantityNamed.naming`): the CLI its flag (``--vcpus 5``), the Prolog the partition key.
"""

from __future__ import annotations

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_HOST = 3
EXIT_NO_FIT = 4
EXIT_STATE = 5
EXIT_VM = 6

#: How a message names a request's quantity by default: (words, unit of its value).
QUANTITIES = {"gpu_index": ("gpu index", ""), "vcpus": ("vcpus", ""),
              "memory_mib": ("memory", "MiB"), "disk_gib": ("disk", "GiB"), "ib": ("ib", "")}


class DgxvmError(Exception):
    """Base class. Subclasses set ``template`` and ``exit_code``."""

    template = "dgxvm failed"
    exit_code = EXIT_INTERNAL

    def __init__(self, message: str | None = None, **fields):
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)
        if message is None:
            try:
                message = self.template.format(**fields)
            except (KeyError, IndexError):  # a template/field mismatch must not hide the error
                message = f"{self.template} {fields!r}"
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class QuantityNamed(DgxvmError):
    """Base of an error that may be about one quantity of a request (``quantity``, ``value``
    fields). Then the message is ``named_template``, where ``{subject}`` names the quantity:
    by default its own words and value (``vcpus 5``, ``memory 9999 MiB``)."""

    named_template = "{subject} {reason}"
    quantity: str | None = None

    def __init__(self, message: str | None = None, **fields):
        if fields.get("quantity") is not None:
            words, unit = QUANTITIES.get(fields["quantity"], (fields["quantity"], ""))
            fields.setdefault("subject", f"{words} {_amount(fields.get('value'), unit)}")
            if message is None:
                try:
                    message = self.named_template.format(**fields)
                except (KeyError, IndexError):   # a missing field: the plain template
                    message = None
        super().__init__(message, **fields)

    @property
    def amount(self) -> str:
        """The value with its unit (``5``, ``9999 MiB``): for an edge's own ``subject``."""
        quantity = self.fields.get("quantity")
        return _amount(self.fields.get("value"), QUANTITIES.get(quantity, ("", ""))[1])

    def naming(self, subject: str):
        """This error with its quantity called ``subject`` (``--vcpus 5``, or the partition
        key the value came from); an error about no quantity is returned as it is."""
        if self.fields.get("quantity") is None:
            return self
        return type(self)(**{**self.fields, "subject": subject})


def _amount(value, unit: str) -> str:
    return f"{value} {unit}" if unit else f"{value}"


# -- bad input -------------------------------------------------------------------------------------
class BadInput(DgxvmError):
    template = "bad input: {value!r}"
    exit_code = EXIT_BAD_INPUT


class GpuListError(BadInput):
    """A GPU list (``0-3,8``) that does not parse or names GPUs that do not exist."""

    template = "bad GPU list {value!r}: {reason}"


class CpuListError(BadInput):
    template = "bad CPU list {value!r}: {reason}"


class ConfigError(BadInput):
    template = "config {path}: {reason}"


class RequestError(QuantityNamed, BadInput):
    """A placement request that can never be satisfied on this host (not just: not now).

    With ``quantity`` and ``value``: "{subject} {reason}" (see :class:`QuantityNamed`)."""

    template = "{reason}"


class BadName(BadInput):
    """A domain, image or other name given by a person that is not a safe identifier."""

    template = "bad {kind} name {value!r}: {reason}"


class ImageError(BadInput):
    """An image that is missing, unreadable, corrupt, or cannot be installed/removed."""

    template = "image {name}: {reason}"


class ImageInUse(ImageError):
    template = "image {name} is in use by {users}; delete those VMs first"


class DomainExists(BadInput):
    template = "domain {name} already exists{where}"


class JobInputError(BadInput):
    """A value a Slurm job controls (its environment, comment, work dir, user, sizes) that this
    node refuses. Always the job's fault: the job is refused, the node stays in service.
    ``what`` names the input, ``value`` the bad value."""

    template = "{what} {value!r}: {reason}"


class ShareRefused(JobInputError):
    """A directory the job asked to share into its VM that the share policy or the job's own
    user cannot reach (outside ``vm.share_roots``, a symlink component, not a directory)."""

    template = "work dir {value!r} is not shared into the VM: {reason}"


class ShareTimeout(ShareRefused):
    """A share's directory that the job's user's files did not let dgxvm open within
    ``timeout`` seconds (a FIFO, a stopped FUSE daemon, a process of theirs stopped): refused
    like any other (:class:`UserTreeTimeout` says why this is the job's fault)."""


class ImageCacheRefused(ShareRefused):
    """The job's user's own container image cache (``<cache_dir>/<uid>``) that the user has
    made unusable for its share (``chmod 000``, a FIFO or a stopped process in the way, changed
    between the Prolog's check and the VM's start): the job's fault, handled like a work dir
    that may not be shared (``[vm] share_refused``)."""

    template = "container image cache {value!r} is not shared into the VM: {reason}"


class UserTreeRefused(JobInputError):
    """Something in a tree the job's user controls on the host (their container image cache,
    their work dir), which dgxvm touches only as that user (:mod:`slurm_dgxvm.shares.asuser`),
    and would not use: a FIFO, socket, device or symbolic link where a file or directory
    belongs, a directory the user shut themselves out of, the user's process that read it
    killed. Always the job's fault, never the node's. ``value`` is the path, ``reason`` why."""

    template = "{value!r}: {reason}"


class UserTreeTimeout(UserTreeRefused):
    """The job's user's files did not answer within ``timeout`` seconds (a FIFO where a file
    belongs, a stopped FUSE daemon, ``kill -STOP`` of the process reading them as the user):
    that process was killed, nothing waits for it. ``doing`` says what it was doing."""

    def __init__(self, message: str | None = None, **fields):
        if "reason" not in fields:
            timeout = fields.get("timeout")
            doing = fields.get("doing")
            fields["reason"] = (f"the user's files did not answer within "
                                f"{timeout:g}s" if isinstance(timeout, int | float)
                                else "the user's files did not answer in time") \
                + (f" ({doing})" if doing else "")
        super().__init__(message, **fields)


class ContainerRefError(BadInput):
    """A ``--container-image`` reference that is not one (pyxis/enroot syntax, or Docker's)."""

    template = "container image {value!r}: {reason}"


class ContainerMountError(BadInput):
    """A ``--container-mounts`` entry that is not ``SRC[:DST[:FLAGS]]`` as pyxis takes it."""

    template = "--container-mounts entry {value!r}: {reason}"


class DomainNotFound(BadInput):
    template = "no dgxvm domain named {name}"


class NotOurDomain(DomainNotFound):
    """A libvirt domain of that name exists, but dgxvm did not create it: left to virsh."""

    template = ("no dgxvm domain named {name} (a libvirt domain dgxvm did not create; "
                "use virsh for it)")


class JobRefused(BadInput):
    """The job asks for something this node will not give it (its fault, not the node's)."""

    template = "{reason}"


class NotAJob(BadInput):
    """The hook was not run by slurmd for a job (no job id to refuse): the node's problem
    (the hooks exit 1 for it, as for every fault of the node)."""

    template = "not run by slurmd for a job: {reason}"


# -- the host --------------------------------------------------------------------------------------
class HostError(DgxvmError):
    template = "host: {reason}"
    exit_code = EXIT_HOST


# the Debian package of each optional Python module a command may need
MODULE_PACKAGES = {"libvirt": "python3-libvirt", "libvirt_qemu": "python3-libvirt",
                   "pynvml": "python3-pynvml", "yaml": "python3-yaml"}


class ModuleMissing(HostError):
    """A command needs a Python module this host lacks: an installation fault, named."""
    template = "this command needs the Python module {module!r}, which is not installed " \
               "(apt-get install {package})"

    def __init__(self, module: str):
        super().__init__(module=module, package=MODULE_PACKAGES.get(module, f"python3-{module}"))


class SysfsError(HostError):
    """A sysfs file that should be readable is not, or holds something unexpected."""

    template = "cannot read {path}: {reason}"


class TopologyError(HostError):
    template = "topology: {reason}"


class SimulateError(HostError):
    template = "simulate: {reason}"


class SimulateUsage(BadInput):
    """Arguments of ``dgxvm simulate`` that make neither of its forms (a new tree, faults
    into an existing one); ``param`` names the argument at fault (None: the combination)."""

    template = "{reason}"


class SeedError(HostError):
    """Building a per-VM NoCloud seed or key failed (tool output attached)."""

    template = "seed for {name}: {reason}"


class FabricError(HostError):
    """Fabric Manager partition (fmpm) activation/deactivation failed."""

    template = "fabric manager partition {partition}: {reason}"


class JobFabricError(HostError):
    """A multi-node job's fabric on this node (its VXLAN device, bridge, forwarding entries or
    nft guard, :mod:`slurm_dgxvm.jobnet`) could not be made or removed: the node's fault, like
    :class:`FabricError`. ``job`` and ``vni`` name the job, ``step`` what was being done,
    ``reason`` the tool's output, or the other job a device of the same VNI belongs to."""

    template = "job {job} fabric (VNI {vni}): {step}: {reason}"


class IbPartitionError(HostError):
    """The InfiniBand subnet manager (UFM's REST API, or OpenSM's partition file) refused or
    failed a job's partition key: ``call`` names the request or file, ``pkey`` the key."""

    template = "infiniband partition key {pkey}: {call}: {reason}"


class DiskError(HostError):
    """A per-VM disk (overlay, data disk) could not be created."""

    template = "disk {path}: {reason}"


class FirewallError(HostError):
    """nft refused or failed: the network must not run without its rules."""

    template = "network {network}: firewall: {reason}"


class HealthStoreError(HostError):
    """``<state_dir>/gpu-health.json`` (quarantined GPUs and their history) cannot be read or
    written. A node that cannot tell which GPUs are quarantined gives out none: a node fault."""

    template = "GPU health record {path}: {reason}"


class SlurmCommandError(HostError):
    """A Slurm command (scontrol, sacctmgr, scancel, sacct) is missing, hung or refused."""

    template = "slurm: `{command}`: {reason}"


# -- the VM lifecycle ------------------------------------------------------------------------------
class VmError(DgxvmError):
    template = "vm {name}: {reason}"
    exit_code = EXIT_VM


class HypervisorError(VmError):
    """libvirtd is unreachable or refused an operation."""

    template = "libvirt ({uri}): {reason}"


class GuestTimeout(VmError):
    template = ("vm {name}: guest not ready after {timeout:g}s ({reason}); "
                "serial console tail:\n{tail}")


class ClaimFailed(VmError):
    """A warm VM could not be given to a job (lifecycle.warm): taken by another, or a step of
    the claim failed. The job starts cold."""

    template = "vm {name}: not claimed: {reason}"


class BootCancelled(VmError):
    """A warm VM's boot stopped because a job needs its devices (lifecycle.warm): its create
    undoes what it made, at once, rather than making the job wait for the boot to end."""

    template = "vm {name}: boot cancelled: {reason}"


class FaultInjected(DgxvmError):
    """A fault point's ``fail`` action (slurm_dgxvm.failpoints): a test made this step fail."""

    template = "fault point {point} of {vm}"


class TransportLost(VmError):
    """``dgxvm run``/``shell``: the VM could not be reached, or the connection died before the
    command's exit status was known (``dgxvm run`` exits 125 for it, docs/user/run.md)."""

    template = ("job {job}'s VM {domain}: the connection to the VM failed before the command's "
                "exit status was known ({reason}); anything the command started has been "
                "stopped in the guest")


# -- placement -------------------------------------------------------------------------------------
class NoFit(QuantityNamed, DgxvmError):
    """The request is valid but cannot be placed with what is free now.

    ``resource`` names what ran out: ``gpus``, ``aligned-block``, ``cores``, ``memory``, ``ib``
    (the InfiniBand VFs or ports beside the GPUs). With
    ``quantity`` and ``value`` (the block an admin's gpu index asked for), ``where`` names the
    block (see :class:`QuantityNamed`).
    """

    template = "no fit for {count} GPU(s): {reason}"
    named_template = "no fit for {count} GPU(s): {where} ({subject}): {reason}"
    exit_code = EXIT_NO_FIT


# -- state -----------------------------------------------------------------------------------------
class LedgerError(DgxvmError):
    template = "ledger {path}: {reason}"
    exit_code = EXIT_STATE


class LedgerCorrupt(LedgerError):
    template = "ledger {path} is corrupt ({reason}); it was left as it is for an admin to inspect"


class DeviceUnknown(BadInput):
    template = "{pci!r} is not a GPU or NVSwitch of this host{hint}"


class NotQuarantined(DgxvmError):
    template = "{pci} is not quarantined; nothing to clear"
    exit_code = EXIT_STATE


class DeviceStillFailing(DgxvmError):
    template = "{pci} still fails its check: {reason}; repair it first (or --force)"
    exit_code = EXIT_STATE


class RecordCorrupt(DgxvmError):
    """A VM's record.json (or its user's job.json) that does not parse as one."""

    template = ("VM record {path} is corrupt ({reason}); it was left as it is for an admin "
                "to inspect")
    exit_code = EXIT_STATE


class OpStatsCorrupt(DgxvmError):
    """``<state_dir>/opstats.json`` (the counters ``dgxvm metrics`` exports) does not parse.
    The next create or delete moves it aside and starts the counters again."""

    template = ("operation counters {path} are corrupt ({reason}); the next create or delete "
                "moves the file aside and starts them again")
    exit_code = EXIT_STATE


class LedgerConflict(LedgerError):
    template = "ledger: cannot record {key}: {reason}"


class LedgerLockTimeout(LedgerError):
    template = "ledger {path}: lock not acquired within {timeout}s"


class LockError(DgxvmError):
    """A lock file other than the ledger's (``network.lock``) cannot be opened or locked."""

    template = "lock {path}: {reason}"
    exit_code = EXIT_STATE


class LockTimeout(LockError):
    template = "lock {path}: not acquired within {timeout:g}s"


# -- container images ------------------------------------------------------------------------------
class ContainerImageError(DgxvmError):
    """An image that cannot be resolved, pulled, unpacked or cached. ``ref`` is the canonical
    reference (``registry/repository:tag[@digest]``), ``reason`` says why. The base (and anything
    not named below: skopeo or umoci missing, hung or failing otherwise) is the host's, exit 3."""

    template = "container image {ref}: {reason}"
    exit_code = EXIT_HOST


class ContainerImageNotFound(ContainerImageError):
    """The registry has no such repository, tag or digest, or no linux/amd64 image under it:
    the user's reference is wrong (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class ContainerAuthError(ContainerImageError):
    """The registry asks for credentials and none were given, or it refused the ones given:
    the user's to fix (``docker login``), exit 2."""

    exit_code = EXIT_BAD_INPUT


class ContainerRegistryUnreachable(ContainerImageError):
    """The registry does not answer (refused, no such host, time-out, TLS): exit 3."""


class ContainerDiskFull(ContainerImageError):
    """The cache's file system filled up while pulling or unpacking (nothing was kept): exit 3."""


class ContainerCacheError(ContainerImageError):
    """The cache itself is unusable: its directory, an entry or a lock (``path``), exit 5."""

    template = "container cache {path}: {reason}"
    exit_code = EXIT_STATE


# -- the Slurm hooks -------------------------------------------------------------------------------
class Interrupted(DgxvmError):
    """slurmd stopped the hook (the job was cancelled, or PrologEpilogTimeout passed). Only the
    Prolog and Epilog raise it, and they exit 1 (drain) for it as for any fault of the node."""

    template = "interrupted by signal {signal}"
    exit_code = EXIT_INTERNAL


# -- how a failure is counted ----------------------------------------------------------------------
#: The cause a failure is counted under (``dgxvm metrics``): one per exit code, and
#: ``interrupted`` for a hook that slurmd stopped. Stable: dashboards select on them.
CAUSES = {EXIT_INTERNAL: "internal", EXIT_BAD_INPUT: "bad_input", EXIT_HOST: "host",
          EXIT_NO_FIT: "no_fit", EXIT_STATE: "state", EXIT_VM: "vm"}


def cause_of(exc: BaseException) -> str:
    """The cause ``exc`` is counted under: ``interrupted`` (a signal), one of :data:`CAUSES`
    by its exit code, ``internal`` for anything that is not a :class:`DgxvmError` (a bug)."""
    if isinstance(exc, Interrupted | KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, DgxvmError):
        return CAUSES.get(exc.exit_code, "internal")
    return "internal"


def is_job_fault(exc: BaseException) -> bool:
    """True when the job (or, for ``dgxvm create``, the request), not the node, is at fault:
    the Prolog must not drain the node for it."""
    return isinstance(exc, JobRefused | JobInputError | RequestError | NoFit)
