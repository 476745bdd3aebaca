"""The single-node Kubernetes of scripts/k8s is what the Kubernetes runtime needs (issue 7).

Real cluster, real registry (scripts/infra's htpasswd registry on 127.0.0.1:5001), real QEMU:
  * the node is Ready and authorization is RBAC (an unbound ServiceAccount is Forbidden);
  * a batch/v1 Job running the builder image builds an arm64 image with buildah (a RUN step
    under QEMU), pushes it with credentials from a mounted dockerconfigjson Secret, and hands
    the pushed digest back through its termination message, which matches the registry;
  * the builder image's git fetches exactly one sha over HTTP with a token from a Secret.
Nothing sleeps to synchronise: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.k8s_cluster import (
    Cluster,
    cluster,
    create_namespace,
    delete_namespace,
    expect,
    poll,
    service_account_token,
)
from tests.standins.git_http import GitHTTPServer, make_repo, token_auth_env

# The first test may build the cluster from nothing (about 5 min on 2 cores); every wait
# inside a test has its own, much shorter, deadline.
pytestmark = pytest.mark.timeout(1800)

JOB_TIMEOUT = 300  # an arm64 buildah build under QEMU on a busy 2-core machine
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(scope="module")
def k8s() -> Cluster:
    return cluster()


@pytest.fixture
def namespace(k8s: Cluster) -> Iterator[str]:
    name = create_namespace(k8s)
    yield name
    delete_namespace(k8s, name)


# --------------------------------------------------------------------------- helpers


def builder_job(k8s: Cluster, name: str, script: str, **pod: Any) -> dict[str, Any]:
    """A one-shot Job running ``script`` with ``sh -c`` in the builder image, privileged."""
    container = {
        "name": "build",
        "image": k8s.builder_image,
        "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", script],
        "securityContext": {"privileged": True},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }
    container.update(pod.pop("container", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "hostNetwork": True,
                    "dnsPolicy": "Default",
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 5,
                    "containers": [container],
                    **pod,
                },
            },
        },
    }


def run_job(api: httpx.Client, namespace: str, job: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Create ``job``, wait until it is Complete; return its pod and the pod's log."""
    name = job["metadata"]["name"]
    expect(api.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", json=job), 201)

    def finished() -> str | None:
        status = expect(api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"))["status"]
        for cond in status.get("conditions", []):
            if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
                return cond["type"]
        return None

    outcome = poll(finished, JOB_TIMEOUT, f"Job {namespace}/{name} to finish", interval=0.25)
    pods = expect(api.get(f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": f"job-name={name}"}))
    assert len(pods["items"]) == 1, pods["items"]
    pod = pods["items"][0]
    log = api.get(f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/log")
    assert log.status_code == 200, f"pod log (through the kubelet) -> {log.status_code}: {log.text}"
    if outcome != "Complete":
        pytest.fail(f"Job {name} {outcome}:\n{json.dumps(pod['status'], indent=1)[-2000:]}\n--- log:\n{log.text[-3000:]}")
    return pod, log.text


def termination_message(pod: dict[str, Any]) -> str:
    (status,) = pod["status"]["containerStatuses"]
    terminated = status["state"]["terminated"]
    assert terminated["exitCode"] == 0, terminated
    return terminated.get("message", "")


def dockerconfigjson_secret(name: str, registry: str, username: str, password: str) -> dict[str, Any]:
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    config = json.dumps({"auths": {registry: {"auth": auth}}})
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
    }


# --------------------------------------------------------------------------- tests


def test_node_is_ready_and_rbac_forbids_an_unbound_service_account(k8s: Cluster, namespace: str) -> None:
    with k8s.client() as api:
        node = expect(api.get(f"/api/v1/nodes/{k8s.node}"))
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert ready["Ready"] == "True", node["status"]["conditions"]
        assert node["status"]["nodeInfo"]["kubeletVersion"] == k8s.version
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
        assert expect(api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs"))["items"] == []

    token = service_account_token(k8s, namespace, "no-rights")
    jobs_url = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    with k8s.client(token) as as_sa:
        denied = as_sa.get(jobs_url)
        assert denied.status_code == 403, denied.text
        assert denied.json()["reason"] == "Forbidden"
        # authenticated (the token is valid) but not authorized
        assert f"system:serviceaccount:{namespace}:no-rights" in denied.json()["message"]

    with httpx.Client(base_url=k8s.server, verify=False) as anonymous:  # noqa: S501 - status only
        assert anonymous.get(jobs_url).status_code in (401, 403)
        assert anonymous.get(jobs_url, headers={"Authorization": "Bearer wrong"}).status_code == 401

    # the same ServiceAccount with a RoleBinding to a Role that may list jobs: allowed
    with k8s.client() as api:
        expect(api.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles", json={
            "metadata": {"name": "jobs-reader"},
            "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list"]}],
        }), 201)
        expect(api.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings", json={
            "metadata": {"name": "no-rights-reads-jobs"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "jobs-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "no-rights", "namespace": namespace}],
        }), 201)
    with k8s.client(token) as as_sa:
        poll(lambda: as_sa.get(jobs_url).status_code == 200, 30, "the RoleBinding to take effect")
        assert as_sa.post(jobs_url, json={}).status_code == 403  # list, not create


