"""Per-VM NoCloud seed (an ISO9660 image labelled ``cidata``) and SSH keys.

The seed tells a guest who it is: its hostname, the one user a job runs as (name, uid, primary
gid, home), the public keys that may log in as that user, the SSH host key its sshd must present
(the host pins the public half in a known_hosts file, so the first connection is already
verified), and the host directories shared into it (virtiofs or 9p tags and guest paths).

Layout of the ISO (volume label ``cidata``, Joliet and Rock Ridge)::

    meta-data                       NoCloud: instance-id, local-hostname
    user-data                       NoCloud: a #cloud-config for images that run cloud-init
    dgxvm/hostname                  one line
    dgxvm/user                      one line: "name uid gid home"
    dgxvm/groups                    one line per supplementary group: "name gid" (may be empty)
    dgxvm/authorized_keys           OpenSSH public key lines
    dgxvm/ssh_host_ed25519_key      the OpenSSH private host key (mode 0600 in the image)
    dgxvm/ssh_host_ed25519_key.pub  its public line
    dgxvm/mounts                    one line per share: "tag path fstype", then " ro" for a
                                    read-only one (may be empty)
    dgxvm/fabric                    a multi-node job's fabric NIC: "mac address/prefix mtu"
                                    (absent without a fabric)
    dgxvm/hosts                     one line per node of the job: "address node-name", added
                                    to /etc/hosts (absent without a fabric)
    dgxvm/job_ssh_key[.pub]         the job's inter-VM SSH key (jobnet.sshkeys), the user's
    dgxvm/job_known_hosts           every node's VM's host key (absent without them)
    dgxvm/dgxvm-guest               the guest side of `dgxvm run` (seedfiles/dgxvm-guest.sh),
                                    installed as /usr/lib/dgxvm/dgxvm-guest (cloud-init:
                                    write_files; the test guest: its init)

Why ``dgxvm/`` as well: real cloud images apply ``user-data`` with cloud-init, but the small test
guest (guest-image/) has no cloud-init and no YAML parser, only busybox sh. It reads the same
facts from these plain files, one value per whitespace-separated field, with ``read -r``. Names
and paths may hold spaces, quotes, ``%`` or non-ASCII letters (``john.doe``, ``/tmp/a b``,
``/home/x/été``), so those fields are percent-encoded (:func:`pct`: every byte of the UTF-8 text
outside ``A-Za-z0-9._/-`` becomes ``%HH``); the guest decodes them (dgxvm-init's ``pct_decode``:
``printf %b`` of the text with each ``%`` made backslash-x; no backslash survives the encoding). What
is refused is what no file can carry: control characters and bytes that are not UTF-8. Both
forms are written from one :class:`SeedSpec`, so they cannot disagree.

``user-data`` is YAML written by hand: every string scalar is ``json.dumps``-quoted (a JSON
string is a valid YAML double-quoted scalar), so no YAML library is needed and no value can
break the document's structure. Commands are argv lists, never a shell line with a value in it.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SeedError
from .names import account_name_problem, path_problem
from .tools import output_tail, run_tool

FSTYPES = ("virtiofs", "9p")
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144"
# Guest root may create setuid files or device nodes on a share; the guest's mount refuses to
# honour them (the host side is the share policy's business, not the seed's).
SHARE_OPTIONS = "nosuid,nodev"
READ_ONLY_OPTIONS = "ro," + SHARE_OPTIONS
ID_MAX = 2 ** 32 - 2
# The guest side of `dgxvm run`: POSIX sh, travels with every seed (no per-image install step).
GUEST_HELPER_SOURCE = Path(__file__).resolve().parent / "seedfiles" / "dgxvm-guest.sh"
GUEST_HELPER_PATH = "/usr/lib/dgxvm/dgxvm-guest"
# ssh-keygen and xorriso take well under a second; a hung one must not hold a Prolog forever.
TOOL_TIMEOUT_S = 60.0

# All used with fullmatch ("$" would accept a trailing newline).
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,36}")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
# a Slurm node name as the guest's /etc/hosts carries it (jobnet checks the job's nodelist)
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})")
_PRIVATE_KEY = re.compile(r"-----BEGIN OPENSSH PRIVATE KEY-----\n[A-Za-z0-9+/=\n]+"
                          r"-----END OPENSSH PRIVATE KEY-----\n?")


def _bad(name: str, what: str, value: object, why: str) -> SeedError:
    return SeedError(name=name, reason=f"bad {what} {value!r}: {why}", value=value)


def _check_path(name: str, what: str, value: object) -> None:
    problem = path_problem(value)
    if problem:
        raise _bad(name, what, value, f"must be an absolute, normalised UTF-8 path ({problem})")


def _check_account(name: str, what: str, value: object) -> None:
    problem = account_name_problem(value)
    if problem:
        raise _bad(name, what, value, problem)


_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/-")


def pct(value: str) -> str:
    """``value`` as one whitespace-free field of a dgxvm/ file: its UTF-8 bytes, each one outside
    ``A-Za-z0-9._/-`` as ``%HH`` (``/tmp/a b`` -> ``/tmp/a%20b``; ``john.doe`` stays)."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in value.encode("utf-8"))


