"""deploy/ as a user applies it: the bot's image built from deploy/Dockerfile runs as a pod of
deploy/kubernetes on the real single-node cluster of scripts/k8s, and a signed GitHub push
builds both platforms as Jobs, through in-cluster config with the bot's ServiceAccount.

The user's steps of deploy/README.md, in order: build the image (``scripts/k8s bot-image``:
deploy/Dockerfile on a local stand-in for python:3.11-slim, imported into the cluster's
containerd; skipped while the sources are unchanged), ``kubectl apply`` of namespace.yaml, the
Secret ``imagebot`` (a PostgreSQL URL of a fresh schema, a random webhook secret and registry
password, sent to the API server and nowhere else), then ``kubectl apply -k`` of a test overlay
of deploy/kubernetes. The overlay patches only what this cluster forces (see ``overlay``); every
other setting is the shipped one: probes, non-root, read-only root filesystem, resources, the
Role, the ConfigMap's defaults. Both registry set-ups of deploy/README.md's step 2 are run: the
shipped username with the Secret's password file, and a registry without credentials.

Then: the Deployment becomes Available (startup and readiness probes on /healthz pass), the
Service's endpoints name the pod, a real signed push webhook over HTTP (the repository served by
a real git HTTP server) becomes one Job per platform in ``imagebot-builds`` (seen by a watch as
admin: build pods under ``imagebot-build``, finished, deleted afterwards), the manifest list is
in the dev registry, and ``/api/builds/{id}`` says succeeded. No secret is in the bot's log.
Nothing sleeps to synchronise: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import create_engine, text

from tests.k8s_cluster import Cluster, cluster, deploy_namespaces_lock, expect, poll
from tests.standins.git_http import GitHTTPServer, make_repo, multiarch_fixture_files
from tests.support import free_port, github_payload, infra, sign

# The first run may build the cluster (about 5 min) and the bot's image (about 1 min).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "kubernetes"
BOT_NS, BUILD_NS = "imagebot", "imagebot-builds"  # deploy/kubernetes' own, as shipped
PLATFORMS = ["linux/amd64", "linux/arm64"]  # the ConfigMap's IMAGEBOT_PLATFORMS
AVAILABLE_WITHIN = 180  # image present: the pod starts in seconds, migrations take a few more
BUILD_WITHIN = 600  # buildah on vfs, arm64 under QEMU, on 2 cores


@pytest.fixture(scope="module")
def k8s() -> Cluster:
    return cluster()


@pytest.fixture(scope="module")
def services(k8s: Cluster) -> dict[str, str]:
    # the auth-less dev registry, with a two-platform base image of its own: the password
    # registry on :5001 is not used at all (other tests rotate its password)
    return infra("dev-registry", "dev-base-image", "postgres")


@pytest.fixture(scope="module")
def bot_image(k8s: Cluster) -> str:
    """deploy/Dockerfile built and imported into the cluster's containerd (cached by a hash
    of everything the build reads)."""
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "scripts" / "k8s"), "bot-image"], capture_output=True, text=True,
                            timeout=1200)
    if result.returncode != 0:
        pytest.fail(f"scripts/k8s bot-image failed:\n{result.stderr[-3000:]}")
    print(f"scripts/k8s bot-image: {time.monotonic() - started:.1f}s\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def database_url(services: dict[str, str]) -> Iterator[str]:
    """A PostgreSQL schema of this test's own (the bot migrates it at start)."""
    url = services["IMAGEBOT_TEST_POSTGRES_URL"]
    schema = f"e2e_deploy_{uuid.uuid4().hex[:8]}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


# -- the namespaces --------------------------------------------------------------------------


def namespace_phase(api: httpx.Client, name: str) -> str | None:
    response = api.get(f"/api/v1/namespaces/{name}")
    return None if response.status_code == 404 else expect(response)["status"].get("phase")