def test_job_builds_arm64_with_buildah_and_pushes_to_the_htpasswd_registry(k8s: Cluster, namespace: str) -> None:
    registry = k8s.env["IMAGEBOT_TEST_REGISTRY"]
    user = k8s.env["IMAGEBOT_TEST_REGISTRY_USERNAME"]
    password = k8s.env["IMAGEBOT_TEST_REGISTRY_PASSWORD"]
    base = k8s.env["IMAGEBOT_TEST_BASE_IMAGE"]
    repo = "imagebot-k8s-test/arm64"
    tag = uuid.uuid4().hex[:12]
    image = f"{registry}/{repo}:{tag}"
    script = f"""set -eu
mkdir -p /workspace/ctx && cd /workspace/ctx
printf 'FROM {base}\\nRUN uname -m > /arch\\n' > Dockerfile
buildah --version
buildah bud --isolation chroot --storage-driver vfs --platform linux/arm64 \\
    --authfile /auth/.dockerconfigjson --tls-verify=false -t {image} .
buildah push --storage-driver vfs --authfile /auth/.dockerconfigjson --tls-verify=false \\
    --digestfile /dev/termination-log {image}
"""
    job = builder_job(
        k8s, "build-arm64", script,
        container={"volumeMounts": [{"name": "auth", "mountPath": "/auth", "readOnly": True}]},
        volumes=[{"name": "auth", "secret": {"secretName": "registry-auth"}}],
    )
    with k8s.client() as api:
        expect(api.post(f"/api/v1/namespaces/{namespace}/secrets",
                        json=dockerconfigjson_secret("registry-auth", registry, user, password)), 201)
        pod, log = run_job(api, namespace, job)

    digest = termination_message(pod).strip()
    assert digest.startswith("sha256:") and len(digest) == 71, digest
    assert "buildah version 1." in log
    assert "RUN uname -m > /arch" in log

    with httpx.Client(base_url=f"http://{registry}", auth=(user, password), timeout=30) as reg:
        accept = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}
        by_tag = reg.get(f"/v2/{repo}/manifests/{tag}", headers=accept)
        assert by_tag.status_code == 200, by_tag.text
        assert by_tag.headers["Docker-Content-Digest"] == digest
        assert "sha256:" + hashlib.sha256(by_tag.content).hexdigest() == digest
        assert reg.get(f"/v2/{repo}/manifests/{digest}", headers=accept).status_code == 200
        manifest = by_tag.json()
        assert by_tag.headers["Content-Type"] in (OCI_MANIFEST, DOCKER_MANIFEST)

        config = reg.get(f"/v2/{repo}/blobs/{manifest['config']['digest']}").json()
        assert (config["os"], config["architecture"]) == ("linux", "arm64")
        # the RUN step ran as arm64 (under QEMU): its layer holds /arch = aarch64
        layer = reg.get(f"/v2/{repo}/blobs/{manifest['layers'][-1]['digest']}")
        assert layer.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.content))) as tar:
            member = tar.extractfile("arch")
            assert member is not None and member.read() == b"aarch64\n"


def test_builder_image_git_fetches_one_sha_over_http_with_a_token(
    k8s: Cluster, namespace: str, tmp_path: Path,
) -> None:
    token = "ghs_K8sBuilderFetchToken000000000000"
    repo = make_repo(tmp_path / "srv", "acme/app", {"README.md": "v1\n"})
    built = repo.head()
    tip = repo.commit({"README.md": "v2\n"}, "the branch moves on")
    with GitHTTPServer(tmp_path / "srv", username="x-access-token", password=token) as server:
        url = server.repo_url("acme/app")
        git_env = {**token_auth_env(token, url=server.url), "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
        script = f"""set -eu
git --version
git init -q /workspace/src && cd /workspace/src
git fetch -q --depth 1 {url} {built}
git checkout -q FETCH_HEAD
cat README.md
git rev-parse HEAD > /dev/termination-log
"""
        job = builder_job(
            k8s, "fetch", script,
            container={"envFrom": [{"secretRef": {"name": "git-auth"}}]},
        )
        with k8s.client() as api:
            expect(api.post(f"/api/v1/namespaces/{namespace}/secrets", json={
                "metadata": {"name": "git-auth"}, "stringData": git_env,
            }), 201)
            pod, log = run_job(api, namespace, job)

        assert termination_message(pod).strip() == built != tip
        assert "v1\n" in log and token not in log
        requests = server.requests_for("acme/app")
        assert requests and all(r.auth_present and r.username == "x-access-token" for r in requests)
        assert all(r.status == 200 for r in requests)
        assert [r.wants for r in requests if r.wants][-1] == (built,)
