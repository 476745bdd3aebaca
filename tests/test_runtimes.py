"""The runtimes' shared pure part: telling a base image the registry refused (or could not
serve) from any other build failure, with the push's classification. The texts are the
engines' own, recorded on this machine against distribution 2.8.2 (Docker's classic builder
28.2 and buildah 1.28)."""

from __future__ import annotations

import pytest

from bot.runtimes import PullError, is_step, last_step, pull_failure

DOCKER_FROM = "Step 1/4 : FROM 127.0.0.1:56793/base/busybox:latest"
BUILDAH_FROM = "STEP 1/2: FROM 127.0.0.1:60383/base/busybox:latest"
BUILDAH_STAGE_FROM = "[2/2] STEP 1/2: FROM 127.0.0.1:60383/base/busybox:latest"
BUILDAH_SOURCE = ("Error: creating build container: initializing source docker://127.0.0.1:60383/base/busybox:latest: "
                  "reading manifest latest in 127.0.0.1:60383/base/busybox: ")


@pytest.mark.parametrize(
    ("step", "error", "kind"),
    [
        # the Docker engine's classic builder
        (DOCKER_FROM, "unauthorized: authentication required", "auth"),
        (DOCKER_FROM, 'Head "http://127.0.0.1:56793/v2/base/busybox/manifests/latest": no basic auth credentials',
         "auth"),
        (DOCKER_FROM, "pull access denied for 127.0.0.1:52267/base/busybox, repository does not exist or may "
                      "require 'docker login': denied: requested access to the resource is denied", "denied"),
        (DOCKER_FROM, 'Get "http://127.0.0.1:56793/v2/": dial tcp 127.0.0.1:56793: connect: connection refused',
         "network"),
        (DOCKER_FROM, "manifest for 127.0.0.1:56793/base/nope:latest not found: manifest unknown: manifest unknown",
         "not_found"),
        ("Step 2/3 : FROM $B", "unauthorized: authentication required", "auth"),  # a base named by an ARG
        # buildah
        (BUILDAH_FROM, BUILDAH_SOURCE + "unauthorized: authentication required", "auth"),
        (BUILDAH_STAGE_FROM, BUILDAH_SOURCE + "unauthorized: authentication required", "auth"),
        (BUILDAH_FROM, BUILDAH_SOURCE + "errors:\ndenied: requested access to the resource is denied\n"
                                        "unauthorized: authentication required\n", "denied"),
        (BUILDAH_FROM, "Error: creating build container: initializing source docker://127.0.0.1:60383/base/busybox:"
                       "latest: pinging container registry 127.0.0.1:60383: Get \"http://127.0.0.1:60383/v2/\": "
                       "dial tcp 127.0.0.1:60383: connect: connection refused", "network"),
        (BUILDAH_FROM, BUILDAH_SOURCE + "received unexpected HTTP status: 503 Service Unavailable", "registry"),
    ],
)
def test_a_refused_base_image_is_a_classified_pull_failure(step, error, kind):
    failure = pull_failure(step, error)
    assert isinstance(failure, PullError) and failure.kind == kind
    assert "\n" not in failure.detail and failure.detail.split()[0] in error  # the registry's words, one line


@pytest.mark.parametrize(
    ("step", "error"),
    [
        # a failing RUN that prints registry words is the Dockerfile's failure
        ("Step 2/2 : RUN echo 'denied: unauthorized' && exit 3",
         "The command '/bin/sh -c echo 'denied: unauthorized' && exit 3' returned a non-zero code: 3"),
        ("STEP 2/2: RUN echo 'unauthorized' && exit 3",
         "Error: building at STEP \"RUN echo 'unauthorized' && exit 3\": exit status 3"),
        ("STEP 3/4: COPY missing /x", "Error: building at STEP \"COPY missing /x\": checking on sources: not found"),
        # a FROM failing for another reason than the registry: the engine mixed up platforms
        (DOCKER_FROM, "image with reference 127.0.0.1:5001/base/busybox:latest was found but does not match the "
                      "specified platform: wanted linux/arm64, actual: linux/amd64"),
        (DOCKER_FROM, "invalid reference format"),
        # a base image's ONBUILD command runs in the FROM step; its failure is a command's
        (DOCKER_FROM, "The command '/bin/sh -c timeout 5 make' returned a non-zero code: 124"),
        (BUILDAH_FROM, "Error: building at STEP \"RUN timeout 5 make\": exit status 124"),
        # no step seen at all (the build failed before its first one)
        (None, "unauthorized: authentication required"),
    ],
)
def test_other_build_failures_are_not_pull_failures(step, error):
    assert pull_failure(step, error) is None


def test_the_base_image_name_is_not_read_as_the_failure():
    step = "Step 1/2 : FROM registry.example/acme/denied-timeout-eof:1.0"
    error = "manifest for registry.example/acme/denied-timeout-eof:1.0 not found: manifest unknown: manifest unknown"
    failure = pull_failure(step, error)
    assert failure is not None and failure.kind == "not_found"
    assert "denied-timeout-eof" in failure.detail  # the detail keeps the whole message
    pinned = "registry.example/denied/app@sha256:" + "a" * 64
    error = (f"Error: creating build container: initializing source docker://{pinned}: pinging container registry "
             "registry.example: Get \"https://registry.example/v2/\": dial tcp: i/o timeout")
    assert pull_failure(f"STEP 1/2: FROM --platform=linux/arm64 {pinned}", error).kind == "network"


def test_secrets_never_reach_the_detail():
    failure = pull_failure(BUILDAH_FROM, BUILDAH_SOURCE + "unauthorized: hunter2 is wrong", secrets=("hunter2",))
    assert failure is not None and "hunter2" not in failure.detail and "***" in failure.detail


def test_the_last_step_of_a_log():
    lines = ["imagebot: fetched abc", BUILDAH_FROM, "Trying to pull 127.0.0.1:60383/base/busybox:latest...",
             "STEP 2/2: RUN uname -m", "x86_64"]
    assert last_step(lines[:3]) == BUILDAH_FROM
    assert last_step(lines) == "STEP 2/2: RUN uname -m"
    assert last_step(["no steps here"], previous=DOCKER_FROM) == DOCKER_FROM  # carried across batches
    assert last_step([]) is None
    assert is_step(" ---> Running in abc") is False and is_step(BUILDAH_STAGE_FROM)
