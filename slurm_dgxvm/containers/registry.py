"""A container registry, spoken to through Debian's ``skopeo`` (1.9), as the user.

- :meth:`Registry.resolve`: one ``skopeo inspect --raw`` of the reference (a GET of its
  manifest): the digest of the linux/amd64 image manifest it names. A multi-arch index is read
  here and its linux/amd64 entry chosen (:func:`select_platform`); a plain manifest's digest is
  the sha256 of its bytes.
- :meth:`Registry.pull`: ``skopeo copy docker://REGISTRY/REPO@DIGEST oci:DIR:TAG``, pinned to the
  digest ``resolve`` returned (a tag moved in between cannot change what is pulled; skopeo
  verifies the bytes against it), with ``--override-os linux --override-arch amd64``.

Progress: skopeo 1.9 writes its copy report to its stdout: on a terminal a progress bar per blob
(redrawn in place with cursor-up and erase escapes), to a pipe or a file one ``Copying blob
sha256:...`` line per blob and a few more lines; its errors go to stderr. A pull runs
``--quiet`` (no report at all: a batch log gets the cache's one line per stage) unless it is
given a terminal (:meth:`Registry.pull`'s ``progress_to``): then skopeo's stdout is that
terminal, so the user watches the bars, and its stderr is still captured for :func:`classify`.

Credentials: a Docker ``config.json`` (``auths``, as ``docker login`` writes it) passed to
skopeo as ``--authfile``; :func:`default_authfile` finds the user's own
(``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``). It is read by skopeo running as
the user, never copied. Without one skopeo runs with ``--no-creds`` (anonymous), so it never
falls back to credentials of its own choosing (``$XDG_RUNTIME_DIR/containers/auth.json``).

Registries listed in ``insecure`` (``host:port``, as :attr:`ImageRef.endpoint` says it) are
reached without TLS verification, and over plain HTTP where they speak it (skopeo's
``--tls-verify=false``); every other one over verified HTTPS.

Failures become :class:`ContainerImageError` subclasses naming the reference
(:func:`classify`): unknown repository, tag or digest, or no linux/amd64 image
(ContainerImageNotFound, exit 2); credentials missing or refused (ContainerAuthError, exit 2);
registry unreachable (ContainerRegistryUnreachable, exit 3); disk full (ContainerDiskFull,
exit 3); anything else, or skopeo missing or hung, ContainerImageError (exit 3) with skopeo's
last words.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import (ContainerAuthError, ContainerDiskFull, ContainerImageError,
                      ContainerImageNotFound, ContainerRegistryUnreachable)
from ..tools import output_tail, run_tool, tail
from .ref import ImageRef

PLATFORM_OS = "linux"
PLATFORM_ARCH = "amd64"
RESOLVE_TIMEOUT_S = 60.0
PULL_TIMEOUT_S = 3600.0
DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")

INDEX_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"})
MANIFEST_TYPES = frozenset({"application/vnd.oci.image.manifest.v1+json",
                            "application/vnd.docker.distribution.manifest.v2+json"})

# What skopeo 1.9 (containers/image 5.23, distribution's error codes) says, in its C-locale words.
_DISK_FULL = re.compile(r"no space left on device|disk quota exceeded", re.I)
_UNREACHABLE = re.compile(
    r"connection refused|no such host|i/o timeout|network is unreachable|no route to host"
    r"|connection reset|timeout awaiting|TLS handshake|x509:|server gave HTTP response to HTTPS"
    r"|pinging container registry", re.I)
_AUTH = re.compile(r"unauthorized|authentication required|invalid username/password"
                   r"|requested access to the resource is denied|denied:|status code 401"
                   r"|status code 403|\b401 \(Unauthorized\)|\b403 \(Forbidden\)", re.I)
_NOT_FOUND = re.compile(r"manifest unknown|name unknown|repository name not known"
                        r"|blob unknown|not found|status code 404|404 \(Not Found\)", re.I)


def default_authfile(env: Mapping[str, str] | None = None, home: str | None = None) -> Path | None:
    """The user's Docker credentials file, where ``docker login`` keeps it: ``$DOCKER_CONFIG/
    config.json`` when DOCKER_CONFIG is set, else ``~/.docker/config.json``; None when that file
    does not exist (the pull is then anonymous). Call it as the user (``~`` is theirs)."""
    env = os.environ if env is None else env
    if env.get("DOCKER_CONFIG"):
        path = Path(env["DOCKER_CONFIG"]) / "config.json"
    else:
        path = Path(home or os.path.expanduser("~")) / ".docker" / "config.json"
    return path if path.is_file() else None


def authfile_has(authfile: Path | None, endpoint: str) -> bool | None:
    """Whether the Docker config ``authfile`` holds credentials for ``endpoint`` (an ``auths``
    key, with or without a scheme or path, or a ``credHelpers`` entry); None if it cannot be
    read. Only used to word an authentication error."""
    if authfile is None:
        return False
    try:
        doc = json.loads(Path(authfile).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    hosts = set()
    for key in (doc.get("auths") or {}):
        host = re.sub(r"^[a-z]+://", "", str(key)).split("/", 1)[0]
        hosts.add(host)
    hosts |= set(doc.get("credHelpers") or {})
    aliases = {endpoint}
    if endpoint == "registry-1.docker.io":
        aliases |= {"docker.io", "index.docker.io"}
    return bool(hosts & aliases) or bool(doc.get("credsStore"))


def terminal_fd(out: IO | int | None) -> int | None:
    """The file descriptor of ``out`` (a file or a descriptor) when it is a terminal, else
    None (no descriptor, closed, a pipe, a file: a batch log)."""
    if out is None:
        return None
    try:
        fd = out if isinstance(out, int) else out.fileno()
        return fd if os.isatty(fd) else None
    except (AttributeError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class Resolved:
    """What a reference names now: ``digest`` of the linux/amd64 image manifest, and the
    digest of the index it was chosen from (None when the reference named the manifest)."""

    digest: str
    index_digest: str | None = None


def select_platform(index: dict, ref: ImageRef, *, os_name: str = PLATFORM_OS,
                    arch: str = PLATFORM_ARCH) -> str:
    """The digest of ``index``'s entry for ``os_name``/``arch`` (the first one; a variant is
    not looked at, amd64 has none). ContainerImageNotFound naming the platforms it has when
    there is none; ContainerImageError when an entry's digest is not a digest (a registry's JSON
    becomes a path in the cache, so it is checked here).

    >>> select_platform({"manifests": [{"digest": "sha256:" + "a" * 64,
    ...     "platform": {"os": "linux", "architecture": "amd64"}}]}, ref)  # doctest: +SKIP
    'sha256:aaaa...'
    """
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ContainerImageError(ref=str(ref), reason="the registry's image index has no "
                                  "manifests list")
    seen = []
    for entry in entries:
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(plat, dict):
            continue
        seen.append(f"{plat.get('os')}/{plat.get('architecture')}")
        if plat.get("os") == os_name and plat.get("architecture") == arch:
            digest = entry.get("digest")
            if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
                raise ContainerImageError(ref=str(ref), reason=f"the image index's {os_name}/"
                                          f"{arch} entry has a bad digest {tail(str(digest), 80)!r}")
            return digest
    raise ContainerImageNotFound(ref=str(ref), reason=f"no {os_name}/{arch} image; the index "
                                 f"has {', '.join(sorted(set(seen))) or 'no platforms'}")


def manifest_digest(raw: str) -> str:
    """The sha256 digest of a manifest as the registry sent it.

    NOTE: skopeo's output reaches us as text (run_tool decodes it; UTF-8 and back is exact for
    JSON) with universal newlines: a manifest with a CR in its whitespace would hash
    differently; the pull by that digest then fails skopeo's own check and says so."""
    return "sha256:" + hashlib.sha256(raw.encode("utf-8")).hexdigest()


