"""NVIDIA UFM's REST API for partition keys: a job's GUIDs in, and out again.

The calls, as UFM Enterprise's REST API guide ("PKey GUIDs REST API", v6.12-v6.22,
docs.nvidia.com/networking/display/ufmenterpriserestapiv6202/pkey+guids+rest+api) documents
them [DOC], and as Mellanox/ib-kubernetes (pkg/sm/plugins/ufm/ufm.go) makes them [REAL]:

    POST /ufmRest/resources/pkeys
         {"pkey": "0x102a", "guids": ["02f60300000c0003", ...], "membership": "full",
          "index0": true, "ip_over_ib": true}
    POST /ufmRest/actions/remove_guids_from_pkey
         {"pkey": "0x102a", "guids": ["02f60300000c0003", ...]}

HTTP basic authentication (ib-kubernetes's BasicAuth) [REAL]. The guide marks the ``/actions/``
calls deprecated in favour of ``/resources/`` ones; the removal's ``/resources/`` URL was not in
what could be read, so the call ib-kubernetes makes today is kept [INF]. ``index0`` puts the key
at index 0 of each VF's P_Key table, so the guest's default P_Key is the job's.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import urllib.error
import urllib.request

from ..errors import IbPartitionError
from ..tools import tail
from .plan import IbPlan

ADD = "/ufmRest/resources/pkeys"
REMOVE = "/ufmRest/actions/remove_guids_from_pkey"


def ufm_guid(guid: str) -> str:
    """``0x02f60300000c0003`` -> ``02f60300000c0003`` (16 hex digits, as UFM lists GUIDs)."""
    return f"{int(guid, 16):016x}"


def read_credentials(path: str, pkey: str) -> tuple[str, str]:
    """``(user, password)`` from ``path`` ("USER:PASSWORD" on one line). The file must belong
    to the user dgxvm runs as (root on a node) and be readable by nobody else: otherwise
    IbPartitionError, before anything is sent."""
    def bad(reason):
        return IbPartitionError(pkey=pkey, call=f"read {path}", reason=reason)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise bad(exc.strerror.lower() if exc.strerror else str(exc)) from None
    with os.fdopen(fd, encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise bad(f"must be owned by uid {os.geteuid()} and not readable by group or others "
                      f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
        text = f.read().strip()
    user, sep, password = text.partition(":")
    if not sep or not user or not password or "\n" in text:
        raise bad("expected one line USER:PASSWORD")
    return user, password


class Ufm:
    """UFM at ``url`` (``https://HOST[:PORT]``); every call waits at most ``timeout_s``."""

    def __init__(self, url: str, credentials_file: str, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.credentials_file = credentials_file
        self.timeout_s = float(timeout_s)

    def add(self, plan: IbPlan) -> None:
        """Put the plan's GUIDs into its key, as full members, the key at index 0."""
        self._post(ADD, {"pkey": plan.pkey_hex, "guids": [ufm_guid(g) for g in plan.guids],
                         "membership": "full", "index0": True, "ip_over_ib": True}, plan)

    def remove(self, plan: IbPlan) -> None:
        """Take the plan's GUIDs out of its key."""
        self._post(REMOVE, {"pkey": plan.pkey_hex,
                            "guids": [ufm_guid(g) for g in plan.guids]}, plan)

    def _post(self, path: str, body: dict, plan: IbPlan) -> None:
        call = f"POST {self.url}{path}"
        user, password = read_credentials(self.credentials_file, plan.pkey_hex)
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            raise IbPartitionError(pkey=plan.pkey_hex, call=call,
                                   reason=f"HTTP {exc.code} {exc.reason}: {tail(text, 300)}",
                                   status=exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise IbPartitionError(pkey=plan.pkey_hex, call=call,
                                   reason=f"UFM did not answer ({reason})") from None