def _check_line(name: str, what: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _bad(name, what, value, "must be a non-empty string")
    if "\n" in value or "\r" in value or "\0" in value:
        raise _bad(name, what, value, "must be a single line")


@dataclass(frozen=True)
class Mount:
    tag: str        # virtiofs/9p tag
    path: str       # absolute path in the guest (same as on the host)
    fstype: str     # "virtiofs" | "9p"
    read_only: bool = False   # mounted ro (the user's container image cache)

    def __post_init__(self) -> None:
        if not isinstance(self.tag, str) or not _TAG.fullmatch(self.tag):
            raise _bad(self.tag, "mount tag", self.tag, "must match [A-Za-z0-9_.-]{1,36}")
        _check_path(self.tag, "mount path", self.path)
        if self.fstype not in FSTYPES:
            raise _bad(self.tag, "mount fstype", self.fstype, f"must be one of {FSTYPES}")
        if type(self.read_only) is not bool:
            raise _bad(self.tag, "mount read_only", self.read_only, "must be True or False")


@dataclass(frozen=True)
class Fabric:
    """A multi-node job's fabric NIC in the guest (slurm_dgxvm.jobnet): the NIC with ``mac``
    gets ``address`` (``a.b.c.d/prefix``) and ``mtu``; ``hosts`` ((node name, address) for every
    node of the job) go into /etc/hosts, so the job's Slurm node names resolve to its VMs."""

    mac: str
    address: str
    mtu: int
    hosts: tuple[tuple[str, str], ...] = ()
    # the job's inter-VM SSH (jobnet.sshkeys): the user's key pair, the same in every VM of the
    # job, and known_hosts lines for every node's VM; None: no keys ([jobnet] ssh_secret unset)
    ssh_key: str | None = None
    ssh_key_public: str | None = None
    known_hosts: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.mac, str) or not _MAC.fullmatch(self.mac):
            raise _bad("fabric", "fabric mac", self.mac, "must be 6 lower-case hex pairs")
        try:
            iface = ipaddress.IPv4Interface(self.address)
        except (ValueError, TypeError):
            raise _bad("fabric", "fabric address", self.address,
                       "must be an IPv4 address/prefix") from None
        if "/" not in str(self.address) or iface.network.prefixlen >= 31:
            raise _bad("fabric", "fabric address", self.address,
                       "must give a prefix length below 31")
        if type(self.mtu) is not int or not 576 <= self.mtu <= 9216:
            raise _bad("fabric", "fabric mtu", self.mtu, "must be an integer in 576..9216")
        for host in self.hosts:
            if not (isinstance(host, tuple) and len(host) == 2):
                raise _bad("fabric", "fabric host", host, "must be a (name, address) pair")
            name, addr = host
            if not isinstance(name, str) or not _HOST_NAME.fullmatch(name):
                raise _bad("fabric", "fabric host name", name,
                           "must be 1-63 letters, digits, '.', '_' or '-'")
            try:
                ipaddress.IPv4Address(addr)
            except (ValueError, TypeError):
                raise _bad("fabric", "fabric host address", addr,
                           "must be an IPv4 address") from None
        if (self.ssh_key is None) != (self.ssh_key_public is None):
            raise _bad("fabric", "job ssh key", "<redacted>", "needs both halves or neither")
        if self.ssh_key is not None:
            if not isinstance(self.ssh_key, str) or not _PRIVATE_KEY.fullmatch(self.ssh_key):
                raise _bad("fabric", "job ssh key", "<redacted>",
                           "must be an OpenSSH private key (BEGIN OPENSSH PRIVATE KEY)")
            _check_line("fabric", "job ssh public key", self.ssh_key_public)
        if not isinstance(self.known_hosts, str) or "\0" in self.known_hosts or \
                any(line and not line.isprintable()
                    for line in self.known_hosts.splitlines()):
            raise _bad("fabric", "job known_hosts", self.known_hosts, "must be printable lines")


