"""Configuration: one TOML file, every key documented in etc/dgxvm.toml; an unknown key is an error.

Precedence: command-line option > environment variable > config file > default.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import BadName, ConfigError
from .names import REGISTRY_HOST, image_name, path_problem
from .netfilter import HostService, parse_service, table_name

DEFAULT_CONFIG_PATH = "/etc/dgxvm/dgxvm.toml"
ENV_CONFIG = "DGXVM_CONFIG"
ENV_SYSFS_ROOT = "DGXVM_SYSFS_ROOT"
ENV_STATE_DIR = "DGXVM_STATE_DIR"

ALIGNMENT_POLICIES = ("strict", "prefer")
IB_MODES = ("none", "vf", "port")          # partitions.NAME.ib
IB_BACKENDS = ("none", "ufm", "opensm")    # ib.backend
HUGEPAGE_SIZES = {"1G": 1048576, "2M": 2048, "none": None}


@dataclass(frozen=True)
class HostConfig:
    sysfs_root: str = "/"
    state_dir: str = "/var/lib/dgxvm"
    machine: str = ""                         # force a catalog profile; "" = detect
    module_ids: tuple[int, ...] = ()          # FM module id per GPU slot, PCI order; () = detect


@dataclass(frozen=True)
class PlacementConfig:
    alignment: str = "strict"                 # strict | prefer
    reserved_cores_per_node: int = 1          # lowest cores of each NUMA node stay with the host
    reserved_memory_mib_per_node: int = 8192  # kept for the host when VMs use ordinary pages
    hugepage_size: str = "1G"                 # 1G | 2M | none
    disk_gib_per_gpu: int = 64                # OS disk of a VM: this much per GPU
    min_disk_gib: int = 32


@dataclass(frozen=True)
class LedgerConfig:
    lock_timeout_s: float = 30.0


@dataclass(frozen=True)
class LibvirtConfig:
    uri: str = "qemu:///system"
    domain_type: str = "kvm"                  # kvm in production | qemu (TCG, no /dev/kvm)
    machine_type: str = "q35"
    network: str = "dgxvm"                    # the NAT network dgxvm owns
    network_cidr: str = "10.213.0.0/24"       # its subnet; .1 is the host, VMs from .2
    ready_timeout_s: float = 300.0            # start -> guest agent answers
    shutdown_timeout_s: float = 60.0          # graceful shutdown, then destroy
    fit_to_host: str = "auto"                 # auto | always | never (see etc/dgxvm.toml)
    allow_host_services: tuple[str, ...] = () # host services guests may reach besides DHCP/DNS


@dataclass(frozen=True)
class ImagesConfig:
    store: str = "/var/lib/dgxvm/images"


@dataclass(frozen=True)
class VmConfig:
    share: str = "virtiofs"                   # virtiofs | none: the job's work dir
    share_roots: tuple[str, ...] = ("/home",)  # work dirs at or below these may be shared
    share_refused: str = "refuse"             # refuse | no-share: a work dir that may not be
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"  # the virtiofsd run as the job's user
    data_disk_gib: int = 0                    # 0 = no data disk
    fit_vcpus: int = 2                        # fit-to-host: at most this many vCPUs
    fit_memory_mib: int = 512                 # fit-to-host: at most this much memory


@dataclass(frozen=True)
class ContainersConfig:
    cache_dir: str = "/var/lib/dgxvm/containers"  # <cache_dir>/<uid>: a user's image cache,
                                              # shared read-only into their VMs; "" = none
    insecure_registries: tuple[str, ...] = () # host[:port] reached over plain HTTP
    cache_max_gib: float = 0.0                # per user cache; 0 = no limit
    cache_max_age_days: float = 0.0           # images unused longer are removed; 0 = no limit


@dataclass(frozen=True)
class FabricConfig:
    fmpm: str = "fmpm"                        # Fabric Manager partition tool (shared-nvswitch)
    timeout_s: float = 60.0


@dataclass(frozen=True)
class IbConfig:
    backend: str = "none"                     # none | ufm | opensm: who keeps partition keys
    url: str = ""                             # ufm: https://ufm.example.org
    credentials_file: str = "/etc/dgxvm/ufm-credentials"  # ufm: "USER:PASSWORD", root's 0600
    timeout_s: float = 10.0
    pkey_min: int = 4096                      # a job's key: pkey_min + job id mod the range
    pkey_max: int = 32766
    opensm_partitions: str = "/etc/opensm/partitions.conf"
    opensm_base: str = ""                     # the site's own partitions, copied to the top
    opensm_pid_file: str = "/var/run/opensm.pid"


@dataclass(frozen=True)
class HealthConfig:
    reset: bool = True                        # reset a VM's GPUs (and NVSwitches) after it ends
    reset_timeout_s: float = 30.0             # bound on the parallel reset; past it: quarantined
    check_before_launch: bool = True          # check the chosen GPUs before a VM starts
    min_block_gpus: int = 1                   # `dgxvm health` drains the node when quarantine
                                              # leaves no VM this large possible
    diag_command: str = ""                    # the admin's diagnostics after a VM ("" = none)
    diag_timeout_s: float = 600.0


@dataclass(frozen=True)
class SlurmConfig:
    bin_dir: str = ""                         # where scontrol/sacctmgr/sacct/scancel are; "" = PATH
    command_timeout_s: float = 10.0           # bound on every Slurm command dgxvm runs
    accounting: bool = True                   # write the VM record into the job's AdminComment
    domain_prefix: str = "job-"               # a job's VM is the domain <prefix><job id>
    log_file: str = "auto"                    # where hooks' lines go on success (see etc/)
    constrain_devices: bool = False           # cgroup.conf ConstrainDevices=yes: Slurm's
                                              # CUDA_VISIBLE_DEVICES is job-relative already


@dataclass(frozen=True)
class JobnetConfig:
    """``[jobnet]``: the job fabric of multi-node jobs (docs/admin/jobnet.md)."""

    enabled: bool = False                     # a second NIC on a per-job VXLAN segment
    nodes: dict[str, str] = field(default_factory=dict)  # node name -> underlay IPv4 address
    underlay_mtu: int = 1500                  # the fabric gets this less VXLAN's 50 bytes
    subnet: str = "10.64.0.0/16"              # every job's fabric addresses (isolated by VNI)
    port: int = 4789                          # VXLAN's UDP port (IANA)
    max_nodes: int = 1024                     # a job with more nodes is refused
    ssh_secret: str = "/etc/dgxvm/jobnet-ssh.key"  # derives the job's inter-VM SSH keys; "" = off


#: The first host number of the fabric's addresses in [jobnet] subnet: node i of a job gets the
#: i-th usable address from it.
JOBNET_FIRST_HOST = 10
JOBNET_MTU_RANGE = (1280, 9216)


def jobnet_address(subnet: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Address | None:
    """The fabric address of a job's ``index``-th node (0-based, nodelist order): the
    ``index``-th address from ``subnet`` + 10 whose last byte is neither 0 nor 255 (some guests
    and tools take ``x.y.z.0`` and ``x.y.z.255`` for network or broadcast addresses whatever
    the prefix). None when it falls outside ``subnet`` or on its broadcast address.

    ``10.64.0.0/16``: index 0 -> 10.64.0.10, 244 -> 10.64.0.254, 245 -> 10.64.1.1."""
    if index < 0:
        raise ValueError(f"node index {index} is negative")
    start = int(subnet.network_address) + JOBNET_FIRST_HOST
    # rank of `start` among the addresses whose last byte is 1..254, then `index` further on
    rank = (start // 256) * 254 + max(0, min(start % 256, 255) - 1) + index
    value = (rank // 254) * 256 + 1 + rank % 254
    if value >= int(subnet.broadcast_address):
        return None
    return ipaddress.IPv4Address(value)


@dataclass(frozen=True)
class PartitionConfig:
    """Defaults for the jobs of one Slurm partition (``[partitions.NAME]``); 0 / "" = the global
    default."""

    image: str = ""                           # default guest image ("" = the store's default)
    images: tuple[str, ...] = ()              # more images a job may pick by comment (() = none)
    alignment: str = ""                       # strict | prefer ("" = [placement] alignment)
    vcpus_per_gpu: int = 0                    # 0 = the machine's sizing template
    memory_mib_per_gpu: int = 0
    disk_gib_per_gpu: int = 0                 # 0 = [placement] disk_gib_per_gpu
    data_disk_gib: int = -1                   # -1 = [vm] data_disk_gib
    ib: str = "none"                          # none | vf | port: InfiniBand beside the GPUs
    warm: tuple[int, ...] = ()                # GPU counts of the warm VMs kept on each node
    warm_recent: int = 0                      # + one per GPU count of the last N jobs here

    def sizes(self, gpus: int) -> dict[str, int | None]:
        """The VM sizes of the partition's job of ``gpus`` GPUs, as placement.Request's
        ``vcpus``, ``memory_mib`` and ``disk_gib`` (None: the machine's template)."""
        return {"vcpus": self.vcpus_per_gpu * gpus or None,
                "memory_mib": self.memory_mib_per_gpu * gpus or None,
                "disk_gib": self.disk_gib_per_gpu * gpus or None}

    @property
    def keeps_warm(self) -> bool:
        """Whether the partition has a warm policy (fixed counts, recent jobs' counts or both)."""
        return bool(self.warm or self.warm_recent)

    @property
    def data_disk(self) -> int | None:
        """The data disk of the partition's VMs in GiB; None: [vm] data_disk_gib."""
        return self.data_disk_gib if self.data_disk_gib >= 0 else None


@dataclass(frozen=True)
class Config:
    host: HostConfig = field(default_factory=HostConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    vm: VmConfig = field(default_factory=VmConfig)
    containers: ContainersConfig = field(default_factory=ContainersConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)
    ib: IbConfig = field(default_factory=IbConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    jobnet: JobnetConfig = field(default_factory=JobnetConfig)
    partitions: dict[str, PartitionConfig] = field(default_factory=dict)
    path: str | None = None                   # the file it came from, for messages

    def partition(self, name: str | None) -> PartitionConfig:
        """The defaults of partition ``name``: its ``[partitions.NAME]`` table, else
        ``[partitions.default]``, else all-global defaults."""
        return (self.partitions.get(name or "") or self.partitions.get("default")
                or PartitionConfig())

    @property
    def host_services(self) -> tuple[HostService, ...]:
        """``[libvirt] allow_host_services``, parsed (validated when the config was loaded)."""
        return tuple(parse_service(s) for s in self.libvirt.allow_host_services)

    @property
    def hugepage_kib(self) -> int | None:
        return HUGEPAGE_SIZES[self.placement.hugepage_size]

    def with_overrides(self, *, sysfs_root: str | None = None,
                       state_dir: str | None = None) -> Config:
        host = self.host
        if sysfs_root:
            host = replace(host, sysfs_root=sysfs_root)
        if state_dir:
            host = replace(host, state_dir=state_dir)
        return replace(self, host=host)


_SECTIONS = {"host": HostConfig, "placement": PlacementConfig, "ledger": LedgerConfig,
             "libvirt": LibvirtConfig, "images": ImagesConfig, "vm": VmConfig,
             "containers": ContainersConfig, "fabric": FabricConfig, "ib": IbConfig,
             "health": HealthConfig, "slurm": SlurmConfig, "jobnet": JobnetConfig}

DOMAIN_TYPES = ("kvm", "qemu")
FIT_MODES = ("auto", "always", "never")
SHARE_MODES = ("virtiofs", "none")
SHARE_REFUSED = ("refuse", "no-share")


def load(path: str | os.PathLike | None = None, *, required: bool = False) -> Config:
    """Load the config file (``path``, else $DGXVM_CONFIG, else /etc/dgxvm/dgxvm.toml).

    A missing file at the default location means "all defaults"; a missing file that was named
    explicitly (option or environment) is an error. Raises ConfigError naming the file and the
    bad key or value.
    """
    explicit = path is not None or bool(os.environ.get(ENV_CONFIG))
    p = Path(path or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH)
    if not p.exists():
        if explicit or required:
            raise ConfigError(path=str(p), reason="no such file")
        cfg = Config()
    else:
        try:
            data = tomllib.loads(p.read_text())
        except OSError as exc:
            raise ConfigError(path=str(p), reason=exc.strerror or str(exc)) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(path=str(p), reason=f"not valid UTF-8 ({exc.reason} at byte "
                                                  f"{exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path=str(p), reason=f"not valid TOML: {exc}") from exc
        cfg = from_dict(data, str(p))
    return cfg.with_overrides(sysfs_root=os.environ.get(ENV_SYSFS_ROOT),
                              state_dir=os.environ.get(ENV_STATE_DIR))


def from_dict(data: dict, path: str = "<config>") -> Config:
    sections = {}
    for name, value in data.items():
        if name == "partitions":
            sections[name] = _partitions(value, path)
            continue
        if name not in _SECTIONS:
            raise ConfigError(path=path, reason=f"unknown section [{name}] "
                                                f"(known: {', '.join(_SECTIONS)}, partitions)")
        if not isinstance(value, dict):
            raise ConfigError(path=path, reason=f"{name} must be a table ([{name}])")
        if name == "jobnet":
            sections[name] = _jobnet(value, path)
            continue
        sections[name] = _section(_SECTIONS[name], name, value, path)
    cfg = Config(**sections, path=path)
    _validate(cfg, path)
    return cfg


# No setting is a number this large; one that is, is a typo (and would overflow a C long).
NUMBER_MAX = 2 ** 53

# The most of a partition's last jobs whose GPU counts its warm policy may follow.
WARM_RECENT_MAX = 64
# The largest GPU count a warm policy may name (no machine has more GPUs).
WARM_GPUS_MAX = 64

# A Slurm partition name as config tables and SLURM_JOB_PARTITION may carry it.
PARTITION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _partitions(value, path: str) -> dict[str, PartitionConfig]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(path=path, reason="partitions must be tables: [partitions.NAME]")
    out = {}
    for name, table in value.items():
        if not PARTITION_NAME.fullmatch(name):
            raise ConfigError(path=path, reason=f"partition name {name!r} is not a Slurm "
                                                f"partition name")
        out[name] = _section(PartitionConfig, f"partitions.{name}", table, path)
    return out


# A node name as [jobnet] nodes and Slurm's hostlists carry it.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _jobnet(values: dict, path: str) -> JobnetConfig:
    """``[jobnet]``, whose ``nodes`` is a table (``[jobnet.nodes]``: node name -> address)."""
    values = dict(values)
    nodes = values.pop("nodes", {})
    if not isinstance(nodes, dict) or not all(isinstance(v, str) for v in nodes.values()):
        raise ConfigError(path=path, reason=f"jobnet.nodes must be a table of node name = "
                                            f"\"IPv4 address\" ([jobnet.nodes]), not {nodes!r}")
    return replace(_section(JobnetConfig, "jobnet", values, path), nodes=dict(nodes))


def _validate_jobnet(j: JobnetConfig, path: str) -> None:
    seen: dict[str, str] = {}
    for node, text in j.nodes.items():
        if not NODE_NAME.fullmatch(node):
            raise ConfigError(path=path, reason=f"jobnet.nodes: {node!r} is not a node name "
                                                f"(letters, digits, '.', '_', '-'; at most 64)")
        try:
            ip = ipaddress.IPv4Address(text)
        except ValueError:
            raise ConfigError(path=path, reason=f"jobnet.nodes.{node}: {text!r} is not an IPv4 "
                                                f"address (names are not resolved)") from None
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_link_local \
                or ip == ipaddress.IPv4Address("255.255.255.255"):
            raise ConfigError(path=path, reason=f"jobnet.nodes.{node}: {text} cannot be a "
                                                f"node's underlay address")
        if str(ip) in seen:
            raise ConfigError(path=path, reason=f"jobnet.nodes: {node} and {seen[str(ip)]} "
                                                f"have the same address {ip}")
        seen[str(ip)] = node
    lo, hi = JOBNET_MTU_RANGE
    if not lo + 50 <= j.underlay_mtu <= hi:
        raise ConfigError(path=path, reason=f"jobnet.underlay_mtu {j.underlay_mtu} is out of "
                                            f"range ({lo + 50}-{hi}: the fabric gets 50 bytes "
                                            f"less, at least IPv6's {lo})")
    if j.ssh_secret and not os.path.isabs(j.ssh_secret):
        raise ConfigError(path=path, reason=f"jobnet.ssh_secret {j.ssh_secret!r} must be an "
                                            f"absolute path (or \"\": no inter-VM SSH keys)")
    if not 1 <= j.port <= 65535:
        raise ConfigError(path=path, reason=f"jobnet.port {j.port} is not a UDP port (1-65535)")
    if not 2 <= j.max_nodes <= 65536:
        raise ConfigError(path=path, reason=f"jobnet.max_nodes {j.max_nodes} is out of range "
                                            f"(2-65536)")
    try:
        subnet = ipaddress.IPv4Network(j.subnet)
    except ValueError as exc:
        raise ConfigError(path=path, reason=f"jobnet.subnet {j.subnet!r} is not an IPv4 "
                                            f"subnet: {exc}") from None
    if jobnet_address(subnet, j.max_nodes - 1) is None:
        raise ConfigError(path=path, reason=f"jobnet.subnet {j.subnet} is too small for "
                                            f"max_nodes {j.max_nodes} (node i gets the i-th "
                                            f"address from .{JOBNET_FIRST_HOST}, skipping "
                                            f"x.y.z.0 and x.y.z.255)")


def _section(cls, name: str, values: dict, path: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(path=path, reason=f"unknown key {name}.{key} "
                                                f"(known: {', '.join(known)})")
        default = known[key].default
        if isinstance(default, tuple):
            item = str if key in ("images", "share_roots", "allow_host_services",
                                       "insecure_registries") else int
            if not isinstance(value, list) or not all(
                    isinstance(v, item) and not isinstance(v, bool) for v in value):
                raise ConfigError(path=path, reason=f"{name}.{key} must be a list of "
                                                    f"{'strings' if item is str else 'integers'}, "
                                                    f"not {value!r}")
            value = tuple(value)
        elif (isinstance(value, bool) != isinstance(default, bool)   # TOML true is not an int
              or not isinstance(value, type(default))):
            ok = isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)
            if not ok:
                raise ConfigError(path=path, reason=f"{name}.{key} must be "
                                                    f"{type(default).__name__}, not {value!r}")
            value = float(value)
        for item in (value if isinstance(value, tuple) else (value,)):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not math.isfinite(item) or abs(item) > NUMBER_MAX:
                raise ConfigError(path=path, reason=f"{name}.{key} {item!r} is out of range "
                                                    f"(at most {NUMBER_MAX})")
        kwargs[key] = value
    return cls(**kwargs)


def _validate(cfg: Config, path: str) -> None:
    p = cfg.placement
    if p.alignment not in ALIGNMENT_POLICIES:
        raise ConfigError(path=path, reason=f"placement.alignment {p.alignment!r} is not one of "
                                            f"{', '.join(ALIGNMENT_POLICIES)}")
    if p.hugepage_size not in HUGEPAGE_SIZES:
        raise ConfigError(path=path, reason=f"placement.hugepage_size {p.hugepage_size!r} is not "
                                            f"one of {', '.join(HUGEPAGE_SIZES)}")
    for key in ("reserved_cores_per_node", "reserved_memory_mib_per_node", "disk_gib_per_gpu",
                "min_disk_gib"):
        if getattr(p, key) < 0:
            raise ConfigError(path=path, reason=f"placement.{key} must be >= 0, "
                                                f"not {getattr(p, key)}")
    v = cfg.libvirt
    for key, allowed in (("domain_type", DOMAIN_TYPES), ("fit_to_host", FIT_MODES)):
        if getattr(v, key) not in allowed:
            raise ConfigError(path=path, reason=f"libvirt.{key} {getattr(v, key)!r} is not one of "
                                                f"{', '.join(allowed)}")
    try:
        net = ipaddress.ip_network(v.network_cidr)
    except ValueError as exc:
        raise ConfigError(path=path, reason=f"libvirt.network_cidr {v.network_cidr!r}: {exc}") from exc
    if net.version != 4 or net.num_addresses < 8:
        raise ConfigError(path=path, reason=f"libvirt.network_cidr {v.network_cidr!r} must be an "
                                            f"IPv4 subnet of at least 8 addresses")
    try:
        table_name(v.network)
    except ValueError as exc:
        raise ConfigError(path=path, reason=f"libvirt.network: {exc}") from None
    seen = set()
    for text in v.allow_host_services:
        try:
            service = parse_service(text)
        except ValueError as exc:
            raise ConfigError(path=path, reason=f"libvirt.allow_host_services: {exc}") from None
        if service in seen:
            raise ConfigError(path=path, reason=f"libvirt.allow_host_services lists {text!r} "
                                                f"twice")
        seen.add(service)
    for key in ("ready_timeout_s", "shutdown_timeout_s"):
        if getattr(v, key) <= 0:
            raise ConfigError(path=path, reason=f"libvirt.{key} must be > 0, not {getattr(v, key)}")
    if cfg.vm.share == "9p":
        raise ConfigError(path=path, reason="vm.share \"9p\" is not offered: QEMU serves 9p "
                                            "with its own rights on the host, which root in the "
                                            "guest would get; use \"virtiofs\" (served as the "
                                            "job's user) or \"none\"")
    if cfg.vm.share not in SHARE_MODES:
        raise ConfigError(path=path, reason=f"vm.share {cfg.vm.share!r} is not one of "
                                            f"{', '.join(SHARE_MODES)}")
    if cfg.vm.share_refused not in SHARE_REFUSED:
        raise ConfigError(path=path, reason=f"vm.share_refused {cfg.vm.share_refused!r} is not "
                                            f"one of {', '.join(SHARE_REFUSED)}")
    for root in cfg.vm.share_roots:
        problem = path_problem(root)
        if problem:
            raise ConfigError(path=path, reason=f"vm.share_roots: {root!r}: {problem}")
    if not cfg.vm.virtiofsd.startswith("/"):
        raise ConfigError(path=path, reason=f"vm.virtiofsd {cfg.vm.virtiofsd!r} must be an "
                                            f"absolute path")
    for key in ("data_disk_gib", "fit_vcpus", "fit_memory_mib"):
        if getattr(cfg.vm, key) < (0 if key == "data_disk_gib" else 1):
            raise ConfigError(path=path, reason=f"vm.{key} is out of range: {getattr(cfg.vm, key)}")
    c = cfg.containers
    if c.cache_dir:
        problem = path_problem(c.cache_dir)
        if problem or c.cache_dir == "/":
            raise ConfigError(path=path, reason=f"containers.cache_dir {c.cache_dir!r}: "
                                                f"{problem or 'not the root directory'}")
    for reg in c.insecure_registries:
        if not REGISTRY_HOST.fullmatch(reg):
            raise ConfigError(path=path, reason=f"containers.insecure_registries: {reg!r} is "
                                                f"not a registry host[:port] (no scheme, no path)")
    for key in ("cache_max_gib", "cache_max_age_days"):
        if getattr(c, key) < 0:
            raise ConfigError(path=path, reason=f"containers.{key} must be >= 0, "
                                                f"not {getattr(c, key)}")
    if cfg.fabric.timeout_s <= 0:
        raise ConfigError(path=path, reason=f"fabric.timeout_s must be > 0, not {cfg.fabric.timeout_s}")
    _validate_ib(cfg.ib, path)
    if cfg.health.min_block_gpus < 0:
        raise ConfigError(path=path, reason=f"health.min_block_gpus must be >= 0, "
                                            f"not {cfg.health.min_block_gpus}")
    if cfg.health.diag_timeout_s <= 0:
        raise ConfigError(path=path, reason=f"health.diag_timeout_s must be > 0, "
                                            f"not {cfg.health.diag_timeout_s}")
    if cfg.health.reset_timeout_s <= 0:
        raise ConfigError(path=path, reason=f"health.reset_timeout_s must be > 0, "
                                            f"not {cfg.health.reset_timeout_s}")
    if cfg.slurm.command_timeout_s <= 0:
        raise ConfigError(path=path, reason=f"slurm.command_timeout_s must be > 0, "
                                            f"not {cfg.slurm.command_timeout_s}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", cfg.slurm.domain_prefix):
        raise ConfigError(path=path, reason=f"slurm.domain_prefix {cfg.slurm.domain_prefix!r}: "
                                            f"use letters, digits, '.', '_', '-' (at most 21)")
    for pname, part in cfg.partitions.items():
        where = f"partitions.{pname}"
        if part.alignment and part.alignment not in ALIGNMENT_POLICIES:
            raise ConfigError(path=path, reason=f"{where}.alignment {part.alignment!r} is not "
                                                f"one of {', '.join(ALIGNMENT_POLICIES)}")
        for key in ("vcpus_per_gpu", "memory_mib_per_gpu", "disk_gib_per_gpu"):
            if getattr(part, key) < 0:
                raise ConfigError(path=path, reason=f"{where}.{key} must be >= 0, "
                                                    f"not {getattr(part, key)}")
        if part.ib not in IB_MODES:
            raise ConfigError(path=path, reason=f"{where}.ib {part.ib!r} is not one of "
                                                f"{', '.join(IB_MODES)}")
        bad = [n for n in part.warm if not 1 <= n <= WARM_GPUS_MAX]
        if bad:
            raise ConfigError(path=path, reason=f"{where}.warm: {bad[0]} is not a GPU count "
                                                f"(1 to {WARM_GPUS_MAX}): list the GPU counts of "
                                                f"the warm VMs to keep, e.g. [8]")
        if not 0 <= part.warm_recent <= WARM_RECENT_MAX:
            raise ConfigError(path=path, reason=f"{where}.warm_recent {part.warm_recent} is not "
                                                f"0 to {WARM_RECENT_MAX}: how many of the "
                                                f"partition's last jobs on a node say which "
                                                f"sizes to keep warm (0: none)")
        for key in ("warm", "warm_recent"):
            if getattr(part, key) and part.ib != "none":
                raise ConfigError(path=path, reason=f"{where}.{key}: a partition with ib = "
                                                    f"{part.ib!r} gets no warm VMs (their jobs "
                                                    f"start cold); remove {key} or ib")
        if part.data_disk_gib < -1:
            raise ConfigError(path=path, reason=f"{where}.data_disk_gib must be >= 0 (or -1 for "
                                                f"[vm] data_disk_gib), not {part.data_disk_gib}")
        for img in (part.image, *part.images):
            try:
                img and image_name(img)
            except BadName as exc:
                raise ConfigError(path=path, reason=f"{where}: {exc}") from None
    _validate_jobnet(cfg.jobnet, path)
    if cfg.ledger.lock_timeout_s <= 0:
        raise ConfigError(path=path, reason=f"ledger.lock_timeout_s must be > 0, "
                                            f"not {cfg.ledger.lock_timeout_s}")


def _validate_ib(ib: IbConfig, path: str) -> None:
    if ib.backend not in IB_BACKENDS:
        raise ConfigError(path=path, reason=f"ib.backend {ib.backend!r} is not one of "
                                            f"{', '.join(IB_BACKENDS)}")
    if ib.timeout_s <= 0:
        raise ConfigError(path=path, reason=f"ib.timeout_s must be > 0, not {ib.timeout_s}")
    if not 1 <= ib.pkey_min <= ib.pkey_max <= 0x7ffe:
        raise ConfigError(path=path, reason=f"ib.pkey_min {ib.pkey_min} and ib.pkey_max "
                                            f"{ib.pkey_max} must satisfy 1 <= min <= max <= "
                                            f"32766 (0x7ffe; 0x7fff is the default partition)")
    if ib.backend == "ufm" and not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+(:\d+)?/?", ib.url):
        raise ConfigError(path=path, reason=f"ib.url {ib.url!r} must be the UFM server's "
                                            f"http(s)://HOST[:PORT], without a path")
    for key in ("credentials_file", "opensm_partitions", "opensm_pid_file", "opensm_base"):
        value = getattr(ib, key)
        if value and not value.startswith("/"):
            raise ConfigError(path=path, reason=f"ib.{key} {value!r} must be an absolute path")
