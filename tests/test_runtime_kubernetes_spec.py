"""The Kubernetes runtime's pure parts: the Job it asks for, and what it reads off a pod."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from bot.pipeline.credentials import Credentials
from bot.runtimes import BuildError, BuildJob, Source
from bot.runtimes.kubernetes import (
    FETCH_SCRIPT,
    REGISTRY_KEY,
    KubernetesRuntime,
    Termination,
    dockerconfigjson,
    job_name,
    limit_failure,
    never_heals,
    raise_if_failed,
    split_auth_note,
    stuck_reason,
    terminations,
    unschedulable,
)
from tests.support import make_settings

TOKEN = "ghs_TheForgeTokenNeverInASpec000000000"
SECRET_ARG = "build-arg-secret-value-42"
BUILD_SECRET = "operator-build-secret-value-7"


def job(push=True, pull=True, platform="linux/arm64", trusted=True, secrets=None) -> BuildJob:
    root = Path("/tmp/checkout")
    return BuildJob(
        context=root / "app", dockerfile=root / "app" / "Dockerfile", platform=platform, tag=None,
        build_args={"TOKEN": SECRET_ARG, "TARGETARCH": "arm64"}, labels={"org.opencontainers.image.revision": "a" * 40},
        target="runtime",
        pull_credentials={"registry.example": Credentials("bot", SecretStr("pw"))} if pull else None,
        image="registry.example/acme/app:sha-aaaaaaa-linux-arm64",
        source=Source(root, "https://github.com/acme/app.git", "a" * 40, "refs/heads/main", SecretStr(TOKEN),
                      "x-access-token"),
        build_id=12, push=push, trusted=trusted,
        secrets={"NPM_TOKEN": BUILD_SECRET} if secrets is None else secrets,
    )


def fork() -> BuildJob:
    """A fork's pull request, as the pipeline makes it: no push, no credentials, no secrets
    (the runtime must not rely on that: it is given the token and secrets here anyway)."""
    return job(push=False, pull=False, trusted=False)


def runtime(**settings) -> KubernetesRuntime:
    return KubernetesRuntime(make_settings(runtime="kubernetes", **settings))


def test_the_job_carries_no_secret_and_runs_build_then_push():
    rt = runtime(k8s_node_selectors={"linux/arm64": {"kubernetes.io/arch": "arm64"}},
                 k8s_resources={"requests": {"cpu": "1"}}, k8s_service_account="builder")
    manifest = rt.job_manifest(job_name(12, "linux/arm64"), job())
    text = json.dumps(manifest)
    assert TOKEN not in text and SECRET_ARG not in text and BUILD_SECRET not in text
    assert "pw" not in json.dumps(manifest["spec"]["template"]["spec"]["containers"][0]["env"])
    assert manifest["metadata"]["name"] == "imagebot-12-linux-arm64"
    pod = manifest["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch", "build"]
    assert [c["name"] for c in pod["containers"]] == ["push"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "kubernetes.io/arch": "arm64"}
    assert pod["serviceAccountName"] == "builder" and pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "OnFailure"
    env = {e["name"]: e for e in pod["initContainers"][1]["env"]}
    assert env["IMAGEBOT_CONTEXT"]["value"] == "app" and env["IMAGEBOT_DOCKERFILE"]["value"] == "app/Dockerfile"
    push = {e["name"]: e for e in pod["containers"][0]["env"]}
    # the build's own Secret ("auths" empty there for an anonymous registry)
    assert push["REGISTRY_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": "imagebot-12-linux-arm64", "key": REGISTRY_KEY}


def test_an_untrusted_build_never_sees_the_registry_secret():
    for untrusted in (job(push=False, pull=False), fork()):
        assert REGISTRY_KEY not in json.dumps(runtime().job_manifest("j", untrusted))
        assert REGISTRY_KEY not in runtime().job_secret("j", untrusted, {"r.example": Credentials("u", SecretStr("p"))})[
            "data"]


def registry_of(manifest: dict, secrets: dict[str, dict]) -> dict[str, set[str]]:
    """Per step, the registry hosts whose credentials it can read: the Secret keys its
    variables and mounted volumes name, looked up in ``secrets`` (name -> Secret)."""
    pod = manifest["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    seen: dict[str, set[str]] = {}
    for container in pod["initContainers"] + pod["containers"]:
        refs = [(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                for e in container["env"] if "valueFrom" in e]
        for mount in container["volumeMounts"]:
            if mount["name"] in volumes:
                volume = volumes[mount["name"]]
                refs += [(volume["secretName"], i["key"]) for i in volume.get("items", [])]
        hosts = set()
        for name, key in refs:
            value = base64.b64decode(secrets.get(name, {}).get("data", {}).get(key, "")).decode()
            if value.startswith("{"):
                hosts |= set(json.loads(value)["auths"])
        seen[container["name"]] = hosts
    return seen


def test_each_build_reads_only_its_own_registry_credentials_from_its_own_secret():
    """One Secret for all builds let build A read build B's credentials for another host;
    each build's pod now reads only its own Secret, holding only its own hosts."""
    rt = runtime()
    a, b = job(), job(platform="linux/amd64")
    b = BuildJob(**{**b.__dict__, "image": "other.example/acme/tool:sha-b-linux-amd64", "build_id": 13,
                    "pull_credentials": {"other.example": Credentials("bot-b", SecretStr("pw-b"))}})
    names = {j.build_id: job_name(j.build_id, j.platform) for j in (a, b)}
    secrets = {names[j.build_id]: rt.job_secret(names[j.build_id], j, j.pull_credentials) for j in (a, b)}
    assert registry_of(rt.job_manifest(names[12], a), secrets) == {
        "fetch": set(), "build": {"registry.example"}, "push": {"registry.example"}}
    assert registry_of(rt.job_manifest(names[13], b), secrets) == {
        "fetch": set(), "build": {"other.example"}, "push": {"other.example"}}
    assert "pw-b" not in json.dumps(secrets[names[12]]) and "pw-b" not in base64.b64decode(
        secrets[names[12]]["data"][REGISTRY_KEY]).decode()


