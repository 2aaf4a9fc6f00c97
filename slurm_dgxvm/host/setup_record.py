"""The machine's own record of what ``dgxvm host setup`` changed: ``<state dir>/host-setup.json``.

One entry per thing changed, keyed by what it is (a device's binding, a node's pool, a file
under the /etc root), holding what was there *before* setup first changed it: a file's bytes
and mode, or its absence; a symlink's target; a device's driver; a pool's size. An entry is
written before its change is made, so a setup that dies half way leaves a record that revert can
follow: an entry whose change never happened finds the thing as it was before and leaves it.
A later setup adds entries and never replaces a ``before`` (the first one is the host's own).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from ..errors import HostError
from ..fsutil import atomic_write_json

VERSION = 1


def key(entry: dict) -> str:
    kind = entry["kind"]
    if kind == "bind":
        return f"bind:{entry['bdf']}"
    if kind == "hugepages":
        return f"hugepages:{entry['node']}:{entry['size_kib']}"
    return f"path:{entry['path']}"


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


class SetupRecord:
    """The record file: :meth:`load` (None when there is none), :meth:`add`, :meth:`remove`."""

    def __init__(self, path: str | os.PathLike, doc: dict | None = None):
        self.path = Path(path)
        self.doc = doc or {"version": VERSION, "changes": [], "made_state_dir": False}

    @classmethod
    def load(cls, path: str | os.PathLike) -> SetupRecord | None:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise HostError(reason=f"cannot read the setup record {path}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != VERSION \
                or not isinstance(doc.get("changes"), list):
            raise HostError(reason=f"the setup record {path} is not one this dgxvm wrote "
                                   f"(version {doc.get('version') if isinstance(doc, dict) else '?'})")
        return cls(path, doc)

    @property
    def changes(self) -> list[dict]:
        return self.doc["changes"]

    def find(self, entry: dict) -> dict | None:
        k = key(entry)
        return next((c for c in self.changes if key(c) == k), None)

    def add(self, entry: dict) -> None:
        """Record ``entry`` (written to disk before the caller makes the change). An entry for
        something already recorded keeps the first ``before`` and takes the new ``after``."""
        old = self.find(entry)
        if old is not None:
            old.update({k: v for k, v in entry.items() if not k.startswith("before")
                        and k != "made_dirs"})
        else:
            self.changes.append(entry)
        self.save()

    def save(self) -> None:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, mode=0o755)
            self.doc["made_state_dir"] = True
        atomic_write_json(self.path, self.doc)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.doc.get("made_state_dir"):
            try:
                self.path.parent.rmdir()
            except OSError:
                pass
