"""Container image references as users of pyxis write them, made into one canonical form.

Accepted (``--container-image``), pyxis's and enroot's syntax first, Docker's too:

    [docker://][USER@][REGISTRY#]IMAGE[:TAG|@DIGEST]     nvcr.io#nvidia/pytorch:24.01-py3
    [docker://][USER@][REGISTRY/]IMAGE[:TAG|@DIGEST]     nvcr.io/nvidia/pytorch:24.01-py3

- ``REGISTRY#`` names the registry explicitly (enroot). Without ``#``, the first path component
  is the registry when it looks like a host: it has a ``.`` or a ``:`` (a port), or is
  ``localhost`` (Docker's rule, distribution/reference); otherwise the image is on Docker Hub,
  where a one-component name is an official image (``ubuntu`` -> ``docker.io/library/ubuntu``).
- ``USER@`` (enroot) says whose registry credentials to use; kept, never part of the name.
- No tag and no digest means ``:latest``. A digest pins the image (``@sha256:<64 hex>``).
- Refused, each naming the value: an empty reference, another scheme (``dockerd://``, a
  squashfs ``PATH``: dgxvm pulls from registries only), upper case or other characters a
  repository may not have, a bad tag, a malformed digest, a registry that is not a host[:port].

Pure: nothing here touches the network or the disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ContainerRefError
from ..names import REGISTRY_HOST

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"    # where docker.io's API answers
DEFAULT_TAG = "latest"

# distribution/reference's grammar (reference/regexp.go), written out
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_DIGEST_LIKE = re.compile(r"[a-z0-9]+:[0-9a-fA-F]+$")   # after '@': a digest, not an image
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_NAME = 255                                   # registry + repository, as Docker limits it


@dataclass(frozen=True)
class ImageRef:
    """One image in one registry: by tag, or pinned by digest."""

    registry: str                 # host[:port]; Docker Hub is "docker.io"
    repository: str               # "library/ubuntu", "nvidia/pytorch"
    tag: str | None               # None only when pinned by digest alone
    digest: str | None = None     # "sha256:..."
    user: str | None = None       # enroot's USER@: whose credentials to use

    @property
    def name(self) -> str:
        """``registry/repository``: what credentials and the cache key by."""
        return f"{self.registry}/{self.repository}"

    @property
    def endpoint(self) -> str:
        """The host[:port] whose /v2/ API serves this image."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What the registry's manifest URL takes: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def parse(text: str) -> ImageRef:
    """The :class:`ImageRef` of ``text``; ContainerRefError naming it and the problem."""
    def bad(reason: str) -> ContainerRefError:
        return ContainerRefError(value=text, reason=reason)

    if not isinstance(text, str) or not text.strip():
        raise bad("empty; give an image such as ubuntu:24.04 or nvcr.io#nvidia/pytorch:24.01-py3")
    if text != text.strip() or any(c.isspace() or not c.isprintable() for c in text):
        raise bad("has white space or control characters")
    rest = text
    scheme, sep, after = rest.partition("://")
    if sep:
        if scheme != "docker":
            raise bad(f"{scheme}:// images are not supported: dgxvm pulls from registries "
                      f"(docker://... or no scheme)")
        rest = after
    if rest.startswith(("/", "./", "../")) or rest.endswith((".sqsh", ".squashfs")):
        raise bad("a squashfs file is not supported: dgxvm pulls from registries")
    user = None
    head, at, tail = rest.partition("@")
    if at and not any(c in head for c in "/:#") and not _DIGEST_LIKE.match(tail):
        if not _USER.fullmatch(head):
            raise bad(f"user {head!r} is not a user name")
        user, rest = head, tail
    registry, hash_, path = rest.partition("#")
    if hash_:
        if not registry:
            raise bad("nothing before '#': give the registry (nvcr.io#nvidia/pytorch)")
    else:
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, remainder
        else:
            registry, path = DOCKER_HUB, rest
    if not REGISTRY_HOST.fullmatch(registry):
        raise bad(f"registry {registry!r} is not a host name (with an optional :port)")
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    path, at, digest = path.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise bad(f"digest {digest!r} is not sha256:<64 hex> (or sha512:<128 hex>)")
    repository, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = path.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise bad(f"tag {tag!r}: letters, digits, '_', '.' and '-', at most 128, "
                      f"not starting with '.' or '-'")
    if not repository:
        raise bad("no image name")
    for comp in repository.split("/"):
        if not _COMPONENT.fullmatch(comp):
            raise bad(f"image name component {comp!r}: lower-case letters and digits, "
                      f"separated by '.', '_', '__' or '-'")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if len(f"{registry}/{repository}") > MAX_NAME:
        raise bad(f"the name is longer than {MAX_NAME} characters")
    if tag is None and not at:
        tag = DEFAULT_TAG
    return ImageRef(registry=registry, repository=repository, tag=tag,
                    digest=digest if at else None, user=user)


__all__ = ["DEFAULT_TAG", "DOCKER_HUB", "ImageRef", "parse"]
