"""What an untrusted build cannot do to the bot or through it, against the real engine and
registries: hang a worker slot (deadlines), hold up other repositories' builds (a stalled
registry), exhaust memory (limits), or read images the engine holds for others (forks pull
anonymously, always)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid

import docker
import pytest

from bot import telemetry
from bot.models import BuildKind
from bot.runtimes import BuildError, BuildJob
from bot.runtimes.docker import DockerRuntime
from tests.standins.git_http import GitHTTPServer, make_repo
from tests.support import infra
from tests.test_pipeline_run import new_build, run, settings_for


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    return infra("docker", "registry", "dev-registry", "binfmt", "base-image", "dev-base-image")


def one_repo(tmp_path, files: dict[str, str]):
    repo = make_repo(tmp_path / "srv", "acme/app", files)
    return GitHTTPServer(tmp_path / "srv"), repo


def log_of(db, build, platform: str = "linux/amd64") -> list[str]:
    return [line["line"] for line in db.read_sync(lambda c: telemetry.log_of(c, build.id))
            if line["platform"] in (platform, None)]


def fork_build(db, server, repo):
    return new_build(db, server, repo, ref="refs/pull/9/head", kind=BuildKind.pull_request, pr_number=9, fork=True)


def build_repo(services, db, tmp_path, dockerfile: str, fork: bool = False, **settings):
    """Build a repository of one Dockerfile through the pipeline; (outcome, build)."""
    server, repo = one_repo(tmp_path, {"Dockerfile": dockerfile})
    with server:
        build = fork_build(db, server, repo) if fork else new_build(db, server, repo)
        return run(settings_for(services, db, **settings), db, build), build


# -- deadlines ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)  # before the fix: the build never ended
def test_a_build_past_its_timeout_fails_timeout_and_leaves_nothing_behind(services, database, tmp_path):
    marker = uuid.uuid4().hex
    outcome, build = build_repo(
        services, database, tmp_path, build_timeout_seconds=20, dockerfile=(
            f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\nRUN echo {marker} > /marker\nRUN sleep 100000 # {marker}\n"))
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "build", "timeout"), outcome
    assert "did not finish in 20s (IMAGEBOT_BUILD_TIMEOUT_SECONDS)" in outcome.error_message
    client = docker.from_env()
    assert not [c for c in client.api.containers(all=True) if marker in c.get("Command", "")]
    lines = log_of(database, build)
    step = next((i for i, line in enumerate(lines) if line.startswith("Step 2/") and "RUN echo" in line), None)
    assert step is not None, "\n".join(lines)
    committed = lines[step + 3].removeprefix(" ---> ")  # Running in, Removing intermediate container, the image
    assert len(committed) == 12, lines[step:step + 4]
    assert all(not image["Id"].removeprefix("sha256:").startswith(committed)
               for image in client.api.images(all=True))


@pytest.mark.timeout(60)
def test_the_whole_build_deadline_stops_any_step(services, database, tmp_path):
    server, repo = one_repo(tmp_path, {"Dockerfile": "FROM scratch\n"})
    with server:
        server.inject_hang(120, repo="acme/app")  # the forge stalls the fetch (its own timeout: 300 s)
        build = new_build(database, server, repo)
        outcome = run(settings_for(services, database, build_deadline_seconds=3), database, build)
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "fetch", "timeout"), outcome
    assert "did not finish in 3s (IMAGEBOT_BUILD_DEADLINE_SECONDS)" in outcome.error_message


class StalledRegistry:
    """A registry that accepts connections and never answers a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def job_for(tmp_path, name: str, dockerfile: str, **kwargs) -> BuildJob:
    context = tmp_path / name
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    return BuildJob(context=context, dockerfile=context / "Dockerfile", platform="linux/amd64", tag=None,
                    build_args={}, labels={}, **kwargs)


@pytest.mark.timeout(120)  # before the fix: the second build waited for the first one's pull forever
def test_a_stalled_registry_does_not_hold_up_another_repositorys_build(services, tmp_path):
    stalled = StalledRegistry()
    runtime = DockerRuntime(pull_timeout=15)
    stuck = job_for(tmp_path, "stuck", f"FROM {stalled.host}/team/base:1\nRUN true\n", trusted=True)
    other = job_for(tmp_path, "other", f"FROM {services['IMAGEBOT_DEV_BASE_IMAGE']}\nRUN echo {uuid.uuid4().hex}\n",
                    trusted=True)

    async def quiet(lines: list[str]) -> None:
        pass

    async def go():
        first = asyncio.create_task(runtime.build(stuck, quiet))
        await asyncio.to_thread(stalled.accepted.wait, 30)
        assert stalled.accepted.is_set(), "the first build never reached the stalled registry"
        image = await asyncio.wait_for(runtime.build(other, quiet), 60)
        assert not first.done(), "the stalled pull ended before the other build did"
        with pytest.raises(BuildError) as info:
            await first
        return image, info.value

    try:
        image, error = asyncio.run(go())
    finally:
        stalled.close()
    assert image.startswith("sha256:")
    assert error.kind == "timeout" and "IMAGEBOT_PULL_TIMEOUT_SECONDS" in error.message, error.message