def test_a_trusted_build_runs_unprivileged_unless_the_operator_opts_in():
    """Privileged by default let any repository's Dockerfile leave the chroot and read the
    node (other builds' Secrets); now buildah runs in its own user namespace by default."""
    for step in ("build", "push"):
        context = containers(runtime().job_manifest("n", job()))[step]["securityContext"]
        assert context == {"privileged": False, "allowPrivilegeEscalation": False,
                           "capabilities": {"drop": ["ALL"], "add": ["SETUID", "SETGID", "SETFCAP"]}}, step
        assert containers(runtime(k8s_privileged=True).job_manifest("n", job()))[step]["securityContext"] == {
            "privileged": True}, step
    env = {e["name"]: e.get("value") for e in containers(runtime().job_manifest("n", job()))["build"]["env"]}
    assert env["IMAGEBOT_USERNS"] == "0:100000:65536"
    privileged = containers(runtime(k8s_privileged=True).job_manifest("n", job()))["build"]["env"]
    assert "IMAGEBOT_USERNS" not in {e["name"] for e in privileged}


def test_every_fetch_gets_gits_isolation_and_only_a_trusted_one_the_token():
    for build in (job(), fork()):
        env = {e["name"]: e for e in containers(runtime().job_manifest("n", build))["fetch"]["env"]}
        stored = runtime().job_secret("n", build)["data"]

        def value(name: str) -> str:
            ref = env[name].get("valueFrom", {}).get("secretKeyRef")
            return base64.b64decode(stored[ref["key"]]).decode() if ref else env[name]["value"]

        assert value("GIT_CONFIG_NOSYSTEM") == "1" and value("GIT_ALLOW_PROTOCOL") == "https:http"
        headers = [value(k) for k in env if k.startswith("GIT_CONFIG_VALUE") and "Authorization" in value(k)]
        assert len(headers) == (1 if build.trusted else 0)


def test_the_fetch_script_ends_gits_options_before_the_url():
    fetches = [line.strip() for line in FETCH_SCRIPT.splitlines() if "git fetch" in line]
    assert len(fetches) == 2 and all(' -- "$IMAGEBOT_CLONE_URL" ' in line for line in fetches), fetches


def test_the_per_build_secret_holds_the_token_and_build_args():
    secret = runtime().job_secret("imagebot-12-linux-arm64", job())
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    header = next(v for k, v in data.items() if k.startswith("GIT_CONFIG_VALUE") and "Authorization" in v)
    assert base64.b64decode(header.split()[-1]).decode() == f"x-access-token:{TOKEN}"
    assert f"TOKEN={SECRET_ARG}" in data["build-args"].splitlines()


def test_registry_secret_content():
    config = json.loads(dockerconfigjson({"r.example": Credentials("u", SecretStr("p"))}))
    assert config == {"auths": {"r.example": {"auth": base64.b64encode(b"u:p").decode()}}}