def skopeo_said(stderr: str) -> str:
    """What skopeo's fatal log line says (its ``msg="..."``, unquoted), or ``stderr`` as it is.

    >>> skopeo_said('time="t" level=fatal msg="reading manifest 1: \\"x\\" unknown"')
    'reading manifest 1: "x" unknown'
    """
    m = re.search(r'level=fatal msg="((?:[^"\\]|\\.)*)"', stderr)
    if not m:
        return stderr
    return re.sub(r'\\(.)', r"\1", m.group(1))


def classify(stderr: str, ref: ImageRef, *, authfile: Path | None = None,
             has_creds: bool | None = None) -> ContainerImageError:
    """The error skopeo's failure ``stderr`` means for ``ref`` (see the module's docstring).
    ``has_creds`` (from :func:`authfile_has`) words an authentication error: none given, none
    for this registry in ``authfile``, or refused. Pure."""
    said = tail(skopeo_said(stderr))
    where = ref.endpoint
    if _DISK_FULL.search(stderr):
        return ContainerDiskFull(ref=str(ref), reason=f"the disk is full: {said}")
    if _UNREACHABLE.search(stderr) and not _AUTH.search(stderr):
        hint = ""
        if "server gave HTTP response to HTTPS" in stderr:
            hint = f" ({where} speaks plain HTTP: list it as an insecure registry if you trust it)"
        elif "x509:" in stderr:
            hint = f" ({where}'s TLS certificate is not trusted here)"
        return ContainerRegistryUnreachable(ref=str(ref), reason=f"registry {where} cannot be "
                                            f"reached{hint}: {said}")
    if _AUTH.search(stderr):
        if authfile is None:
            creds = "no credentials were given (docker login writes them to ~/.docker/config.json)"
        elif has_creds is False:
            creds = f"{authfile} has no credentials for {where}"
        else:
            creds = f"it refused the credentials in {authfile}"
        return ContainerAuthError(ref=str(ref), reason=f"registry {where} denied access, or the "
                                  f"repository does not exist: {creds}: {said}")
    if _NOT_FOUND.search(stderr):
        what = f"digest {ref.digest}" if ref.digest else f"tag {ref.reference!r}"
        return ContainerImageNotFound(ref=str(ref), reason=f"no {what} in {ref.name}: {said}")
    return ContainerImageError(ref=str(ref), reason=f"skopeo failed: {said}")


