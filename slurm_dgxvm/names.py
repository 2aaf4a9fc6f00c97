"""Names people type (domain names, image names) are checked here, at the edge.

A name ends up in file paths (``<state_dir>/vms/<name>/``, ``<store>/<name>/``), in libvirt
object names and in XML. Only a conservative identifier is accepted, so no name can add a path
component, escape a directory, or change the structure of a document: letters, digits, ``.``,
``_`` and ``-``, starting with a letter or digit, at most 63 characters (a hostname label).
"""

from __future__ import annotations

import re

from .errors import BadName

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

# What an image reference's registry is (distribution/reference's domain: DNS labels, an
# optional port). Here, low, so that config (the [containers] registries) and containers.ref
# (parsing a reference) share it without config importing the containers package.
REGISTRY_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)"
                           r"(?:\.(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?))*(?::[0-9]{1,5})?")


#: A warm VM's name (slurm_dgxvm.lifecycle.warm): ``warm-<n>``.
WARM_PREFIX = "warm-"
_WARM = re.compile(re.escape(WARM_PREFIX) + r"[0-9]{1,9}")


def is_warm(name: str) -> bool:
    """Whether ``name`` is a warm VM's (booted ahead for a job to claim)."""
    return bool(_WARM.fullmatch(name))


def check_name(value: str, kind: str) -> str:
    """Return ``value`` if it is a safe name, else raise BadName naming ``kind`` and why."""
    if not isinstance(value, str) or not value:
        raise BadName(kind=kind, value=value, reason="empty")
    if len(value) > 63:
        shown = value if len(value) <= 100 else f"{value[:64]}... ({len(value)} characters)"
        raise BadName(kind=kind, value=shown, reason="longer than 63 characters")
    if not _NAME.fullmatch(value):
        raise BadName(kind=kind, value=value,
                         reason="use letters, digits, '.', '_' and '-', starting with a letter "
                                "or digit")
    if ".." in value:
        raise BadName(kind=kind, value=value, reason="'..' is not allowed")
    return value


def domain_name(value: str) -> str:
    return check_name(value, "domain")


def image_name(value: str) -> str:
    return check_name(value, "image")


# -- account names and paths that come from the host or a job (not typed by an admin) ---------------
# These are not identifiers we choose: a user name is whatever the site's passwd holds, a work
# dir whatever the job asked for. So the rule is "what the host accepts, minus what would break a
# file we write": Debian's useradd takes any name that does not start with '-', '+' or '~' and
# has no ':', ',' or whitespace (john.doe, Alice, u2, o'brien); we also refuse '/', control
# characters, '.', '..', all-digit names (chown would read them as ids) and more than 32 bytes.
# Paths: absolute, UTF-8, no control character, normalised, within PATH_MAX. Spaces, quotes, '$',
# non-ASCII letters are legitimate; every writer quotes or encodes them.
ACCOUNT_NAME_MAX = 32        # bytes; useradd's limit (and utmp's)
PATH_MAX = 4095              # bytes, without the terminating NUL
NAME_MAX = 255               # bytes per path component


def _control(value: str) -> str | None:
    """The first control character (C0, DEL, C1) in ``value`` as a repr, or None."""
    for c in value:
        if ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0:
            return repr(c)
    return None


def _not_utf8(value: str) -> bool:
    """True for a str holding bytes that were not UTF-8 (os.environ decodes those with
    surrogateescape into lone surrogates) or any other lone surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text_problem(value: object) -> str | None:
    """What names and paths have in common: a non-empty str, UTF-8, no control character."""
    if not isinstance(value, str) or not value:
        return "empty"
    if _not_utf8(value):
        return "not valid UTF-8"
    bad = _control(value)
    return f"control character {bad}" if bad else None


def account_name_problem(value: object) -> str | None:
    """Why ``value`` is not a user or group name we carry into a VM, or None when it is."""
    problem = _text_problem(value)
    if problem:
        return problem
    if len(value.encode()) > ACCOUNT_NAME_MAX:
        return f"longer than {ACCOUNT_NAME_MAX} bytes"
    if value[0] in "-+~":
        return f"starts with {value[0]!r}"
    for c in value:
        if c.isspace() or c in ":,/":
            return f"contains {c!r} (no whitespace, ':', ',' or '/')"
    if value in (".", ".."):
        return "'.' and '..' are not names"
    if value.isdigit():
        return "all digits (would read as an id)"
    return None


def path_problem(value: object, *, max_bytes: int = PATH_MAX) -> str | None:
    """Why ``value`` is not an absolute, normalised, UTF-8 path we carry, or None when it is.

    Refused: relative paths, non-UTF-8 bytes, control characters (NUL, newline, DEL...), ``.``
    or ``..`` components, ``//``, a trailing ``/`` (except ``/`` itself), more than ``max_bytes``
    bytes or a component over 255 bytes. Spaces, quotes, ``$`` and non-ASCII letters pass."""
    problem = _text_problem(value)
    if problem:
        return problem
    if not value.startswith("/"):
        return "not an absolute path"
    if len(value.encode()) > max_bytes:
        return f"longer than {max_bytes} bytes"
    if value == "/":
        return None
    if value.endswith("/"):
        return "ends with '/'"
    parts = value[1:].split("/")
    if "" in parts:
        return "contains '//'"
    if "." in parts or ".." in parts:
        return "contains a '.' or '..' component"
    if any(len(p.encode()) > NAME_MAX for p in parts):
        return f"a component is longer than {NAME_MAX} bytes"
    return None


# -- names from a tree a user controls, shown by dgxvm ---------------------------------------------
_SHOWN_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def shown(value: object) -> str:
    """``value`` as dgxvm prints it when a user chose it (a file name in their image cache, a
    reference in its index): every character that is not printable escaped as Python's repr
    writes it, without the quotes (``\\n``, ``\\t``, ``\\x1b``, ``\\u202e``), a byte that was
    not UTF-8 (a lone surrogate from ``os.listdir``) as ``\\xNN`` of that byte, and ``\\``
    itself as ``\\\\``, so a name can neither end a line, nor move the cursor, colour or
    overwrite what a terminal shows, nor pass for an escape it does not hold. Printable text
    (spaces, quotes, non-ASCII letters) is kept as it is.

    Example: ``shown("a\\nb\\x1b[2J")`` is ``a\\nb\\x1b[2J`` (12 printable characters)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for c in text:
        n = ord(c)
        if c in _SHOWN_ESCAPES:
            out.append(_SHOWN_ESCAPES[c])
        elif 0xdc80 <= n <= 0xdcff:                   # surrogateescape: the byte it was
            out.append(f"\\x{n - 0xdc00:02x}")
        elif c.isprintable():
            out.append(c)
        elif n < 0x100:
            out.append(f"\\x{n:02x}")
        elif n < 0x10000:
            out.append(f"\\u{n:04x}")
        else:
            out.append(f"\\U{n:08x}")
    return "".join(out)