def test_push_runs_are_read_off_the_container_status():
    status = {"name": "push", "restartCount": 2,
              "lastState": {"terminated": {"exitCode": 1, "message": "Error: unauthorized"}},
              "state": {"terminated": {"exitCode": 0, "message": "sha256:" + "1" * 64}}}
    assert [(t.attempt, t.exit_code) for t in terminations(status)] == [(2, 1), (3, 0)]
    assert terminations({"name": "push", "restartCount": 0, "state": {"running": {}}}) == []
    assert terminations(None) == []


def test_a_failed_run_names_the_credentials_it_had():
    used = hashlib.sha256(b"{}").hexdigest()
    assert split_auth_note(f"Error: x\ndenied: no\n\nimagebot-auth: {used}\n") == ("Error: x\ndenied: no", used)
    assert split_auth_note("Error: plain") == ("Error: plain", None)


def test_pods_that_will_never_run_say_why():
    pending = {"status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                          "message": "0/1 nodes are available: 1 node(s) didn't match node selector."}]}}
    assert "didn't match node selector" in unschedulable(pending)
    assert unschedulable({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}) is None
    stuck = {"status": {"initContainerStatuses": [
        {"name": "build", "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image not present"}}}]}}
    assert stuck_reason(stuck) == "build: ErrImageNeverPull: image not present"
    assert stuck_reason({"status": {}}) is None
    assert never_heals(stuck_reason(stuck))
    lagging = {"status": {"containerStatuses": [{"name": "push", "state": {"waiting": {
        "reason": "CreateContainerConfigError",
        "message": "failed to sync secret cache: timed out waiting for the condition"}}}]}}
    assert not never_heals(stuck_reason(lagging))  # the kubelet tries again by itself
    assert never_heals("push: CreateContainerConfigError: secret \"imagebot-12-linux-arm64\" not found")


def without_scripts(manifest: dict) -> str:
    """The Job as JSON, without the containers' scripts (which name every variable they read)."""
    pod = manifest["spec"]["template"]["spec"]
    return json.dumps([pod["volumes"], [{k: v for k, v in c.items() if k != "command"}
                                        for c in pod["initContainers"] + pod["containers"]]])


def test_the_layer_cache_is_off_by_default():
    text = without_scripts(runtime().job_manifest("j", job()))
    assert "hostPath" not in text and "IMAGEBOT_LAYERS" not in text and "IMAGEBOT_STORAGE" not in text


def test_the_layer_cache_is_per_repository_and_platform_and_only_for_trusted_builds():
    rt = runtime(k8s_layer_cache_dir="/var/lib/imagebot/layer-cache/")
    pod = rt.job_manifest("j", job())["spec"]["template"]["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")["hostPath"]
    assert cache["type"] == "DirectoryOrCreate"
    assert cache["path"].startswith("/var/lib/imagebot/layer-cache/") and cache["path"].endswith("-linux-arm64")
    for container in (pod["initContainers"][1], pod["containers"][0]):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (env["IMAGEBOT_STORAGE"], env["IMAGEBOT_LAYERS"]) == ("/cache", "true")
        assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
    # another platform, another repository: another directory; another tag or image name of the
    # same repository: the same one (the key is the repository, never an image name it chose)
    other_platform = BuildJob(**{**job().__dict__, "platform": "linux/amd64",
                                 "image": "registry.example/acme/app:sha-aaaaaaa-linux-amd64"})
    other_repo = BuildJob(**{**job().__dict__, "source": Source(
        Path("/tmp/checkout"), "https://github.com/acme/app2.git", "a" * 40, "refs/heads/main", None, "x")})
    other_tag = BuildJob(**{**job().__dict__, "image": "registry.example/otherteam/app:sha-bbbbbbb-linux-arm64"})
    paths = {rt.layer_cache_path(j) for j in (job(), other_platform, other_repo)}
    assert len(paths) == 3 and rt.layer_cache_path(other_tag) == rt.layer_cache_path(job())
    # a fork's build (it never pushes) neither reads nor writes it
    untrusted = without_scripts(rt.job_manifest("j", fork()))
    assert "hostPath" not in untrusted and "IMAGEBOT_STORAGE" not in untrusted and "/cache" not in untrusted
    assert rt.layer_cache_path(fork()) is None


def test_the_layer_cache_dir_must_be_absolute():
    from bot.settings import SettingsError

    with pytest.raises((SettingsError, ValueError)):
        make_settings(runtime="kubernetes", k8s_layer_cache_dir="relative/dir")
    assert make_settings(runtime="kubernetes", k8s_layer_cache_dir="").k8s_layer_cache_dir is None


