"""What a command run in the job's VM sees: its argv, environment and working directory, as the
sh script the guest helper sources (``dgxvm-guest.sh``). Pure: the caller passes the caller's
argv, environment and cwd and the target's facts.

Every value is single-quoted byte for byte (only ``'`` needs care), so arguments with spaces,
quotes, globs, newlines or bytes that are not UTF-8 arrive exactly as given: nothing is
re-parsed by a shell. The script travels base64'd on one line (ssh's remote command line is
limited to 9000 bytes by dropbear, and the environment of a Slurm job can be larger).

The environment rule (docs/user/run.md, "What CMD gets"):

- every variable of the caller passes through, except those that describe the host's own session
  and would be false in the VM: ``HOST_ONLY`` and names starting with ``HOST_ONLY_PREFIXES``; the
  guest's login sets HOME, USER, LOGNAME, SHELL; PATH is the guest's (``GUEST_PATH``);
- Slurm's host GPU indices are translated to the guest's numbering (containers.gpuenv);
- names that are not shell identifiers cannot be exported by sh and are left out.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..containers import gpuenv

HOST_ONLY = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "_", "MAIL",
    "HOSTNAME", "TMPDIR", "DISPLAY", "XAUTHORITY", "KRB5CCNAME", "MOTD_SHOWN",
})
HOST_ONLY_PREFIXES = ("SSH_", "LD_", "XDG_", "DGXVM_", "BASH_FUNC_")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FILE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


def quote(value: str | bytes) -> bytes:
    """``value`` as one single-quoted sh word, byte for byte (str via the filesystem encoding,
    so an argument that was not UTF-8 keeps its bytes)."""
    raw = os.fsencode(value) if isinstance(value, str) else value
    return b"'" + raw.replace(b"'", b"'\\''") + b"'"


def is_name(name: str) -> bool:
    """Whether ``name`` is a variable name sh can export."""
    return bool(_NAME.match(name))


def passes(name: str) -> bool:
    """Whether the caller's variable ``name`` goes into the VM."""
    return (is_name(name) and name not in HOST_ONLY
            and not name.startswith(HOST_ONLY_PREFIXES))


def guest_environment(environ: Mapping[str, str], slurm_gpus: tuple[int, ...], *,
                      relative: bool) -> dict[str, str]:
    """The caller's environment as the command in the VM gets it (see the module's rule)."""
    env = {k: v for k, v in environ.items() if passes(k)}
    env.update(gpuenv.translate(environ, slurm_gpus, relative=relative))
    env["PATH"] = GUEST_PATH
    return env


def guest_cwd(cwd: str, shared: Sequence[str]) -> str | None:
    """``cwd`` when it is one of the shared directories or below one (a share is at the same
    path in the guest), else None (the command starts in the user's home in the guest)."""
    norm = os.path.normpath(cwd)
    for root in shared:
        r = os.path.normpath(root)
        if norm == r or norm.startswith(r.rstrip("/") + "/"):
            return norm
    return None


@dataclass(frozen=True)
class Request:
    """``argv`` run with ``env`` in ``cwd``. ``files`` (name -> bytes) are written into the run's
    directory in the guest first (``$DGXVM_RUN_DIR``, e.g. a container's config.json);
    ``command`` replaces ``argv`` with words dgxvm wrote itself, where ``$DGXVM_RUN_DIR`` may
    appear (never a value of the caller's); ``cleanup`` is what stops the command if its
    process group was killed (a container runtime's delete)."""
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None
    files: Mapping[str, bytes] = field(default_factory=dict)
    command: bytes | None = None
    cleanup: bytes | None = None

    def script(self) -> bytes:
        """The sh the guest helper sources (with the run's directory as ``$1``): files,
        exports, cd, ``set --``."""
        lines = [b'DGXVM_RUN_DIR=$1']
        for name, data in sorted(self.files.items()):
            if not _FILE.match(name):
                raise ValueError(f"bad file name {name!r}")
            lines.append(b"printf '%s' " + quote(data) + b' > "$DGXVM_RUN_DIR/'
                         + name.encode() + b'" || exit 125')
        if self.cleanup is not None:
            lines.append(b"printf '%s\\n' " + quote(self.cleanup)
                         + b' > "$DGXVM_RUN_DIR/cleanup" || exit 125')
        lines += [b"export " + k.encode() + b"=" + quote(v) for k, v in sorted(self.env.items())]
        if self.cwd is not None:
            lines.append(b"cd -- " + quote(self.cwd) + b" || { echo "
                         + quote(f"dgxvm run: {self.cwd} is not reachable in the VM")
                         + b" >&2; exit 125; }")
        else:
            lines.append(b'cd -- "$HOME" 2>/dev/null || cd /')
        if self.command is not None:
            lines.append(b"set -- " + self.command)
        else:
            lines.append(b"set -- " + b" ".join(quote(a) for a in self.argv))
        return b"\n".join(lines) + b"\n"

    def line(self) -> bytes:
        """The request as the control session reads it: one base64 line."""
        return base64.b64encode(self.script()) + b"\n"
