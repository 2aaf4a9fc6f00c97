"""--container-image references: pyxis's and enroot's syntax and Docker's, one canonical form,
and every malformed one refused naming the value (exit 2)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from slurm_dgxvm.containers.ref import ImageRef, parse
from slurm_dgxvm.errors import ContainerRefError

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, canonical, endpoint", [
    # pyxis's own examples (NVIDIA/pyxis tests/docker_image.bats, README)
    ("ubuntu:24.04", "docker.io/library/ubuntu:24.04", "registry-1.docker.io"),
    ("centos", "docker.io/library/centos:latest", "registry-1.docker.io"),
    ("nvcr.io#nvidia/pytorch:24.01-py3", "nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io"),
    ("registry.gitlab.com#nvidia/kubernetes/device-plugin/k8s-device-plugin:1.0.0-beta4",
     "registry.gitlab.com/nvidia/kubernetes/device-plugin/k8s-device-plugin:1.0.0-beta4",
     "registry.gitlab.com"),
    ("docker://nvidia/cuda:11.8.0-base-ubuntu20.04",
     "docker.io/nvidia/cuda:11.8.0-base-ubuntu20.04", "registry-1.docker.io"),
    (f"rapidsai/devcontainers@{D}", f"docker.io/rapidsai/devcontainers@{D}",
     "registry-1.docker.io"),
    # the same images written Docker's way: '/' after a registry that looks like a host
    ("nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io"),
    ("localhost:5000/test/busybox", "localhost:5000/test/busybox:latest", "localhost:5000"),
    ("localhost/busybox:1", "localhost/busybox:1", "localhost"),
    ("127.0.0.1:5000#private/app:v2", "127.0.0.1:5000/private/app:v2", "127.0.0.1:5000"),
    ("index.docker.io/library/debian:12", "docker.io/library/debian:12", "registry-1.docker.io"),
    (f"ubuntu:24.04@{D}", f"docker.io/library/ubuntu:24.04@{D}", "registry-1.docker.io"),
    ("a_b__c-e---f/x.y", "docker.io/a_b__c-e---f/x.y:latest", "registry-1.docker.io"),
    ("a.b/x", "a.b/x:latest", "a.b"),       # a '.' in the first component: it is a registry
])
def test_accepted_references_have_one_canonical_form(text, canonical, endpoint):
    ref = parse(text)
    assert str(ref) == canonical and ref.endpoint == endpoint
    assert parse(str(ref)) == ref                        # the canonical form parses to itself


def test_the_parts_and_what_the_registry_is_asked_for():
    ref = parse("alice@nvcr.io#nvidia/pytorch:24.01-py3")
    assert ref == ImageRef(registry="nvcr.io", repository="nvidia/pytorch", tag="24.01-py3",
                           user="alice")
    assert ref.name == "nvcr.io/nvidia/pytorch" and ref.reference == "24.01-py3"
    assert "alice" not in str(ref)                       # whose credentials, not the name
    pinned = parse(f"ubuntu@{D}")
    assert (pinned.tag, pinned.digest, pinned.reference, pinned.user) == (None, D, D, None)


@pytest.mark.parametrize("text, named", [
    ("", "empty"),
    ("   ", "empty"),
    (" ubuntu", "white space"),
    ("ubu ntu", "white space"),
    ("ubuntu\n", "white space"),
    ("dockerd://ubuntu", "dockerd:// images are not supported"),
    ("podman://ubuntu", "podman:// images are not supported"),
    ("/shared/images/pytorch.sqsh", "squashfs file is not supported"),
    ("./pytorch.sqsh", "squashfs file is not supported"),
    ("pytorch.sqsh", "squashfs file is not supported"),
    ("#nvidia/pytorch", "nothing before '#'"),
    ("nvcr..io#nvidia/pytorch", "registry 'nvcr..io'"),
    ("-bad.io#x", "registry '-bad.io'"),
    ("Ubuntu", "component 'Ubuntu'"),
    ("nvcr.io#NVIDIA/pytorch", "component 'NVIDIA'"),
    ("nvidia//pytorch", "component ''"),
    ("nvidia/pytorch/", "component ''"),
    ("ubuntu:", "tag ''"),
    ("ubuntu:-rc", "tag '-rc'"),
    ("ubuntu:" + "x" * 129, "tag 'xxx"),
    ("ubuntu@sha256:abc", "digest 'sha256:abc'"),
    ("ubuntu@md5:" + "ab" * 16, "digest 'md5:abab"),
    ("a_b.c/x", "registry 'a_b.c'"),
    ("nvcr.io#", "no image name"),
    ("bad user@ubuntu", "white space"),
    ("x.io#" + "a" * 300, "longer than 255"),
])
def test_malformed_references_are_refused_naming_the_value(text, named):
    with pytest.raises(ContainerRefError) as info:
        parse(text)
    assert named in str(info.value) and repr(text) in str(info.value)
    assert info.value.exit_code == 2


# no '.': a first component with one would be a registry (Docker's rule, tested above)
_comp = st.from_regex(r"[a-z0-9]{1,8}(?:(?:_|__|-+)[a-z0-9]{1,8}){0,2}", fullmatch=True)


@given(registry=st.sampled_from(["", "nvcr.io#", "nvcr.io/", "localhost:5000/", "docker://"]),
       path=st.lists(_comp, min_size=1, max_size=4),
       tag=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
                                              fullmatch=True)))
def test_any_well_formed_reference_round_trips(registry, path, tag):
    text = registry + "/".join(path) + (f":{tag}" if tag else "")
    ref = parse(text)
    assert ref.repository.endswith("/".join(path)) and ref.tag == (tag or "latest")
    assert parse(str(ref)) == ref