@dataclass(frozen=True)
class SeedSpec:
    instance_id: str
    hostname: str
    user_name: str
    uid: int
    gid: int
    home: str                         # e.g. /home/<user>
    authorized_keys: tuple[str, ...]  # OpenSSH public key lines
    host_key_private: str             # OpenSSH private key text (ed25519) the guest's sshd uses
    host_key_public: str              # its public line, pinned in known_hosts on the host
    mounts: tuple[Mount, ...] = ()
    groups: tuple[tuple[str, int], ...] = ()   # the user's supplementary groups: (name, gid)
    fabric: Fabric | None = None      # a multi-node job's fabric NIC and its nodes' names

    def __post_init__(self) -> None:
        name = self.hostname if isinstance(self.hostname, str) else repr(self.hostname)
        if not isinstance(self.instance_id, str) or \
                not _INSTANCE_ID.fullmatch(self.instance_id):
            raise _bad(name, "instance id", self.instance_id,
                       "must match [A-Za-z0-9_.:-]{1,128}")
        if not isinstance(self.hostname, str) or not _DNS_LABEL.fullmatch(self.hostname):
            raise _bad(name, "hostname", self.hostname, "must be a DNS label (1-63 letters, "
                       "digits and '-', not starting or ending with '-')")
        _check_account(name, "user name", self.user_name)
        for what in ("uid", "gid"):
            value = getattr(self, what)
            if type(value) is not int or not 0 <= value <= ID_MAX:  # bool is an int: refuse it
                raise _bad(name, what, value, f"must be an integer in 0..{ID_MAX}")
        _check_path(name, "home", self.home)
        if ":" in self.home:
            raise _bad(name, "home", self.home, "must not contain ':' (a passwd field)")
        if isinstance(self.groups, (str, bytes)):
            raise _bad(name, "groups", self.groups, "must be a tuple of (name, gid)")
        for group in self.groups:
            if not (isinstance(group, tuple) and len(group) == 2):
                raise _bad(name, "group", group, "must be a (name, gid) pair")
            _check_account(name, "group name", group[0])
            if type(group[1]) is not int or not 0 <= group[1] <= ID_MAX:
                raise _bad(name, "group gid", group[1], f"must be an integer in 0..{ID_MAX}")
        if isinstance(self.authorized_keys, (str, bytes)) or not self.authorized_keys:
            raise _bad(name, "authorized_keys", self.authorized_keys,
                       "must be a non-empty tuple of public key lines")
        for key in self.authorized_keys:
            _check_line(name, "authorized key", key)
        _check_line(name, "host public key", self.host_key_public)
        if not isinstance(self.host_key_private, str) or \
                not _PRIVATE_KEY.fullmatch(self.host_key_private):
            raise _bad(name, "host private key", "<redacted>",
                       "must be an OpenSSH private key (BEGIN OPENSSH PRIVATE KEY)")
        if self.fabric is not None and not isinstance(self.fabric, Fabric):
            raise _bad(name, "fabric", self.fabric, "must be a Fabric")
        tags = set()
        for mount in self.mounts:
            if not isinstance(mount, Mount):
                raise _bad(name, "mount", mount, "must be a Mount")
            if mount.tag in tags:
                raise _bad(name, "mount tag", mount.tag, "used twice")
            tags.add(mount.tag)


