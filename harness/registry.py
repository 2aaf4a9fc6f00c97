"""A container registry of our own on loopback, and small test images pushed to it.

:class:`LocalRegistry` runs Debian's ``docker-registry`` (distribution 2.8) in the foreground
as a child (through :class:`harness.daemons.Daemons`, stopped by PID), listening on
127.0.0.1:<a free port> over plain HTTP, with its config, storage and log in ``run_dir``.
With ``users`` it asks for HTTP basic auth against an htpasswd file made with apache2-utils'
``htpasswd -B`` (distribution only reads bcrypt entries). Its access log (one line per request,
in the daemon's log) is how tests count what clients asked for (:meth:`LocalRegistry.requests`).

:func:`build_image` makes a one-layer OCI image from the host's ``/bin/busybox`` (Debian's
busybox-static) with umoci and pushes it with skopeo; :func:`push_multiarch` pushes an image
index with a linux/amd64 and a linux/arm64 entry. Tools run through ``run_tool``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from slurm_dgxvm.tools import run_tool

from .daemons import Daemons

BUSYBOX = Path("/bin/busybox")
START_TIMEOUT_S = 15.0
TOOL_TIMEOUT_S = 60.0
_ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) ')


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(argv: list, what: str | None = None):
    return run_tool([str(a) for a in argv], timeout=TOOL_TIMEOUT_S, error=RuntimeError, what=what)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int


class LocalRegistry:
    """``docker-registry`` on ``host``:``port`` (127.0.0.1 and a free port by default; in network
    namespace ``netns`` when given). ``users``:
    ``{name: password}`` to require basic auth. Use as a context manager, or start()/stop()."""

    def __init__(self, run_dir: Path, *, users: dict[str, str] | None = None,
                 port: int | None = None, name: str = "registry", netns: str | None = None,
                 host: str = "127.0.0.1"):
        self.run_dir = Path(run_dir)
        self.users = dict(users or {})
        self.port = port or free_port()
        self.name = name
        self.netns = netns            # listen in that network namespace instead
        self.host = host              # on this address of it (a local cluster's controller's)
        self.enter = ["ip", "netns", "exec", netns] if netns else []
        self._daemons = Daemons(enter=self.enter,
                                env=lambda: {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                             "HOME": str(self.run_dir)},
                                log_dir=self.run_dir, log_suffix=".log", cwd=self.run_dir)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def config(self) -> str:
        auth = ""
        if self.users:
            auth = ("auth:\n  htpasswd:\n    realm: dgxvm-test\n"
                    f"    path: {self.run_dir / 'htpasswd'}\n")
        return (f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.run_dir / 'storage'}\n"
                f"  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.endpoint}\n  secret: dgxvm-test-{self.port}\n" + auth)

    def start(self) -> LocalRegistry:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.users:
            lines = [tool(["htpasswd", "-Bbn", user, pw], what=f"htpasswd {user}").stdout.strip()
                     for user, pw in self.users.items()]
            (self.run_dir / "htpasswd").write_text("\n".join(lines) + "\n")
        cfg = self.run_dir / f"{self.name}.yml"
        cfg.write_text(self.config())
        self._daemons.spawn(self.name, ["docker-registry", "serve", str(cfg)])
        try:
            self._daemons.wait_for(self.name, self._answers, f"http://{self.endpoint}/v2/",
                                   START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if self.netns:
            probe = ("import sys, urllib.request, urllib.error\n"
                     "try:\n    urllib.request.urlopen(sys.argv[1], timeout=1).close()\n"
                     "except urllib.error.HTTPError as e:\n    sys.exit(e.code != 401)\n"
                     "except OSError:\n    sys.exit(1)\n")
            r = subprocess.run([*self.enter, "python3", "-c", probe,
                                f"http://{self.endpoint}/v2/"], capture_output=True)
            return r.returncode == 0
        try:
            urllib.request.urlopen(f"http://{self.endpoint}/v2/", timeout=1).close()
            return True
        except urllib.error.HTTPError as e:
            return e.code == 401
        except OSError:
            return False

    def stop(self) -> list[str]:
        problems: list[str] = []
        self._daemons.stop(self.name, 5.0, problems)
        self._daemons.close_logs()
        return problems

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def pid(self) -> int | None:
        return self._daemons.pids().get(self.name)

    def requests(self) -> list[Request]:
        """Every request the registry logged so far, in order."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [Request(m, p, int(s)) for m, p, s in _ACCESS.findall(text)]

    def count(self, method: str, pattern: str) -> int:
        """How many ``method`` requests had a path matching the regex ``pattern``."""
        rx = re.compile(pattern)
        return sum(1 for r in self.requests() if r.method == method and rx.search(r.path))

    def authfile(self, path: Path, user: str | None = None, password: str | None = None) -> Path:
        """A Docker config.json at ``path`` with ``user``'s credentials for this registry
        (the first user, and their password, by default)."""
        user = user or next(iter(self.users))
        password = password if password is not None else self.users[user]
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"auths": {self.endpoint: {"auth": token}}}))
        path.chmod(0o600)
        return path