# -- who sees what (issue 13, item 5) ------------------------------------------------------------


def containers(manifest: dict) -> dict[str, dict]:
    pod = manifest["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["initContainers"] + pod["containers"]}


def secret_refs(container: dict) -> set[str]:
    """The per-build or registry Secret keys a container's environment reads."""
    refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in container.get("env", []) if "valueFrom" in e}
    return refs | {"*" for _ in container.get("envFrom", [])}


def test_a_fork_pod_has_no_token_no_registry_auth_no_secret_and_nothing_privileged():
    rt = runtime(k8s_privileged=True, k8s_host_network=True)
    manifest = rt.job_manifest("imagebot-12-linux-arm64", fork())
    secret = rt.job_secret("imagebot-12-linux-arm64", fork())
    stored = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert not [k for k in stored if k.startswith("GIT_")] and TOKEN not in json.dumps(stored)
    assert not [k for k in stored if k.startswith("secret.")] and BUILD_SECRET not in json.dumps(stored)
    text = json.dumps(manifest)
    assert REGISTRY_KEY not in text and "REGISTRY_AUTH" not in without_scripts(manifest)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is False and "dnsPolicy" not in pod and pod["automountServiceAccountToken"] is False
    for name, container in containers(manifest).items():
        assert secret_refs(container) == set(), name
        context = container["securityContext"]
        assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False, (name, context)
        assert context["capabilities"]["drop"] == ["ALL"]
        # buildah's own user namespace needs these three (SETFCAP: to map root); git nothing
        assert context["capabilities"].get("add", []) == (["SETUID", "SETGID", "SETFCAP"] if name == "build" else [])
    env = {e["name"]: e.get("value") for e in containers(manifest)["build"]["env"]}
    assert env["IMAGEBOT_USERNS"] == "0:100000:65536"  # a RUN's root is no root of the node
    job_volume = next(v for v in pod["volumes"] if v["name"] == "job")
    assert [i["key"] for i in job_volume["secret"]["items"]] == ["build-args", "labels"]


def test_only_the_fetch_step_sees_the_token():
    rt = runtime()
    manifest = rt.job_manifest("imagebot-12-linux-arm64", job())
    stored = rt.job_secret("imagebot-12-linux-arm64", job())["data"]
    git_keys = {k for k in stored if k.startswith("GIT_")}
    assert git_keys  # a trusted build fetches with the token ...
    by_name = containers(manifest)
    assert secret_refs(by_name["fetch"]) == git_keys  # ... in the fetch step only
    assert not secret_refs(by_name["build"]) & git_keys and not secret_refs(by_name["push"]) & git_keys
    pod = manifest["spec"]["template"]["spec"]
    mounted = {m["name"] for m in by_name["fetch"]["volumeMounts"]}
    assert mounted == {"work"}  # and no Secret volume
    fetch_context = by_name["fetch"]["securityContext"]  # git needs no privilege, even for a trusted build
    assert fetch_context["privileged"] is False and fetch_context["capabilities"] == {"drop": ["ALL"]}
    job_volume = next(v for v in pod["volumes"] if v["name"] == "job")
    assert not {i["key"] for i in job_volume["secret"]["items"]} & git_keys