def generate_keypair(path: Path, comment: str) -> str:
    """``ssh-keygen -t ed25519 -N '' -C comment -f path``; returns the public line.

    ``path`` is left 0600 and ``path.pub`` 0644. An existing ``path`` or ``path.pub`` is an
    error (ssh-keygen would ask before overwriting; a key is never replaced silently): remove
    them first to make a new key. Raises :class:`SeedError` naming the path, with ssh-keygen's
    output (missing, failed, or no answer within :data:`TOOL_TIMEOUT_S`).
    """
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    if not isinstance(comment, str) or "\n" in comment or "\r" in comment:
        raise SeedError(name=str(path), reason=f"bad key comment {comment!r}: one line only")
    for p in (path, pub):
        if p.exists() or p.is_symlink():
            raise SeedError(name=str(path), reason=f"{p} already exists; remove it first")
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
             timeout=TOOL_TIMEOUT_S, what="ssh-keygen", hint=" in PATH",
             error=lambda reason: SeedError(name=str(path), reason=reason))
    try:
        os.chmod(path, 0o600)
        os.chmod(pub, 0o644)
        line = pub.read_text().strip()
    except OSError as exc:
        raise SeedError(name=str(path), reason=f"ssh-keygen left no usable key: {exc}") from None
    return line


def _q(value: str) -> str:
    return json.dumps(value)


def meta_data(spec: SeedSpec) -> str:
    return (f"instance-id: {_q(spec.instance_id)}\n"
            f"local-hostname: {_q(spec.hostname)}\n")


# bootcmd lines: argv lists (cloud-init quotes each item); values go in as "$1", "$2", never
# into the script text. Run before the users module, as the mounts module did.
_GROUPADD = 'getent group "$1" >/dev/null || groupadd -o -g "$2" "$1"'
# Subordinate ids for a container as the user's own uid (``dgxvm-guest userns``): a range of
# SUBID_COUNT uids and gids from SUBID_START for the user unless it has one, and each
# supplementary gid as a one-id range (the container keeps the groups). The test guest's
# seed.sh (seed_subids) writes the same; after this the users module's useradd adds no range.
SUBID_START = 3000000000
SUBID_COUNT = 65536
_SUBIDS = (
    'u=$1; shift; for f in /etc/subuid /etc/subgid; do touch "$f" || exit 1; '
    'n=$u awk -F: \'$1 == ENVIRON["n"] && $3 > 1 { f = 1 } END { exit !f }\' "$f" '
    f'|| printf \'%s:{SUBID_START}:{SUBID_COUNT}\\n\' "$u" >> "$f" || exit 1; done; '
    'for g in "$@"; do n=$u g=$g awk -F: \'$1 == ENVIRON["n"] && $2 == ENVIRON["g"] '
    '&& $3 == 1 { f = 1 } END { exit !f }\' /etc/subgid '
    '|| printf \'%s:%s:1\\n\' "$u" "$g" >> /etc/subgid || exit 1; done')


# The fabric NIC, found by its MAC ("$1"), gets its MTU ("$3") and address ("$2"); replace:
# every boot runs it again.
_FABRIC_NIC = ('i=; for d in /sys/class/net/*; do [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] '
               '&& i=${d##*/}; done; [ -n "$i" ] || { echo "no NIC with MAC $1" >&2; exit 1; }; '
               'ip link set "$i" mtu "$3" && ip addr replace "$2" dev "$i" && ip link set "$i" up')
