"""Names people type (domain names, image names) are checked here, at the edge.

A name ends up in file paths (``<state_dir>/vms/<name>/``, ``<store>/<name>/``), in libvirt
object names and in XML. Only a conservative identifier is accepted, so no name can add a path
component, escape a directory, or change the structure of a document: letters, digits, ``.``,
``_`` and ``-``, starting with a letter or digit, at most 63 characters (a hostname label).
"""

from __future__ import annotations

import re

from .errors import NameError_

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_name(value: str, kind: str) -> str:
    """Return ``value`` if it is a safe name, else raise NameError_ naming ``kind`` and why."""
    if not isinstance(value, str) or not value:
        raise NameError_(kind=kind, value=value, reason="empty")
    if len(value) > 63:
        raise NameError_(kind=kind, value=value, reason="longer than 63 characters")
    if not _NAME.fullmatch(value):
        raise NameError_(kind=kind, value=value,
                         reason="use letters, digits, '.', '_' and '-', starting with a letter "
                                "or digit")
    if ".." in value:
        raise NameError_(kind=kind, value=value, reason="'..' is not allowed")
    return value


def domain_name(value: str) -> str:
    return check_name(value, "domain")


def image_name(value: str) -> str:
    return check_name(value, "image")