def test_a_trusted_build_step_has_registry_auth_only_as_an_authfile_and_push_creds_only_in_push():
    manifest = runtime().job_manifest("imagebot-12-linux-arm64", job())
    by_name = containers(manifest)
    build = by_name["build"]
    assert secret_refs(build) == set() and "envFrom" not in build  # no credential in what a RUN inherits
    env = {e["name"]: e.get("value") for e in build["env"]}
    authfile = env["IMAGEBOT_AUTHFILE"]
    mount = next(m for m in build["volumeMounts"] if authfile.startswith(m["mountPath"] + "/"))
    volume = next(v for v in manifest["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "imagebot-12-linux-arm64" and mount["readOnly"] is True
    assert volume["secret"]["items"] == [{"key": REGISTRY_KEY, "path": authfile.rsplit("/", 1)[1]}]
    assert "--authfile" in build["command"][2]
    assert secret_refs(by_name["push"]) == {REGISTRY_KEY}
    assert not any(m["name"] == mount["name"] for m in by_name["push"]["volumeMounts"] + by_name["fetch"]["volumeMounts"])


def test_operator_build_secrets_are_files_of_the_build_step_and_never_a_forks():
    rt = runtime()
    stored = rt.job_secret("n", job())["data"]
    assert base64.b64decode(stored["secret.NPM_TOKEN"]).decode() == BUILD_SECRET
    manifest = rt.job_manifest("n", job())
    job_volume = next(v for v in manifest["spec"]["template"]["spec"]["volumes"] if v["name"] == "job")
    assert {"key": "secret.NPM_TOKEN", "path": "secrets/NPM_TOKEN"} in job_volume["secret"]["items"]
    by_name = containers(manifest)
    assert [n for n, c in by_name.items() if any(m["name"] == "job" for m in c["volumeMounts"])] == ["build"]
    assert '--secret "id=${secret##*/},src=$secret"' in by_name["build"]["command"][2]
    with pytest.raises(BuildError) as bad:
        rt.job_secret("n", job(secrets={"../x": "v"}))
    assert bad.value.kind == "config"


def test_fork_builds_can_be_turned_off_and_then_fail_at_once_saying_why():
    rt = runtime(k8s_fork_builds=False)
    with pytest.raises(BuildError) as off:
        asyncio.run(rt.build(fork(), _discard))
    assert off.value.kind == "config" and "IMAGEBOT_K8S_FORK_BUILDS" in off.value.message
    assert rt.job_manifest("n", job())  # trusted builds are not affected


async def _discard(lines: list[str]) -> None:
    pass


# -- deadlines and limits (issue 13, items 1 and 3) -------------------------------------------------


def test_the_job_deadline_comes_from_the_build_pull_push_timeouts_capped_by_the_build_deadline():
    rt = runtime(fetch_timeout_seconds=10, pull_timeout_seconds=20, build_timeout_seconds=30,
                 push_timeout_seconds=40, push_retries=1, build_deadline_seconds=10_000)
    assert rt.job_manifest("n", job())["spec"]["activeDeadlineSeconds"] == 10 + 2 * (20 + 30) + 2 * 40
    assert rt.job_manifest("n", fork())["spec"]["activeDeadlineSeconds"] == 10 + 2 * (20 + 30)
    capped = runtime(build_deadline_seconds=15.2).job_manifest("n", job())
    assert capped["spec"]["activeDeadlineSeconds"] == 16
    build = containers(capped)["build"]
    assert {"name": "IMAGEBOT_BUILD_TIMEOUT", "value": str(600 + 3600)} in build["env"]  # pulls and build, per run


def test_memory_and_cpus_are_every_containers_requests_and_limits():
    rt = runtime(build_memory_mb=1536, build_cpus=1.5)
    for container in containers(rt.job_manifest("n", job())).values():
        assert container["resources"] == {"requests": {"cpu": "1500m", "memory": "1536Mi"},
                                          "limits": {"cpu": "1500m", "memory": "1536Mi"}}
    smaller = runtime(build_memory_mb=1024, k8s_resources={"requests": {"memory": "256Mi"}}).resources()
    assert smaller == {"requests": {"cpu": "1000m", "memory": "256Mi"}, "limits": {"cpu": "1000m", "memory": "1024Mi"}}


def test_a_run_over_the_memory_limit_or_the_build_timeout_says_so():
    settings = make_settings(build_memory_mb=300)
    oom = limit_failure(Termination(1, 1, "STEP 2/2: RUN eat\nError: exit status 137", "OOMKilled"), settings)
    assert oom.kind == "build" and "out of memory" in oom.message and "300 MiB" in oom.message
    assert "STEP 2/2: RUN eat" in oom.message
    late = limit_failure(Termination(1, 143, "STEP 2/2: RUN sleep 100\nimagebot-timeout: 20\n", "Error"), settings)
    assert late.kind == "timeout" and "20 s" in late.message and "RUN sleep 100" in late.message
    assert limit_failure(Termination(1, 1, "STEP 2/2: RUN false\nError: exit status 1", "Error"), settings) is None


def test_a_job_past_its_deadline_is_a_timeout():
    job_status = {"spec": {"activeDeadlineSeconds": 20}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer"}]}}
    with pytest.raises(BuildError) as late:
        raise_if_failed("imagebot-1-linux-amd64", job_status)
    assert late.value.kind == "timeout" and "deadline of 20 s" in late.value.message
    job_status["status"]["conditions"][0]["reason"] = "BackoffLimitExceeded"
    with pytest.raises(BuildError) as failed:
        raise_if_failed("imagebot-1-linux-amd64", job_status)
    assert failed.value.kind == "runtime"
    raise_if_failed("n", {"spec": {}, "status": {}})  # running: nothing to say