def delete_and_wait(k8s: Cluster, names: list[str], timeout: float = 180) -> None:
    """Delete the namespaces and wait until they are gone, their workloads first: the namespace
    controller, racing controllers that recreate pods, takes 25 to 90 s more otherwise. The
    Deployment goes with its pod (foreground: the bot gets its SIGTERM, a few seconds); Jobs a
    failed build left are orphaned, and build pods are killed at once (one whose containers
    never started holds on for its 30 s grace period)."""
    with k8s.client() as api:
        for name in names:
            expect(api.delete(f"/apis/apps/v1/namespaces/{name}/deployments",
                              params={"propagationPolicy": "Foreground"}), 200, 404)
            expect(api.delete(f"/apis/batch/v1/namespaces/{name}/jobs", params={"propagationPolicy": "Orphan"}),
                   200, 404)
        for name in names:
            def pods_gone(name: str = name) -> bool:
                pods = expect(api.get(f"/api/v1/namespaces/{name}/pods"), 200, 404).get("items", [])
                for pod in pods:  # the build pods (the bot's pod is its ReplicaSet's)
                    if not any(o["kind"] == "ReplicaSet" for o in pod["metadata"].get("ownerReferences", [])):
                        expect(api.delete(f"/api/v1/namespaces/{name}/pods/{pod['metadata']['name']}",
                                          params={"gracePeriodSeconds": "0"}), 200, 404)
                return not pods

            poll(pods_gone, timeout, f"the pods in namespace {name} to be gone", interval=0.5)
            expect(api.delete(f"/api/v1/namespaces/{name}"), 200, 202, 404)
        for name in names:
            poll(lambda name=name: namespace_phase(api, name) is None, timeout, f"namespace {name} to be gone",
                 interval=0.5)


@pytest.fixture
def deploy_namespaces(k8s: Cluster) -> Iterator[None]:
    """deploy/kubernetes' two namespaces are this test's for its duration (under the lock
    test_deploy.py takes too); whatever an earlier, interrupted run left in them goes first,
    and they are deleted, and waited for, afterwards."""
    with deploy_namespaces_lock(k8s):
        delete_and_wait(k8s, [BOT_NS, BUILD_NS])
        try:
            yield
        finally:
            delete_and_wait(k8s, [BOT_NS, BUILD_NS])


# -- the overlay -----------------------------------------------------------------------------