# The job's node names into the template cloud-init renders /etc/hosts from (manage_etc_hosts
# renders it after bootcmd, on every boot); pairs of "address name" arguments.
HOSTS_TEMPLATE = "/etc/cloud/templates/hosts.debian.tmpl"
HOSTS_MARK = "# dgxvm job fabric"
_FABRIC_HOSTS = (f't={HOSTS_TEMPLATE}; [ -f "$t" ] || exit 0; '
                 f"sed -i '/ {HOSTS_MARK}$/d' \"$t\" || exit 1; "
                 f'while [ $# -ge 2 ]; do printf \'%s\\t%s {HOSTS_MARK}\\n\' "$1" "$2" '
                 f'>> "$t" || exit 1; shift 2; done')


def fabric_argv(f: Fabric) -> list[list[str]]:
    """The bootcmd entries that bring up the fabric NIC and name the job's nodes."""
    hosts = [x for name, addr in f.hosts for x in (addr, name)]
    return [["sh", "-c", _FABRIC_NIC, "dgxvm-fabric", f.mac, f.address, str(f.mtu)],
            ["sh", "-c", _FABRIC_HOSTS, "dgxvm-hosts", *hosts]]


def mount_argv(m: Mount) -> list[str]:
    """The guest's mount command for ``m``: ``nosuid,nodev``, ``ro,`` before them for a
    read-only share (and 9p's transport options)."""
    opts = READ_ONLY_OPTIONS if m.read_only else SHARE_OPTIONS
    if m.fstype == "9p":
        opts = f"{opts},{NINEP_OPTIONS}"
    return ["mount", "-t", m.fstype, "-o", opts, m.tag, m.path]


def _argv(items: list[str]) -> str:
    return "[" + ", ".join(_q(str(i)) for i in items) + "]"


def user_data(spec: SeedSpec) -> str:
    """A ``#cloud-config`` applying the same facts as the ``dgxvm/`` files.

    ``bootcmd`` (which runs before the users module) creates the primary group with the user's
    name and ``spec.gid`` (``-o``: even if another group already has that gid) and each
    supplementary group (name, gid) that the image does not have by that name, then mounts the
    shares ``nosuid,nodev``, read-only ones ``ro`` too (argv lists: cloud-init 22.4 may ignore a
    ``mounts:`` entry whose device is a virtiofs tag). The user gets its primary group and the
    supplementary groups. The keys that may log in, and a multi-node job's SSH key and known
    hosts, go under /etc/ssh (:func:`_ssh_files`), never into the home: bootcmd has mounted the
    shares by the time the users module runs, and the home may be one of them.
    """
    bootcmd = [["sh", "-c", _GROUPADD, "dgxvm-groupadd", spec.user_name, str(spec.gid)]]
    for gname, gid in spec.groups:
        bootcmd.append(["sh", "-c", _GROUPADD, "dgxvm-groupadd", gname, str(gid)])
    bootcmd.append(["sh", "-c", _SUBIDS, "dgxvm-subids", spec.user_name,
                    *(str(gid) for _, gid in spec.groups)])
    for m in spec.mounts:
        bootcmd.append(["mkdir", "-p", m.path])
        bootcmd.append(mount_argv(m))
    if spec.fabric is not None:
        bootcmd += fabric_argv(spec.fabric)
    lines = ["#cloud-config",
             f"hostname: {_q(spec.hostname)}",
             "preserve_hostname: false",
             "manage_etc_hosts: true",
             "bootcmd:",
             *(f"  - {_argv(cmd)}" for cmd in bootcmd),
             "users:",
             f"  - name: {_q(spec.user_name)}",
             f"    uid: {spec.uid}",
             f"    primary_group: {_q(spec.user_name)}",
             "    no_user_group: true"]
    if spec.groups:
        lines.append(f"    groups: {_argv([g for g, _ in spec.groups])}")
    lines += [f"    homedir: {_q(spec.home)}",
              f"    shell: {_q('/bin/sh')}",
              "    lock_passwd: true",
              "disable_root: true",
              "ssh_pwauth: false",
              "ssh_deletekeys: true",
              # only the type the seed brings: nothing is generated (an empty list is
              # against cloud-init 22.4's schema, which then warns the whole config invalid)
              "ssh_genkeytypes: [ed25519]",
              "ssh_keys:",
              f"  ed25519_private: {_q(spec.host_key_private)}",
              f"  ed25519_public: {_q(spec.host_key_public)}",
              "write_files:",
              *_write_file(GUEST_HELPER_PATH, guest_helper(), "0755"),
              *_ssh_files(spec)]
    return "\n".join(lines) + "\n"


