"""Pure parts of the Docker runtime (the engine itself is exercised by the pipeline tests)."""

from bot.runtimes.docker import _lines, platform_mixup


def test_platform_mixup_is_recognised():
    # the classic builder's words, as the shared notes recorded them on this engine
    assert platform_mixup("image with reference 127.0.0.1:5001/base/busybox:latest was found but does "
                          "not match the specified platform: wanted linux/arm64, actual: linux/amd64")
    assert not platform_mixup("The command '/bin/sh -c exit 3' returned a non-zero code: 3")


def test_log_lines_from_stream_items():
    items = [
        {"stream": "Step 1/2 : FROM base\n ---> abc\n"},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "x"},
        {"status": "Downloading", "progress": "[==>   ]", "id": "x"},  # progress bars are noise
        {"aux": {"ID": "sha256:1"}},
        {"stream": "\n"},
    ]
    assert _lines(items) == ["Step 1/2 : FROM base", " ---> abc", "Pulling fs layer"]


def test_from_watch_sees_the_first_from_resolved():
    from bot.runtimes.docker import FromWatch

    watch = FromWatch()
    watch.feed(["Step 1/4 : FROM 127.0.0.1:5001/base/busybox:latest", "latest: Pulling from base/busybox"])
    assert not watch.resolved.is_set()  # still pulling: the next platform must wait
    watch.feed(["Digest: sha256:abc", " ---> 0123456789ab", "Step 2/4 : ARG TARGETARCH"])
    assert watch.resolved.is_set()


def test_from_watch_ignores_arrows_before_the_first_from():
    from bot.runtimes.docker import FromWatch

    watch = FromWatch()
    watch.feed([" ---> stray", "Step 2/3 : FROM later"])
    assert not watch.resolved.is_set()


def test_dockerfile_bases():
    from bot.runtimes.docker import _split_ref, dockerfile_bases

    text = """
    # syntax=docker/dockerfile:1
    ARG BASE=alpine
    FROM --platform=$BUILDPLATFORM golang:1.22 AS build
    RUN go build
    from registry.local:5000/base/busybox:latest as runtime
    FROM build AS test
    FROM ${BASE}
    FROM scratch
    FROM ghcr.io/acme/tool@sha256:abc
    FROM golang:1.22
    """
    assert dockerfile_bases(text) == [
        "golang:1.22", "registry.local:5000/base/busybox:latest", "ghcr.io/acme/tool@sha256:abc"]
    assert _split_ref("registry.local:5000/base/busybox") == ("registry.local:5000/base/busybox", "latest")
    assert _split_ref("registry.local:5000/base/busybox:1.2") == ("registry.local:5000/base/busybox", "1.2")
    assert _split_ref("ghcr.io/acme/tool@sha256:abc") == ("ghcr.io/acme/tool@sha256:abc", None)
    assert _split_ref("busybox") == ("busybox", "latest")