def overlay(directory: Path, *, image: str, port: int, registry: str, credentials: bool, builder_image: str,
            api_server: str, github_url: str) -> Path:
    """A kustomize overlay of deploy/kubernetes (kustomize of kubectl 1.20: ``bases``,
    ``patchesStrategicMerge``, ``patchesJson6902``) with what this cluster forces, and no more."""
    host, api_port = httpx.URL(api_server).host, httpx.URL(api_server).port
    directory.mkdir(parents=True)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "bases": [os.path.relpath(K8S_DIR, directory)],
        # The bot's image exists only in this node's containerd (imported, never pulled).
        "images": [{"name": "registry.example.com/imagebot", "newName": image.rsplit(":", 1)[0],
                    "newTag": image.rsplit(":", 1)[1]}],
        "patchesStrategicMerge": ["configmap.yaml"],
        "patchesJson6902": [{"target": {"group": "apps", "version": "v1", "kind": "Deployment",
                                        "name": "imagebot", "namespace": BOT_NS},
                             "path": "deployment.yaml"}],
    }, sort_keys=False))
    (directory / "configmap.yaml").write_text(f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: imagebot
  namespace: {BOT_NS}
data:
  # The registry (step 2 of deploy/README.md sets yours): this machine's dev registry. It
  # takes any credentials: the shipped username and the Secret's password file are used as
  # they are (or, without credentials, removed as that step says) ...
  IMAGEBOT_REGISTRY: "{registry}"
{NO_CREDENTIALS if not credentials else ""}  # ... and it speaks plain HTTP (a real one has TLS).
  IMAGEBOT_K8S_REGISTRY_TLS_VERIFY: "false"
  # Only host-network pods have a network on this cluster (its CNI is loopback only).
  IMAGEBOT_K8S_HOST_NETWORK: "true"
  # Nothing can be pulled here: the builder image is the one scripts/k8s imported.
  IMAGEBOT_K8S_BUILDER_IMAGE: "{builder_image}"
  IMAGEBOT_K8S_IMAGE_PULL_POLICY: "Never"
  # The forge the deliveries' clone URLs must be on: the test's git server (default: GitHub).
  IMAGEBOT_GITHUB_URL: "{github_url}"
  # Two cores, shared with every other test's pods: small requests (the limits stay).
  IMAGEBOT_K8S_RESOURCES: '{{"requests": {{"cpu": "100m", "memory": "128Mi"}}}}'
""")
    (directory / "deployment.yaml").write_text(f"""\
# Only host-network pods have a network on this cluster (its CNI is loopback only) ...
- op: add
  path: /spec/template/spec/hostNetwork
  value: true
# ... so the bot binds the node's port: a free one, not 8000 (the probes follow the named port).
- op: replace
  path: /spec/template/spec/containers/0/args
  value: ["serve", "--host", "0.0.0.0", "--port", "{port}"]
- op: replace
  path: /spec/template/spec/containers/0/ports/0/containerPort
  value: {port}
# The image was imported into the node's containerd; nothing can be pulled here.
- op: replace
  path: /spec/template/spec/containers/0/imagePullPolicy
  value: Never
# In-cluster config reads KUBERNETES_SERVICE_HOST/PORT, which the kubelet sets to the Service
# kubernetes (10.0.0.1:443); this cluster has no kube-proxy to route that, so name the API
# server's own address (its serving certificate covers it: TLS is verified against the
# ServiceAccount's ca.crt as usual).
- op: add
  path: /spec/template/spec/containers/0/env/-
  value: {{name: KUBERNETES_SERVICE_HOST, value: "{host}"}}
- op: add
  path: /spec/template/spec/containers/0/env/-
  value: {{name: KUBERNETES_SERVICE_PORT, value: "{api_port}"}}
""")
    return directory


#: deploy/README.md, step 2, for a registry without credentials: "remove both lines".
NO_CREDENTIALS = """\
  IMAGEBOT_REGISTRY_USERNAME: null
  IMAGEBOT_REGISTRY_PASSWORD_FILE: null
"""


# -- watching as admin -----------------------------------------------------------------------


class Watch:
    """``kubectl get KIND --watch`` as admin, from now on, into a file (a pipe nobody reads
    would fill up and stall kubectl)."""

    def __init__(self, k8s: Cluster, kind: str, namespace: str, path: Path) -> None:
        self.path = path
        with path.open("w") as out:
            self.proc = subprocess.Popen(
                [str(k8s.kubectl), f"--kubeconfig={k8s.kubeconfig}", "-n", namespace, "get", kind,
                 "--watch", "--output-watch-events", "-o", "json"],
                stdout=out, stderr=subprocess.DEVNULL)

    def events(self) -> list[dict[str, Any]]:
        """The events so far (an event being written is left for the next call)."""
        out = self.path.read_text()
        decoder, events, at = json.JSONDecoder(), [], 0
        while rest := out[at:].lstrip():
            try:
                event, at = decoder.raw_decode(out, len(out) - len(rest))
            except json.JSONDecodeError:
                break
            events.append(event)
        return events

    def until(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float,
              what: str) -> list[dict[str, Any]]:
        return poll(lambda: (events := self.events()) and predicate(events) and events, timeout, what,
                    interval=0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def watch(k8s: Cluster, tmp_path: Path) -> Iterator[Callable[[str, str], Watch]]:
    """``watch(KIND, NAMESPACE)``: a :class:`Watch`, stopped at the end of the test."""
    started: list[Watch] = []

    def start(kind: str, namespace: str) -> Watch:
        started.append(Watch(k8s, kind, namespace, tmp_path / f"watch-{kind}-{namespace}.json"))
        return started[-1]

    yield start
    for one in started:
        one.stop()


# -- the test --------------------------------------------------------------------------------


def diagnose(k8s: Cluster) -> str:
    """What the cluster says about the bot's pods (for a failure message; no secret is in it)."""
    described = k8s.kubectl_run("-n", BOT_NS, "describe", "pods", check=False).stdout
    logs = k8s.kubectl_run("-n", BOT_NS, "logs", "deploy/imagebot", "--tail=60", check=False)
    return f"{described[-4000:]}\n--- bot log ---\n{logs.stdout}{logs.stderr}"


def available(k8s: Cluster) -> dict[str, Any] | None:
    with k8s.client() as api:
        deployment = expect(api.get(f"/apis/apps/v1/namespaces/{BOT_NS}/deployments/imagebot"))
        pods = expect(api.get(f"/api/v1/namespaces/{BOT_NS}/pods"))["items"]
    for pod in pods:  # an image that cannot run fails now, not at the deadline
        for status in pod["status"].get("containerStatuses", []):
            waiting = status["state"].get("waiting", {}).get("reason")
            if waiting in ("ErrImageNeverPull", "CrashLoopBackOff", "CreateContainerConfigError") \
                    or status["restartCount"]:
                pytest.fail(f"the bot's pod does not run ({waiting}, {status['restartCount']} restarts):\n"
                            f"{diagnose(k8s)}")
    status = deployment["status"]
    done = (status.get("observedGeneration", 0) >= deployment["metadata"]["generation"]
            and status.get("updatedReplicas") == status.get("availableReplicas") == 1
            and any(c["type"] == "Available" and c["status"] == "True" for c in status.get("conditions", [])))
    return deployment if done else None


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[GitHTTPServer]:
    """The forge's git side, up before the bot (whose IMAGEBOT_GITHUB_URL names it); it serves
    the repositories made under its root later."""
    with GitHTTPServer(tmp_path / "srv") as server:
        yield server


@pytest.mark.parametrize("credentials", [True, False],
                         ids=["registry-password-file", "registry-without-credentials"])
def test_deploy_runs_the_bot_in_cluster_and_builds_both_platforms_as_jobs(
    k8s: Cluster, services: dict[str, str], bot_image: str, database_url: str, deploy_namespaces: None,
    watch: Callable[[str, str], Watch], tmp_path: Path, credentials: bool, git_server: GitHTTPServer,
) -> None:
    started = time.monotonic()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    webhook_secret, registry_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    registry = f"{services['IMAGEBOT_DEV_REGISTRY']}/e2e{uuid.uuid4().hex[:8]}"

    # deploy/README.md, steps 3 and 4: the namespaces, the Secret, then everything else
    k8s.kubectl_run("apply", "-f", str(K8S_DIR / "namespace.yaml"))
    jobs, pods = watch("jobs", BUILD_NS), watch("pods", BUILD_NS)  # as admin, from before the bot runs
    with k8s.client() as api:
        expect(api.post(f"/api/v1/namespaces/{BOT_NS}/secrets", json={
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "imagebot"},
            "stringData": {"database-url": database_url, "github-webhook-secret": webhook_secret,
                           **({"registry-password": registry_password} if credentials else {})},
        }), 201)
    kustomization = overlay(tmp_path / "overlay", image=bot_image, port=port, registry=registry,
                            credentials=credentials, builder_image=k8s.builder_image, api_server=k8s.server,
                            github_url=git_server.url)
    rendered = [d for d in yaml.safe_load_all(k8s.kubectl_run("kustomize", str(kustomization)).stdout) if d]
    assert sorted(d["kind"] for d in rendered) == sorted(
        ["Namespace", "Namespace", "ServiceAccount", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
         "Deployment", "Service", "NetworkPolicy"])
    (config,) = [d["data"] for d in rendered if d["kind"] == "ConfigMap"]
    assert not {"IMAGEBOT_K8S_KUBECONFIG", "IMAGEBOT_K8S_CONTEXT"} & set(config)  # in-cluster config
    k8s.kubectl_run("apply", "-k", str(kustomization))

    poll(lambda: available(k8s), AVAILABLE_WITHIN, "the Deployment to be Available", interval=0.5)
    ready_at = time.monotonic()
    assert httpx.get(f"{url}/healthz").status_code == 200

    with k8s.client() as api:
        (pod,) = expect(api.get(f"/api/v1/namespaces/{BOT_NS}/pods"))["items"]
        # the Service's endpoints: the ready pod, at the bot's port
        endpoints = expect(api.get(f"/api/v1/namespaces/{BOT_NS}/endpoints/imagebot"))
    assert [p["port"] for s in endpoints["subsets"] for p in s["ports"]] == [port]
    assert [a["targetRef"]["name"] for s in endpoints["subsets"] for a in s["addresses"]] == [
        pod["metadata"]["name"]]
    # the shipped pod, as shipped: its ServiceAccount's token is its only Kubernetes credential
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert spec["serviceAccountName"] == "imagebot"
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in {m["mountPath"] for m in container["volumeMounts"]}
    assert not {"IMAGEBOT_K8S_KUBECONFIG", "IMAGEBOT_K8S_CONTEXT"} & {e["name"] for e in container["env"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert container["image"] == bot_image and container["imagePullPolicy"] == "Never"

    # a real push of a real repository, signed with the webhook secret of the Secret
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(services["IMAGEBOT_DEV_BASE_IMAGE"]))
    with contextlib.nullcontext(git_server) as git:  # started before the bot: its URL is configured
        payload = github_payload("push.payload.4")
        payload["repository"].update(clone_url=git.repo_url("acme/app"), full_name="acme/app",
                                     default_branch="main")
        payload["after"], payload["ref"] = repo.head(), "refs/heads/main"
        body = json.dumps(payload).encode()
        response = httpx.post(f"{url}/webhooks/github", content=body, headers={
            "content-type": "application/json", "x-github-event": "push",
            "x-github-delivery": str(uuid.uuid4()), "x-hub-signature-256": sign(body, webhook_secret)})
        assert response.status_code == 201, response.text
        build_id = response.json()["build_id"]

        def finished() -> dict[str, Any] | None:
            build = httpx.get(f"{url}/api/builds/{build_id}").json()
            return build if build["status"] not in ("queued", "running") else None

        build = poll(finished, BUILD_WITHIN, f"build {build_id} to finish", interval=1.0)
    built_at = time.monotonic()
    log = httpx.get(f"{url}/api/builds/{build_id}/log").text
    assert build["status"] == "succeeded", (
        f"{build['error']}\n{[r['error'] for r in build['results']]}\n{log[-3000:]}\n{diagnose(k8s)}")
    assert [(r["platform"], r["status"]) for r in build["results"]] == [(p, "pushed") for p in PLATFORMS]
    assert build["manifest"]["status"] == "published"

    # the runtime ran each platform as a Job in the builds' namespace (its pod finished), and
    # deleted it after
    names = {f"imagebot-{build_id}-{p.replace('/', '-')}" for p in PLATFORMS}

    def named(events: list[dict[str, Any]], kind: str) -> set[str]:
        return {e["object"]["metadata"]["name"] for e in events if e["type"] == kind}

    def pods_succeeded(events: list[dict[str, Any]]) -> set[str]:
        return {e["object"]["metadata"]["labels"]["job-name"] for e in events
                if e["object"]["status"].get("phase") == "Succeeded"}

    job_events = jobs.until(lambda events: named(events, "DELETED") >= names, 60, "the Jobs to be deleted")
    pod_events = pods.until(lambda events: pods_succeeded(events) >= names, 30, "the pods to have succeeded")
    added = {e["object"]["metadata"]["name"]: e["object"] for e in job_events if e["type"] == "ADDED"}
    assert set(added) == names, sorted(added)
    assert named(job_events, "DELETED") == names
    for job in added.values():
        assert job["metadata"]["labels"]["imagebot.dev/build"] == str(build_id)
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == "imagebot-build"
        assert job["spec"]["template"]["spec"]["hostNetwork"] is True
    assert pods_succeeded(pod_events) == names
    for platform in PLATFORMS:
        assert f"imagebot: Job {BUILD_NS}/imagebot-{build_id}-{platform.replace('/', '-')} created" in log
    assert "RUN uname -m" in log

    # the manifest list is in the registry, over both platforms' pushed images
    host, repository = registry.split("/", 1)
    listing = httpx.get(f"http://{host}/v2/{repository}/acme/app/manifests/main", headers={
        "Accept": "application/vnd.docker.distribution.manifest.list.v2+json"})
    assert listing.status_code == 200, listing.text
    assert sorted(m["platform"]["architecture"] for m in listing.json()["manifests"]) == ["amd64", "arm64"]
    assert listing.headers["docker-content-digest"] == build["manifest"]["digest"]

    # no secret in the bot's log
    bot_log = k8s.kubectl_run("-n", BOT_NS, "logs", pod["metadata"]["name"]).stdout
    password = httpx.URL(services["IMAGEBOT_TEST_POSTGRES_URL"].replace("+psycopg", "")).password
    assert f"build {build_id} succeeded" in bot_log
    assert not [s for s in (webhook_secret, registry_password, password) if s in bot_log]
    print(f"Available after {ready_at - started:.1f}s, build {build_id} took {built_at - ready_at:.1f}s, "
          f"test {time.monotonic() - started:.1f}s")