def _plain_files(spec: SeedSpec) -> dict[str, tuple[str, int]]:
    """``{relative path: (text, mode)}`` of the dgxvm/ directory."""
    private = spec.host_key_private if spec.host_key_private.endswith("\n") \
        else spec.host_key_private + "\n"
    return {
        "dgxvm/hostname": (spec.hostname + "\n", 0o644),
        "dgxvm/user": (f"{pct(spec.user_name)} {spec.uid} {spec.gid} {pct(spec.home)}\n",
                       0o644),
        "dgxvm/groups": ("".join(f"{pct(g)} {gid}\n" for g, gid in spec.groups), 0o644),
        "dgxvm/authorized_keys": ("".join(k.strip() + "\n" for k in spec.authorized_keys),
                                  0o644),
        "dgxvm/ssh_host_ed25519_key": (private, 0o600),
        "dgxvm/ssh_host_ed25519_key.pub": (spec.host_key_public.strip() + "\n", 0o644),
        # a 4th field only for a read-only share: a read-write line stays what older test
        # guests read
        "dgxvm/mounts": ("".join(f"{m.tag} {pct(m.path)} {m.fstype}"
                                 f"{' ro' if m.read_only else ''}\n" for m in spec.mounts),
                         0o644),
        "dgxvm/dgxvm-guest": (guest_helper(), 0o755),
    } | _fabric_files(spec.fabric)


#: The seed's files a warm VM's claim gives the guest (seedfiles/dgxvm-claim.sh applies them).
CLAIM_FILES = ("hostname", "user", "groups", "authorized_keys", "mounts", "dgxvm-guest")


def claim_files(spec: SeedSpec) -> dict[str, tuple[str, int]]:
    """``{name: (text, mode)}``: the dgxvm/ files of ``spec`` a claim applies (no host key:
    the warm VM keeps the one it booted with, already pinned; no fabric: a multi-node job is
    never given a warm VM)."""
    files = _plain_files(spec)
    return {n: files[f"dgxvm/{n}"] for n in CLAIM_FILES}


def _fabric_files(f: Fabric | None) -> dict[str, tuple[str, int]]:
    if f is None:
        return {}
    files = {"dgxvm/fabric": (f"{f.mac} {f.address} {f.mtu}\n", 0o644),
             "dgxvm/hosts": ("".join(f"{addr} {name}\n" for name, addr in f.hosts), 0o644)}
    if f.ssh_key is not None:
        files |= {"dgxvm/job_ssh_key": (f.ssh_key, 0o600),
                  "dgxvm/job_ssh_key.pub": (f.ssh_key_public.strip() + "\n", 0o644),
                  "dgxvm/job_known_hosts": (f.known_hosts, 0o644)}
    return files


# cloud-init images: what SSH needs of the seed lies under /etc/ssh, never in the user's home,
# which may be a share of the host's (a job submitted from $HOME: bootcmd mounts it before the
# users module runs), and is there when cloud-init's init stage ends (what readiness waits for).
SSH_DIR = "/etc/ssh/dgxvm"
SSHD_DROPIN = "/etc/ssh/sshd_config.d/dgxvm.conf"
SSH_DROPIN = "/etc/ssh/ssh_config.d/dgxvm-job.conf"
SSH_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
# sshd takes the first AuthorizedKeysFile it reads (Debian's sshd_config includes
# sshd_config.d/*.conf at its top); the user's own file still counts after dgxvm's
# MaxSessions: the job's runs share one connection (access.connection), two sessions per run;
# OpenSSH's default of 10 would refuse the sixth of six runs started together
SSHD_CONFIG = (f"AuthorizedKeysFile {SSH_DIR}/authorized_keys/%u .ssh/authorized_keys\n"
               f"MaxSessions 512\n")
