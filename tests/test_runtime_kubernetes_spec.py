"""The Kubernetes runtime's pure parts: the Job it asks for, and what it reads off a pod."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from pydantic import SecretStr

from bot.pipeline.credentials import Credentials
from bot.runtimes import BuildJob, Source
from bot.runtimes.kubernetes import (
    REGISTRY_SECRET,
    KubernetesRuntime,
    dockerconfigjson,
    job_name,
    never_heals,
    split_auth_note,
    stuck_reason,
    terminations,
    unschedulable,
)
from tests.support import make_settings

TOKEN = "ghs_TheForgeTokenNeverInASpec000000000"
SECRET_ARG = "build-arg-secret-value-42"


def job(push=True, pull=True, platform="linux/arm64") -> BuildJob:
    root = Path("/tmp/checkout")
    return BuildJob(
        context=root / "app", dockerfile=root / "app" / "Dockerfile", platform=platform, tag=None,
        build_args={"TOKEN": SECRET_ARG, "TARGETARCH": "arm64"}, labels={"org.opencontainers.image.revision": "a" * 40},
        target="runtime",
        pull_credentials={"registry.example": Credentials("bot", SecretStr("pw"))} if pull else None,
        image="registry.example/acme/app:sha-aaaaaaa-linux-arm64",
        source=Source(root, "https://github.com/acme/app.git", "a" * 40, "refs/heads/main", SecretStr(TOKEN),
                      "x-access-token"),
        build_id=12, push=push, secrets={"TOKEN": SECRET_ARG},
    )


def runtime(**settings) -> KubernetesRuntime:
    return KubernetesRuntime(make_settings(runtime="kubernetes", **settings))


def test_the_job_carries_no_secret_and_runs_build_then_push():
    rt = runtime(k8s_node_selectors={"linux/arm64": {"kubernetes.io/arch": "arm64"}},
                 k8s_resources={"requests": {"cpu": "1"}}, k8s_service_account="builder")
    manifest = rt.job_manifest(job_name(12, "linux/arm64"), job())
    text = json.dumps(manifest)
    assert TOKEN not in text and SECRET_ARG not in text and "pw" not in json.dumps(manifest["spec"]["template"]["spec"]["containers"][0]["env"])
    assert manifest["metadata"]["name"] == "imagebot-12-linux-arm64"
    pod = manifest["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["build"] and [c["name"] for c in pod["containers"]] == ["push"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "kubernetes.io/arch": "arm64"}
    assert pod["serviceAccountName"] == "builder" and pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "OnFailure" and pod["initContainers"][0]["resources"] == {"requests": {"cpu": "1"}}
    env = {e["name"]: e for e in pod["initContainers"][0]["env"]}
    assert env["IMAGEBOT_CONTEXT"]["value"] == "app" and env["IMAGEBOT_DOCKERFILE"]["value"] == "app/Dockerfile"
    assert env["REGISTRY_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": REGISTRY_SECRET, "key": ".dockerconfigjson",
                                                                  "optional": True}  # none: an anonymous registry
    assert pod["initContainers"][0]["envFrom"] == [{"secretRef": {"name": "imagebot-12-linux-arm64"}}]


def test_an_untrusted_build_never_sees_the_registry_secret():
    manifest = runtime().job_manifest("j", job(push=False, pull=False))
    assert REGISTRY_SECRET not in json.dumps(manifest)


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
    assert never_heals("push: CreateContainerConfigError: secret \"imagebot-registry\" not found")


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
    for container in (pod["initContainers"][0], pod["containers"][0]):
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
    untrusted = without_scripts(rt.job_manifest("j", job(push=False, pull=False)))
    assert "hostPath" not in untrusted and "IMAGEBOT_STORAGE" not in untrusted and "/cache" not in untrusted
    assert rt.layer_cache_path(job(push=False, pull=False)) is None


def test_the_layer_cache_dir_must_be_absolute():
    import pytest

    from bot.settings import SettingsError

    with pytest.raises((SettingsError, ValueError)):
        make_settings(runtime="kubernetes", k8s_layer_cache_dir="relative/dir")
    assert make_settings(runtime="kubernetes", k8s_layer_cache_dir="").k8s_layer_cache_dir is None