# -- resource limits ----------------------------------------------------------------------------


def test_a_step_over_the_memory_limit_fails_the_build_as_out_of_memory(services, database, tmp_path):
    outcome, _ = build_repo(services, database, tmp_path, build_memory_mb=64, dockerfile=(
        f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\n"
        f"RUN echo {uuid.uuid4().hex} && dd if=/dev/zero of=/dev/null bs=256M count=1\n"))
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "build", "build"), outcome
    assert "returned a non-zero code: 137" in outcome.error_message
    assert "out of memory" in outcome.error_message and "64 MiB" in outcome.error_message


# -- forks --------------------------------------------------------------------------------------


def test_a_fork_build_gets_the_limits_and_the_untrusted_network(services, database, tmp_path):
    outcome, build = build_repo(
        services, database, tmp_path, fork=True, build_memory_mb=96, build_cpus=0.5, untrusted_network="none",
        dockerfile=(f"FROM {services['IMAGEBOT_DEV_BASE_IMAGE']}\n"
                    f"RUN echo {uuid.uuid4().hex} && cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us "
                    "/sys/fs/cgroup/memory/memory.limit_in_bytes && echo net: $(ls /sys/class/net)\n"))
    assert outcome.status.value == "succeeded", outcome
    lines = log_of(database, build)
    assert "50000" in lines and str(96 * 1024 * 1024) in lines
    assert "net: lo" in lines  # no interface but loopback: the fork reaches nothing


@pytest.fixture
def logged_in(services, tmp_path, monkeypatch):
    """The engine holds the private base image, and the bot's client is logged in to its
    registry (a DOCKER_CONFIG with its credentials, as `docker login` leaves one)."""
    registry = services["IMAGEBOT_TEST_REGISTRY"]
    auth = {"username": services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
            "password": services["IMAGEBOT_TEST_REGISTRY_PASSWORD"]}
    client = docker.from_env()
    repository, _, tag = services["IMAGEBOT_TEST_BASE_IMAGE"].rpartition(":")
    image = client.images.pull(repository, tag=tag, platform="linux/amd64", auth_config=auth)
    digest = next(d for d in image.attrs["RepoDigests"] if d.startswith(repository + "@"))
    config = tmp_path / "docker-config"
    config.mkdir()
    token = __import__("base64").b64encode(f"{auth['username']}:{auth['password']}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    return f"{repository}:{tag}", digest


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_a_fork_cannot_read_a_private_base_image_through_the_engine(services, database, tmp_path, logged_in, by):
    reference = logged_in[0] if by == "tag" else logged_in[1]
    outcome, _ = build_repo(services, database, tmp_path, f"FROM {reference}\nRUN echo {uuid.uuid4().hex}\n", fork=True)
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "build", "auth"), outcome
    assert "no basic auth credentials" in outcome.error_message or "unauthorized" in outcome.error_message


# -- parsing off the event loop -----------------------------------------------------------------


def test_the_repository_config_is_parsed_off_the_event_loop(services, database, tmp_path, monkeypatch):
    from bot.pipeline import config as configmod
    from tests.test_pipeline_config import merge_key_bomb

    threads: list[bool] = []
    parse = configmod.parse_config

    def watched(text: str, where: str = ".imagebot.yml"):
        try:
            asyncio.get_running_loop()
            threads.append(False)  # called on a thread that runs an event loop
        except RuntimeError:
            threads.append(True)
        return parse(text, where)

    monkeypatch.setattr(configmod, "parse_config", watched)
    server, repo = one_repo(tmp_path, {"Dockerfile": "FROM scratch\n", ".imagebot.yml": merge_key_bomb()})
    with server:
        build = new_build(database, server, repo)
        outcome = run(settings_for(services, database), database, build)
    assert (outcome.status.value, outcome.error_kind) == ("failed", "config"), outcome
    assert threads == [True]
