"""A real single-node Kubernetes for tests: scripts/k8s starts it, this module talks to it.

``cluster()`` runs ``scripts/k8s up`` once per test process (idempotent: about 1 s when the
cluster runs, 15 s to start it, about 5 min the very first time, when it builds the Kubernetes
binaries from Debian's source) and returns a :class:`Cluster`.  The API is reached with plain
httpx (``Cluster.client``); ``Cluster.kubectl`` runs the version-matched kubectl.

Pods on this cluster must use ``hostNetwork: true`` and ``imagePullPolicy: Never`` (only the
images scripts/k8s imported exist: ``builder_image``, ``pause_image``).
"""

from __future__ import annotations

import base64
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "k8s"
UP_TIMEOUT = 1800  # a cold first run builds kube-apiserver & co. from source

T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    server: str  # https://127.0.0.1:16443
    ca: Path  # CA of the API server's serving certificate
    token: str  # admin bearer token (group system:masters)
    kubeconfig: Path  # admin kubeconfig (server, CA path, token)
    builder_image: str  # imagebot/builder-buildah:<buildah version>-<hash>: buildah, git, sh
    pause_image: str
    kubectl: Path  # kubectl of the server's own version
    containerd: Path  # socket of the cluster's containerd (ctr -a SOCKET -n k8s.io ...)
    node: str  # "localhost"
    version: str  # "v1.20.2"
    env: dict[str, str]  # the whole env file (registry credentials etc.)

    def client(self, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        """An httpx client for the API server, as admin or as the holder of ``token``."""
        return httpx.Client(
            base_url=self.server,
            verify=ssl.create_default_context(cafile=str(self.ca)),
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=timeout,
        )

    def kubectl_run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl ARGS`` as admin; with ``check`` a failure fails the test with its stderr."""
        result = subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


_cluster: Cluster | None = None


def cluster() -> Cluster:
    """Start the cluster with scripts/k8s (once per process) and describe it."""
    global _cluster
    if _cluster is None:
        result = subprocess.run(
            [str(SCRIPT), "up"], capture_output=True, text=True, timeout=UP_TIMEOUT,
        )
        if result.returncode != 0:
            pytest.fail(f"scripts/k8s up failed:\n{result.stderr[-3000:]}")
        out = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
        env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        _cluster = Cluster(
            server=env["IMAGEBOT_TEST_K8S_SERVER"],
            ca=Path(env["IMAGEBOT_TEST_K8S_CA"]),
            token=env["IMAGEBOT_TEST_K8S_TOKEN"],
            kubeconfig=Path(env["IMAGEBOT_TEST_K8S_KUBECONFIG"]),
            builder_image=env["IMAGEBOT_TEST_K8S_BUILDER_IMAGE"],
            pause_image=env["IMAGEBOT_TEST_K8S_PAUSE_IMAGE"],
            kubectl=Path(env["IMAGEBOT_TEST_KUBECTL"]),
            containerd=Path(env["IMAGEBOT_TEST_K8S_CONTAINERD"]),
            node=env["IMAGEBOT_TEST_K8S_NODE"],
            version=env["IMAGEBOT_TEST_K8S_VERSION"],
            env=env,
        )
    return _cluster


def poll(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``predicate`` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling a condition with a deadline


def expect(response: httpx.Response, *codes: int) -> Any:
    """The JSON body of ``response`` if its status is one of ``codes`` (default 2xx), else fail."""
    ok = response.status_code in codes if codes else response.is_success
    if not ok:
        pytest.fail(f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:2000]}")
    return response.json() if response.content else None


@contextmanager
def deploy_namespaces_lock(c: Cluster, timeout: float = 1200.0) -> Iterator[None]:
    """Held by every test that creates deploy/kubernetes' own namespaces (``imagebot``,
    ``imagebot-builds``: fixed names, as a user applies them), so that two test processes on
    one machine never use them at once. A lock file in scripts/k8s' state dir."""
    import fcntl

    with open(c.kubeconfig.parent / "deploy-namespaces.lock", "a") as f:
        def take() -> bool:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        poll(take, timeout, "the deploy namespaces' lock (another test process uses them)", interval=0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def create_namespace(c: Cluster, prefix: str = "imagebot-test", timeout: float = 30.0) -> str:
    """A fresh namespace, returned once its ``default`` ServiceAccount exists.

    The controller-manager makes that ServiceAccount a moment after the namespace; a pod
    created before it is refused ("serviceaccount default not found"), and a Job controller
    that meets this backs off for seconds.
    """
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    with c.client() as api:
        expect(api.post("/api/v1/namespaces", json={"metadata": {"name": name}}), 201)
        poll(lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default").status_code == 200,
             timeout, f"ServiceAccount {name}/default")
    return name


def delete_namespace(c: Cluster, name: str) -> None:
    """Start deleting ``name`` and everything in it (pods are killed); does not wait."""
    with c.client() as api:
        expect(api.delete(f"/api/v1/namespaces/{name}"), 200, 202, 404)


def service_account_token(c: Cluster, namespace: str, name: str, timeout: float = 30.0) -> str:
    """Create ServiceAccount ``name`` (no bindings: it may do nothing) and return its token."""
    with c.client() as api:
        expect(api.post(f"/api/v1/namespaces/{namespace}/serviceaccounts", json={"metadata": {"name": name}}), 201)
    return wait_for_token(c, namespace, name, timeout)


def wait_for_token(c: Cluster, namespace: str, name: str, timeout: float = 30.0) -> str:
    """The token of an existing ServiceAccount.

    On 1.20 the controller-manager's token controller makes a ``kubernetes.io/service-account-token``
    Secret for every ServiceAccount; this waits for it.
    """
    with c.client() as api:
        def token() -> str | None:
            secrets = expect(api.get(
                f"/api/v1/namespaces/{namespace}/secrets",
                params={"fieldSelector": "type=kubernetes.io/service-account-token"},
            ))
            for secret in secrets["items"]:
                annotations = secret["metadata"].get("annotations", {})
                if annotations.get("kubernetes.io/service-account.name") == name and secret.get("data", {}).get("token"):
                    return base64.b64decode(secret["data"]["token"]).decode()
            return None

        return poll(token, timeout, f"the token Secret of ServiceAccount {namespace}/{name}")


def kubeconfig_for(c: Cluster, token: str, path: Path) -> Path:
    """A kubeconfig that talks to the cluster as the holder of ``token`` (e.g. a ServiceAccount)."""
    import json

    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": c.server, "certificate-authority": str(c.ca)}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    return path
