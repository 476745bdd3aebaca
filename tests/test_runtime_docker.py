"""Pure parts of the Docker runtime, and what its build raises on the real engine when a base
image is refused (the rest of the engine's work is exercised by the pipeline tests)."""

import asyncio

import pytest

from pydantic import SecretStr

from bot.pipeline.credentials import Credentials
from bot.runtimes import BuildError, BuildJob, PullError
from bot.runtimes.docker import DockerRuntime, LineJoiner, _lines, platform_mixup
from tests.test_pipeline_run import services  # noqa: F401 - fixture


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


def test_a_line_the_engine_sends_in_pieces_is_one_line_so_a_secret_in_it_is_masked():
    """The engine cuts stream text where the build wrote it: a secret printed in two writes
    arrives in two items, and masking (per line) would see neither half as the secret."""
    from bot.masking import Masker

    joiner = LineJoiner()
    pieces = [[{"stream": "Step 2/2 : RUN printf\n"}, {"stream": " ---> Running in 1\ntoken is sup3r-s"}],
              [{"stream": "ecret-value\nnext "}], [{"stream": "line"}]]
    lines = [line for items in pieces for line in joiner.feed(items)] + joiner.flush()
    assert lines == ["Step 2/2 : RUN printf", " ---> Running in 1", "token is sup3r-secret-value", "next line"]
    assert Masker(["sup3r-secret-value"]).mask(lines[2]) == "token is ***"


def test_a_line_without_end_does_not_grow_without_bound():
    joiner = LineJoiner()
    out = [line for _ in range(100) for line in joiner.feed([{"stream": "y" * 1000}])]
    assert out and max(map(len, out)) <= LineJoiner.MAX_PARTIAL + 1000 and len(joiner.flush()[0]) < LineJoiner.MAX_PARTIAL


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


def build_once(tmp_path, dockerfile: str, credentials: dict[str, Credentials] | None, trusted: bool = True):
    """One DockerRuntime build of ``dockerfile``; the image id, or the exception it raised."""
    (tmp_path / "ctx").mkdir(exist_ok=True)
    (tmp_path / "ctx" / "Dockerfile").write_text(dockerfile)
    job = BuildJob(context=tmp_path / "ctx", dockerfile=tmp_path / "ctx" / "Dockerfile", platform="linux/amd64",
                   tag=None, build_args={}, labels={}, pull_credentials=credentials, trusted=trusted)

    async def go():
        lines: list[str] = []

        async def log(batch: list[str]) -> None:
            lines.extend(batch)

        try:
            return await DockerRuntime().build(job, log)
        except (BuildError, PullError) as exc:
            return exc

    return asyncio.run(go())


def test_a_refused_base_image_is_a_pull_error_and_a_failing_run_a_build_error(tmp_path, services):  # noqa: F811
    from tests.standins.registry import HtpasswdRegistry
    from tests.test_pipeline_failures import seed_base

    with HtpasswdRegistry(tmp_path / "reg", users={"bot": "first"}) as registry:
        base = seed_base(services, registry.host, "bot", "first")
        first = {registry.host: Credentials("bot", SecretStr("first"))}
        registry.set_password("bot", "second")
        refused = build_once(tmp_path, f"FROM {base}\nRUN true\n", first)
        assert isinstance(refused, PullError), refused
        assert (refused.kind, refused.detail) == ("auth", "unauthorized: authentication required")

        second = {registry.host: Credentials("bot", SecretStr("second"))}
        failing = build_once(tmp_path, f"FROM {base}\nRUN echo 'unauthorized: denied' && exit 3\n", second)
        assert isinstance(failing, BuildError) and not isinstance(failing, PullError)
        assert (failing.kind, failing.message.endswith("returned a non-zero code: 3")) == ("build", True)

        assert build_once(tmp_path, f"FROM {base}\nRUN true\n", second).startswith("sha256:")
        registry.stop()
        down = build_once(tmp_path, f"FROM {base}\nRUN true\n", second)
        assert isinstance(down, PullError) and down.kind == "network" and "connection refused" in down.detail


@pytest.mark.timeout(60)  # before the fix: about 12 s for these 40k blank lines, an hour for 1 MB
def test_reading_from_lines_is_linear():
    import time

    from bot.runtimes.docker import dockerfile_bases

    text = "\n" * 40_000 + "FROM a:1 AS one\n" + " \t\n" * 40_000 + "from b\nFROM $X\n"
    started = time.monotonic()
    assert dockerfile_bases(text) == ["a:1", "b"]
    assert time.monotonic() - started < 0.5

    from bot.runtimes.docker import base_images

    assert base_images(text) is None  # a base named by an ARG: the build must pull
    assert base_images(text.replace("FROM $X\n", "")) == ["a:1", "b"]
    assert time.monotonic() - started < 1.0


@pytest.mark.timeout(60)  # before the fix: the FROM-pin regex took about 50 s for 40k blank lines
def test_a_dockerfile_of_blank_lines_builds_fast(tmp_path, services):  # noqa: F811
    import time

    started = time.monotonic()
    built = build_once(tmp_path, "\n" * 40_000 + "FROM scratch\nLABEL imagebot.test=blank-lines\n", None)
    assert isinstance(built, str) and built.startswith("sha256:"), built
    assert time.monotonic() - started < 15


def test_image_references_of_a_dockerfile():
    from bot.runtimes.docker import image_references

    text = """# escape=`
ARG BASE=reg.local/base:1
ARG TOOL
FROM --platform=$BUILDPLATFORM ${BASE} AS build
COPY --from=reg.local/tool@sha256:abc /t /t
FROM scratch
COPY --chown=1 `
     --from=build /out /out
COPY --from=0 /a /a
FROM $TOOL
"""
    assert image_references(text, {"TOOL": "reg.local/tool:2"}) == [
        "reg.local/base:1", "reg.local/tool@sha256:abc", "reg.local/tool:2"]
    assert image_references(text, {}) is None  # TOOL has no value: unknown before the build
    assert image_references("FROM a\\\n  AS b\nFROM b\n", {}) == ["a"]