@dataclass(frozen=True)
class Registry:
    """How to reach registries as one user: ``authfile`` (a Docker config.json, or None:
    anonymous), ``insecure`` (endpoints reached without TLS verification / over HTTP)."""

    authfile: Path | None = None
    insecure: frozenset[str] = field(default_factory=frozenset)
    skopeo: str = "skopeo"
    resolve_timeout_s: float = RESOLVE_TIMEOUT_S
    pull_timeout_s: float = PULL_TIMEOUT_S
    env: Mapping[str, str] | None = None

    @classmethod
    def for_user(cls, *, insecure: Iterable[str] = (), **kw) -> Registry:
        """The calling user's registry access: their :func:`default_authfile`."""
        return cls(authfile=default_authfile(), insecure=frozenset(insecure), **kw)

    def _common(self, ref: ImageRef, tls_flag: str) -> list[str]:
        out = [f"{tls_flag}={'false' if ref.endpoint in self.insecure else 'true'}"]
        if self.authfile is not None:
            out.append(f"--{'src-' if tls_flag.startswith('--src') else ''}authfile={self.authfile}")
        else:
            out.append(f"--{'src-' if tls_flag.startswith('--src') else ''}no-creds")
        return out

    def _source(self, ref: ImageRef, reference: str | None = None) -> str:
        reference = reference or ref.reference
        sep = "@" if reference.startswith(("sha256:", "sha512:")) else ":"
        return f"docker://{ref.endpoint}/{ref.repository}{sep}{reference}"

    def _run(self, argv: list[str], ref: ImageRef, what: str, timeout: float,
             env: Mapping[str, str] | None = None, stdout: int | None = None):
        def error(reason: str) -> ContainerImageError:
            if reason.startswith(what):           # run_tool's time-out: skopeo was killed
                return ContainerRegistryUnreachable(ref=str(ref), reason=f"registry "
                                                    f"{ref.endpoint} did not answer: {reason}")
            return ContainerImageError(ref=str(ref), reason=reason)
        run_env = dict(os.environ if self.env is None else self.env)
        run_env.update(env or {})
        result = run_tool([self.skopeo, *argv], timeout=timeout, error=error, what=what,
                          hint=" (Debian package skopeo)", check=False, env=run_env,
                          stdout=stdout)
        if result.returncode != 0:
            raise classify(output_tail(result, 4000), ref, authfile=self.authfile,
                           has_creds=authfile_has(self.authfile, ref.endpoint))
        return result

    def resolve(self, ref: ImageRef) -> Resolved:
        """The linux/amd64 manifest digest ``ref`` names now (one manifest GET; see the module
        docstring). A tag that is unknown while its repository is known says so (one more
        request, only then: ``skopeo list-tags``)."""
        try:
            result = self._run(["inspect", "--raw", *self._common(ref, "--tls-verify"),
                                self._source(ref)], ref, f"skopeo inspect {ref}",
                               self.resolve_timeout_s)
        except ContainerImageNotFound as e:
            raise self._explain_not_found(ref, e) from None
        raw = result.stdout
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ContainerImageError(ref=str(ref), reason=f"the registry's manifest is not "
                                      f"JSON: {tail(raw, 120)!r}") from None
        if not isinstance(doc, dict):
            raise ContainerImageError(ref=str(ref), reason="the registry's manifest is not an "
                                      "object")
        digest = ref.digest if ref.digest else manifest_digest(raw)
        media = doc.get("mediaType")
        if media in INDEX_TYPES or (media is None and "manifests" in doc):
            return Resolved(digest=select_platform(doc, ref), index_digest=digest)
        if media not in MANIFEST_TYPES and not (media is None and "layers" in doc):
            raise ContainerImageError(ref=str(ref), reason=f"unsupported manifest type "
                                      f"{tail(str(media), 120)!r} (schema 1 images are not "
                                      f"supported)")
        return Resolved(digest=digest)

    def _explain_not_found(self, ref: ImageRef, err: ContainerImageNotFound) -> ContainerImageError:
        """``err`` reworded after a ``skopeo list-tags``: repository unknown, or tag unknown
        (with some of the tags it has)."""
        try:
            result = self._run(["list-tags", *self._common(ref, "--tls-verify"),
                                f"docker://{ref.endpoint}/{ref.repository}"], ref,
                               f"skopeo list-tags {ref.name}", self.resolve_timeout_s)
        except ContainerImageNotFound:
            return ContainerImageNotFound(ref=str(ref), reason=f"unknown repository "
                                          f"{ref.repository!r} in registry {ref.endpoint}")
        except ContainerImageError:
            return err
        try:
            tags = json.loads(result.stdout).get("Tags") or []
        except (ValueError, AttributeError):
            return err
        if ref.digest:
            return ContainerImageNotFound(ref=str(ref), reason=f"no manifest {ref.digest} in "
                                          f"{ref.name}")
        shown = ", ".join(sorted(map(str, tags))[:10]) + (", ..." if len(tags) > 10 else "")
        return ContainerImageNotFound(ref=str(ref), reason=f"unknown tag {ref.tag!r} in "
                                      f"{ref.name} (it has: {shown or 'no tags'})")

    def pull(self, ref: ImageRef, digest: str, oci_dir: Path, tag: str, *,
             tmpdir: Path | None = None, progress_to: IO | int | None = None) -> str:
        """Copy the image manifest ``digest`` of ``ref``'s repository into the OCI layout
        ``oci_dir`` as ``tag``; returns the digest of the manifest written there (skopeo's
        ``--digestfile``; it differs from ``digest`` when a Docker manifest was converted to
        OCI). ``tmpdir`` holds skopeo's temporary files (it defaults to /var/tmp).
        ``progress_to`` (a file or descriptor): where skopeo's progress bars go when it is a
        terminal; anything else, or None, and skopeo runs ``--quiet`` (the module docstring)."""
        if not DIGEST.fullmatch(digest):
            raise ContainerImageError(ref=str(ref), reason=f"bad digest {digest!r}")
        digestfile = oci_dir.parent / f".{oci_dir.name}.digest"
        argv = ["--override-os", PLATFORM_OS, "--override-arch", PLATFORM_ARCH]
        if tmpdir is not None:
            argv += ["--tmpdir", str(tmpdir)]
        terminal = terminal_fd(progress_to)
        argv += ["copy", *(["--quiet"] if terminal is None else []), "--remove-signatures",
                 *self._common(ref, "--src-tls-verify"), f"--digestfile={digestfile}",
                 self._source(ref, digest), f"oci:{oci_dir}:{tag}"]
        env = {"TMPDIR": str(tmpdir)} if tmpdir is not None else None
        if terminal is not None and hasattr(progress_to, "flush"):
            progress_to.flush()                # our own lines first, then skopeo's bars
        self._run(argv, ref, f"skopeo copy {ref}", self.pull_timeout_s, env=env, stdout=terminal)
        try:
            written = digestfile.read_text().strip()
            digestfile.unlink()
        except OSError as e:
            raise ContainerImageError(ref=str(ref), reason=f"skopeo wrote no digest file "
                                      f"{digestfile}: {e.strerror}") from None
        return written


__all__ = ["DIGEST", "PLATFORM_ARCH", "PLATFORM_OS", "Registry", "Resolved", "authfile_has",
           "classify", "default_authfile", "manifest_digest", "select_platform", "skopeo_said",
           "terminal_fd"]