def _layout(work: Path, name: str, cmd: list[str], arch: str = "amd64", marker: str = "") -> Path:
    """An OCI layout ``work/layout`` with image ``name``: /bin/busybox, /bin/sh, /marker
    (``marker`` text, so two images can differ), Cmd ``cmd``, for ``linux/arch``."""
    layout = work / "layout"
    if not layout.exists():
        tool(["umoci", "init", "--layout", layout])
    tool(["umoci", "new", "--image", f"{layout}:{name}"])
    files = work / f"files-{name}"
    shutil.rmtree(files, ignore_errors=True)
    (files / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, files / "bin" / "busybox")
    os.symlink("busybox", files / "bin" / "sh")
    (files / "marker").write_text(marker or name)
    tool(["umoci", "insert", "--rootless", "--image", f"{layout}:{name}", files, "/"])
    argv = ["umoci", "config", "--image", f"{layout}:{name}", "--os", "linux",
            "--architecture", arch, "--config.env", "PATH=/bin", "--config.workingdir", "/"]
    for word in cmd:
        argv += ["--config.cmd", word]
    tool(argv)
    return layout


def build_image(registry: LocalRegistry, repository: str, tag: str, work: Path, *,
                cmd: tuple[str, ...] = ("/bin/busybox", "echo", "hello"), marker: str = "",
                authfile: Path | None = None) -> str:
    """Build a busybox image in ``work`` and push it as ``registry/repository:tag``; returns
    the manifest digest the registry holds."""
    work.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]", "-", f"{repository}-{tag}")
    layout = _layout(work, name, list(cmd), marker=marker)
    digestfile = work / f"{name}.digest"
    auth = [f"--dest-authfile={authfile}"] if authfile else ["--dest-no-creds"]
    tool([*registry.enter, "skopeo", "copy", "--quiet", "--dest-tls-verify=false", *auth,
          f"--digestfile={digestfile}", f"oci:{layout}:{name}",
          f"docker://{registry.endpoint}/{repository}:{tag}"])
    return digestfile.read_text().strip()


def push_multiarch(registry: LocalRegistry, repository: str, tag: str, work: Path) -> dict:
    """Push an image index with a linux/arm64 entry first and a linux/amd64 one (each a
    busybox image with its arch as /marker); returns ``{"index": digest, "amd64": digest,
    "arm64": digest}`` of what the registry holds."""
    work.mkdir(parents=True, exist_ok=True)
    layout = None
    for arch in ("arm64", "amd64"):
        layout = _layout(work, f"multi-{arch}", ["/bin/busybox", "echo", arch], arch=arch,
                         marker=arch)
    index = json.loads((layout / "index.json").read_text())
    entries = []
    digests = {}
    for arch in ("arm64", "amd64"):
        [desc] = [m for m in index["manifests"]
                  if m["annotations"]["org.opencontainers.image.ref.name"] == f"multi-{arch}"]
        digests[arch] = desc["digest"]
        entries.append({"mediaType": desc["mediaType"], "digest": desc["digest"],
                        "size": desc["size"], "platform": {"os": "linux", "architecture": arch}})
    blob = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": entries}).encode()
    hex_ = hashlib.sha256(blob).hexdigest()
    (layout / "blobs" / "sha256" / hex_).write_bytes(blob)
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": f"sha256:{hex_}",
        "size": len(blob), "annotations": {"org.opencontainers.image.ref.name": "multi"}})
    (layout / "index.json").write_text(json.dumps(index))
    tool(["skopeo", "copy", "--quiet", "--all", "--preserve-digests", "--dest-tls-verify=false",
          "--dest-no-creds", f"oci:{layout}:multi",
          f"docker://{registry.endpoint}/{repository}:{tag}"])
    return {"index": f"sha256:{hex_}", **digests}


__all__ = ["BUSYBOX", "LocalRegistry", "Request", "build_image", "free_port", "push_multiarch"]