# ssh's default identities, then the job's (naming any IdentityFile drops the defaults)
SSH_CONFIG = "".join(f"IdentityFile {f}\n" for f in ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa",
                                                     "~/.ssh/id_ed25519",
                                                     f"{SSH_DIR}/id_ed25519"))


def _write_file(path: str, text: str, mode: str, owner: str = "root:root") -> list[str]:
    """One cloud-config write_files entry (its lines): ``text`` at ``path``, base64."""
    return [f"  - path: {_q(path)}",
            f"    permissions: \"{mode}\"",
            f"    owner: {_q(owner)}",
            "    encoding: b64",
            f"    content: {_q(base64.b64encode(text.encode()).decode())}"]


def _ssh_files(spec: SeedSpec) -> list[str]:
    """cloud-config write_files entries (init stage) for SSH: the keys that may log in as the
    user, read by sshd from /etc/ssh/dgxvm/authorized_keys/USER; for a multi-node job, the
    job's key (root's, readable by the user's primary group, which bootcmd made before
    write_files runs: ssh accepts a key its user does not own) and every node's VM's host key
    as the system's known hosts."""
    out = _write_file(SSHD_DROPIN, SSHD_CONFIG, "0644")
    out += _write_file(f"{SSH_DIR}/authorized_keys/{spec.user_name}",
                       "".join(k.strip() + "\n" for k in spec.authorized_keys), "0644")
    f = spec.fabric
    if f is None or f.ssh_key is None:
        return out
    out += _write_file(f"{SSH_DIR}/id_ed25519", f.ssh_key, "0640", f"root:{spec.user_name}")
    out += _write_file(f"{SSH_DIR}/id_ed25519.pub", f.ssh_key_public.strip() + "\n", "0644")
    out += _write_file(SSH_KNOWN_HOSTS, f.known_hosts, "0644")
    out += _write_file(SSH_DROPIN, SSH_CONFIG, "0644")
    return out


@functools.cache
def guest_helper() -> str:
    """The text of the guest side of ``dgxvm run`` (read once per process)."""
    return GUEST_HELPER_SOURCE.read_text(encoding="utf-8")


def write_seed(spec: SeedSpec, out: Path, *, name: str) -> Path:
    """Write the seed ISO to ``out`` (atomically, mode 0600); returns ``out``.

    The tree is staged in a private directory next to ``out`` (removed whatever happens) and
    ``xorriso -as mkisofs`` writes the image there; it replaces ``out`` only when complete.
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise SeedError(name=name, reason=f"directory {out.parent} does not exist")
    files = {"meta-data": (meta_data(spec), 0o644), "user-data": (user_data(spec), 0o644),
             **_plain_files(spec)}
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".seed", dir=out.parent))
    try:
        tree = staging / "tree"
        (tree / "dgxvm").mkdir(parents=True)
        for rel, (text, mode) in files.items():
            path = tree / rel
            path.write_text(text, encoding="utf-8")
            os.chmod(path, mode)
        iso = staging / "seed.iso"
        cmd = ["xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-R",
               "-o", str(iso), str(tree)]
        proc = run_tool(cmd, timeout=TOOL_TIMEOUT_S, what="xorriso", hint=" in PATH",
                        error=lambda reason: SeedError(name=name, reason=reason))
        if not iso.is_file():
            raise SeedError(name=name, reason=f"xorriso failed (exit 0, no image): "
                                              f"{output_tail(proc)}")
        os.chmod(iso, 0o600)
        os.replace(iso, out)
    except OSError as exc:
        raise SeedError(name=name, reason=f"cannot write {out}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
