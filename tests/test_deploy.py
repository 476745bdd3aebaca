"""deploy/ is what a cluster and Docker Compose accept, and the bot's rights are least privilege.

Against the real single-node Kubernetes of scripts/k8s (API server in RBAC mode):
  * every manifest of deploy/kubernetes passes ``kubectl apply --dry-run=server`` as shipped
    (its two Namespaces are applied for real first and deleted afterwards), so does
    ``kubectl apply -k``; a broken Deployment is refused, so the dry run does validate;
  * the ServiceAccount, Role and RoleBinding of deploy/kubernetes, applied for real into two
    fresh namespaces, give the bot's token exactly the rights the Kubernetes runtime needs in the
    builds' namespace (SelfSubjectAccessReview over a matrix of verbs and resources, the
    namespace's rule list, and real requests) and none anywhere else.
With Debian's docker-compose (installed here if missing): deploy/compose.yaml passes
``docker-compose config``, resolves to the bot built from deploy/Dockerfile with the Docker
runtime and the host's socket, PostgreSQL and registry:2, and refuses to start without its
required values. Static checks: probes on /healthz, no cluster-scoped RBAC, non-root, settings
that the bot's own Settings accept, a Dockerfile that matches the Deployment.
Nothing sleeps to synchronise: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bot.settings import Settings, load_settings
from tests.k8s_cluster import (
    Cluster, cluster, create_namespace, delete_namespace, deploy_namespaces_lock, expect, poll, wait_for_token,
)
from tests.support import infra

# The first test may start (or, on a fresh machine, build) the cluster; the tests themselves
# take a few seconds.
pytestmark = pytest.mark.timeout(1800)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_DIR = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
MANIFESTS = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")

BOT_NAMESPACE = "imagebot"
BUILD_NAMESPACE = "imagebot-builds"

#: What the Kubernetes runtime does in the builds' namespace, and all it may do:
#: (API group, resource[/subresource]) -> verbs.
NEEDED: dict[tuple[str, str], set[str]] = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "secrets"): {"create", "get", "list", "patch", "update", "delete"},
}
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
#: Namespaced resources probed in the builds' namespace: the needed ones and their neighbours.
PROBED = [
    *NEEDED,
    ("", "pods/exec"), ("", "pods/attach"), ("", "pods/portforward"), ("", "pods/status"),
    ("batch", "jobs/status"), ("batch", "cronjobs"), ("apps", "deployments"),
    ("", "configmaps"), ("", "serviceaccounts"), ("", "serviceaccounts/token"), ("", "services"),
    ("", "events"), ("", "persistentvolumeclaims"),
    ("rbac.authorization.k8s.io", "roles"), ("rbac.authorization.k8s.io", "rolebindings"),
]
#: Cluster-scoped resources: no verb at all.
CLUSTER_PROBED = [
    ("", "nodes"), ("", "namespaces"), ("", "persistentvolumes"),
    ("rbac.authorization.k8s.io", "clusterroles"), ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("apiextensions.k8s.io", "customresourcedefinitions"), ("certificates.k8s.io", "certificatesigningrequests"),
]

SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PRIVATE_KEY", "DATABASE_URL")


# --------------------------------------------------------------------------- helpers


def load(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def all_objects() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in load(path)]


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in all_objects() if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/kubernetes, found {len(found)}"
    return found[0]


def deployment_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def setting_name(variable: str) -> str:
    assert variable.startswith("IMAGEBOT_"), variable
    return variable.removeprefix("IMAGEBOT_").lower()


def renamespaced(docs: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    """``docs`` with every namespace reference (metadata, RBAC subjects) mapped through ``names``."""
    docs = json.loads(json.dumps(docs))
    for doc in docs:
        meta = doc["metadata"]
        if "namespace" in meta:
            meta["namespace"] = names[meta["namespace"]]
        for subject in doc.get("subjects", []):
            if "namespace" in subject:
                subject["namespace"] = names[subject["namespace"]]
    return docs


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The bot's Settings from exactly ``env``: none of the test process's IMAGEBOT_*, no .env."""
    for key in list(os.environ):
        if key.startswith("IMAGEBOT_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return load_settings()


def apply_deploy_rbac(k8s: Cluster, bot_namespace: str, build_namespace: str) -> str:
    """Apply deploy/kubernetes' ServiceAccounts, Role and RoleBinding for real, in two given
    namespaces instead of imagebot / imagebot-builds; return the bot ServiceAccount's token."""
    docs = [doc for name in ("serviceaccount.yaml", "role.yaml", "rolebinding.yaml") for doc in load(K8S_DIR / name)]
    docs = renamespaced(docs, {BOT_NAMESPACE: bot_namespace, BUILD_NAMESPACE: build_namespace})
    k8s.kubectl_run("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    bot_sa = only("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    return wait_for_token(k8s, bot_namespace, bot_sa)


def access_review(api: httpx.Client, verb: str, group: str, resource: str, namespace: str = "") -> bool:
    resource, _, subresource = resource.partition("/")
    attributes = {"verb": verb, "group": group, "resource": resource, "subresource": subresource}
    if namespace:
        attributes["namespace"] = namespace
    review = expect(api.post(
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        json={"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
              "spec": {"resourceAttributes": attributes}},
    ), 201)
    return bool(review["status"].get("allowed"))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def k8s() -> Cluster:
    return cluster()


@pytest.fixture(scope="module")
def deploy_namespaces(k8s: Cluster) -> Iterator[list[str]]:
    """deploy/kubernetes/namespace.yaml applied for real (namespaced dry runs need them);
    the namespaces this created are deleted afterwards. Under the lock that keeps other test
    processes (tests/e2e/test_deploy_in_cluster.py) out of these two namespaces meanwhile."""
    names = [o["metadata"]["name"] for o in all_objects() if o["kind"] == "Namespace"]
    assert sorted(names) == sorted([BOT_NAMESPACE, BUILD_NAMESPACE])
    created = []
    with deploy_namespaces_lock(k8s):
        with k8s.client() as api:
            for name in names:
                # a previous run's namespace may still be terminating: nothing can be created in it
                def settled(name: str = name) -> bool:
                    response = api.get(f"/api/v1/namespaces/{name}")
                    if response.status_code == 404:
                        created.append(name)
                        return True
                    return expect(response)["status"].get("phase") == "Active"

                poll(settled, 60, f"namespace {name} to be gone or active", interval=0.2)
        k8s.kubectl_run("apply", "-f", str(K8S_DIR / "namespace.yaml"))
        yield names
        for name in created:
            delete_namespace(k8s, name)


@pytest.fixture
def fresh_namespaces(k8s: Cluster) -> Iterator[tuple[str, str]]:
    bot, build = create_namespace(k8s, "imagebot-bot"), create_namespace(k8s, "imagebot-builds")
    yield bot, build
    delete_namespace(k8s, bot)
    delete_namespace(k8s, build)


@pytest.fixture(scope="module")
def docker_compose() -> str:
    """Debian's docker-compose (1.29), installed by scripts/infra's ``compose`` component."""
    return infra("compose")["IMAGEBOT_TEST_DOCKER_COMPOSE"]


def compose_config(docker_compose: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of deploy/compose.yaml with exactly ``env`` as its variables
    (no deploy/.env of a developer's, no IMAGEBOT_* of the test environment)."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEBOT_", "DOCKER_", "COMPOSE_"))}
    return subprocess.run(
        [docker_compose, "--env-file", str(empty), "-f", str(COMPOSE), "config"],
        capture_output=True, text=True, env={**clean, **env}, timeout=60,
    )


# --------------------------------------------------------------------------- the cluster accepts the manifests


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_passes_server_side_dry_run(k8s: Cluster, deploy_namespaces: list[str], manifest: Path) -> None:
    docs = load(manifest)
    result = k8s.kubectl_run("apply", "--dry-run=server", "-f", str(manifest))
    for doc in docs:
        assert f"{doc['metadata']['name']} " in result.stdout and "(server dry run)" in result.stdout, result.stdout
    # a dry run indeed: nothing namespaced was created
    with k8s.client() as api:
        for doc in docs:
            if doc["kind"] == "Deployment":
                url = f"/apis/apps/v1/namespaces/{doc['metadata']['namespace']}/deployments/{doc['metadata']['name']}"
                assert api.get(url).status_code == 404


def test_kustomization_renders_every_manifest_and_passes_dry_run(k8s: Cluster, deploy_namespaces: list[str]) -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)
    rendered = [d for d in yaml.safe_load_all(k8s.kubectl_run("kustomize", str(K8S_DIR)).stdout) if d]

    def key(o: dict[str, Any]) -> tuple[str, str, str]:
        return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]

    assert sorted(map(key, rendered)) == sorted(map(key, all_objects()))
    result = k8s.kubectl_run("apply", "--dry-run=server", "-k", str(K8S_DIR))
    assert result.stdout.count("(server dry run)") == len(rendered), result.stdout


def test_server_dry_run_refuses_a_broken_deployment(k8s: Cluster, deploy_namespaces: list[str]) -> None:
    """The control: the same dry run does validate (a selector that misses the pod's labels)."""
    broken = json.loads(json.dumps(only("Deployment")))
    broken["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "something-else"}
    result = k8s.kubectl_run("apply", "--dry-run=server", "-f", "-", input=json.dumps(broken), check=False)
    assert result.returncode != 0
    assert "selector" in result.stderr and "does not match template" in result.stderr, result.stderr


# --------------------------------------------------------------------------- least privilege, proven


def test_bot_service_account_has_exactly_the_runtime_rights_in_the_build_namespace(
    k8s: Cluster, fresh_namespaces: tuple[str, str],
) -> None:
    bot_ns, build_ns = fresh_namespaces
    other_ns = create_namespace(k8s, "imagebot-other")
    try:
        token = apply_deploy_rbac(k8s, bot_ns, build_ns)
        with k8s.client(token) as api:
            # the RoleBinding reaches the authorizer a moment after it is stored
            poll(lambda: access_review(api, "create", "batch", "jobs", build_ns), 30, "the RoleBinding to take effect")

            wrong = []
            for group, resource in PROBED:
                for verb in VERBS:
                    want = verb in NEEDED.get((group, resource), set())
                    if access_review(api, verb, group, resource, build_ns) != want:
                        wrong.append(f"{verb} {group or 'core'}/{resource} in the build namespace: {'denied' if want else 'allowed'}")
            for namespace in (bot_ns, other_ns, "default", "kube-system"):
                for group, resource in [*NEEDED, ("apps", "deployments"), ("", "pods/exec")]:
                    for verb in VERBS:
                        if access_review(api, verb, group, resource, namespace):
                            wrong.append(f"{verb} {group or 'core'}/{resource} in {namespace}: allowed")
            for group, resource in CLUSTER_PROBED:
                for verb in [*VERBS, "escalate", "bind", "impersonate"]:
                    if access_review(api, verb, group, resource):
                        wrong.append(f"{verb} {group or 'core'}/{resource} (cluster-wide): allowed")
            for verb, group, resource in [("escalate", "rbac.authorization.k8s.io", "roles"),
                                          ("bind", "rbac.authorization.k8s.io", "roles"),
                                          ("impersonate", "", "serviceaccounts"), ("*", "*", "*")]:
                if access_review(api, verb, group, resource, build_ns):
                    wrong.append(f"{verb} {group or 'core'}/{resource} in the build namespace: allowed")
            assert not wrong, "\n".join(wrong)

            # the namespace's whole rule list (what `kubectl auth can-i --list` shows) is NEEDED,
            # plus only the self-review rights every authenticated user has
            review = expect(api.post(
                "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
                json={"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
                      "spec": {"namespace": build_ns}},
            ), 201)
            granted: dict[tuple[str, str], set[str]] = {}
            for rule in review["status"]["resourceRules"]:
                for group in rule.get("apiGroups", []):
                    if group == "authorization.k8s.io":  # system:basic-user: self reviews
                        continue
                    for resource in rule.get("resources", []):
                        granted.setdefault((group, resource), set()).update(rule["verbs"])
            assert granted == NEEDED
    finally:
        delete_namespace(k8s, other_ns)


def test_bot_service_account_real_requests(k8s: Cluster, fresh_namespaces: tuple[str, str]) -> None:
    """Not only reviews: the requests the runtime makes succeed, their neighbours are Forbidden."""
    bot_ns, build_ns = fresh_namespaces
    token = apply_deploy_rbac(k8s, bot_ns, build_ns)
    name = f"imagebot-test-{uuid.uuid4().hex[:6]}"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"token": "x"}}
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "build", "image": k8s.builder_image, "imagePullPolicy": "Never"}]}}},
    }
    with k8s.client(token) as api:
        secrets, jobs = f"/api/v1/namespaces/{build_ns}/secrets", f"/apis/batch/v1/namespaces/{build_ns}/jobs"
        poll(lambda: api.get(jobs).status_code == 200, 30, "the RoleBinding to take effect")

        expect(api.post(secrets, json=secret), 201)
        patched = expect(api.patch(f"{secrets}/{name}", json={"stringData": {"token": "y"}},
                                   headers={"Content-Type": "application/merge-patch+json"}))
        assert patched["metadata"]["name"] == name
        expect(api.put(f"{secrets}/{name}", json={**secret, "stringData": {"token": "z"}}))
        assert [s["metadata"]["name"] for s in expect(api.get(secrets))["items"] if s["metadata"]["name"] == name] == [name]
        expect(api.delete(f"{secrets}/{name}"))

        expect(api.post(jobs, params={"dryRun": "All"}, json=job), 201)  # authorized as a real create
        expect(api.get(jobs, params={"labelSelector": "imagebot.dev/build"}))
        expect(api.get(f"/api/v1/namespaces/{build_ns}/pods"))
        expect(api.get(f"/api/v1/namespaces/{build_ns}/pods/nope/log"), 404)  # allowed, no such pod

        forbidden = {
            "secrets in the bot's namespace": api.get(f"/api/v1/namespaces/{bot_ns}/secrets"),
            "secrets in default": api.get("/api/v1/namespaces/default/secrets/anything"),
            "jobs in the bot's namespace": api.post(f"/apis/batch/v1/namespaces/{bot_ns}/jobs",
                                                    params={"dryRun": "All"}, json=job),
            "pods created directly": api.post(f"/api/v1/namespaces/{build_ns}/pods", params={"dryRun": "All"},
                                              json={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                                                    "spec": job["spec"]["template"]["spec"]}),
            "pods/exec": api.post(f"/api/v1/namespaces/{build_ns}/pods/nope/exec", params={"command": "sh"}),
            "deployments": api.get(f"/apis/apps/v1/namespaces/{build_ns}/deployments"),
            "configmaps": api.get(f"/api/v1/namespaces/{build_ns}/configmaps"),
            "nodes": api.get("/api/v1/nodes"),
            "namespaces": api.get("/api/v1/namespaces"),
            "clusterroles": api.get("/apis/rbac.authorization.k8s.io/v1/clusterroles"),
            "roles": api.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{build_ns}/roles"),
        }
        allowed = {what: r.status_code for what, r in forbidden.items() if r.status_code != 403}
        assert not allowed, allowed


# --------------------------------------------------------------------------- static checks of the manifests


def test_no_cluster_scoped_rbac_and_the_role_is_exactly_what_the_runtime_needs() -> None:
    objects = all_objects()
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, kinds
    text = "\n".join(p.read_text() for p in MANIFESTS)
    assert "'*'" not in text and '"*"' not in text, "no wildcards in deploy/kubernetes"

    role = only("Role")
    assert role["metadata"]["namespace"] == BUILD_NAMESPACE
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no resourceNames / nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == NEEDED

    binding = only("RoleBinding")
    assert binding["metadata"]["namespace"] == BUILD_NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    deployment = only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": deployment["metadata"]["namespace"]}]
    assert deployment["metadata"]["namespace"] == BOT_NAMESPACE
    only("ServiceAccount", pod["serviceAccountName"])  # the bot's identity is shipped too

    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert all(o["metadata"].get("namespace") in (BOT_NAMESPACE, BUILD_NAMESPACE) for o in namespaced), \
        "every namespaced object names its namespace (kubectl apply -f without -n)"


def egress_allows(policy: dict[str, Any], address: str, port: int) -> bool:
    """Whether a NetworkPolicy's egress rules let a selected pod reach ``address:port`` over
    TCP, as the Kubernetes API defines them (pure: rules are OR-ed, ``to`` and ``ports`` AND-ed)."""
    import ipaddress

    ip = ipaddress.ip_address(address)

    def in_block(block: dict[str, Any]) -> bool:
        cidr = ipaddress.ip_network(block["cidr"])
        return ip.version == cidr.version and ip in cidr and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []) if ipaddress.ip_network(e).version == ip.version)

    for rule in policy["spec"].get("egress", []):
        ports = rule.get("ports")
        if ports and not any(p.get("protocol", "TCP") == "TCP" and p.get("port") == port for p in ports):
            continue
        peers = rule.get("to")
        if not peers or any("ipBlock" in peer and in_block(peer["ipBlock"]) for peer in peers):
            return True
    return False


def test_the_build_namespace_policy_denies_the_api_server_the_node_and_the_metadata_service() -> None:
    """deploy/kubernetes/networkpolicy.yaml (server dry run: above) selects every build pod and
    lets it reach the internet but not the cluster: the API server (its Service address here,
    10.0.0.1, and the usual ones), the kubelet and other node ports, loopback, 169.254.169.254."""
    from bot.runtimes.kubernetes import KubernetesRuntime
    from tests.test_runtime_kubernetes_spec import fork, job

    policy = only("NetworkPolicy")
    assert policy["metadata"]["namespace"] == BUILD_NAMESPACE
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["ingress"] == []
    runtime = KubernetesRuntime(load_settings(runtime="kubernetes"))
    for build in (job(), fork()):
        labels = runtime.job_manifest("imagebot-1-linux-amd64", build)["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    denied = [("10.0.0.1", 443), ("10.96.0.1", 443), ("172.20.0.1", 6443), ("192.168.49.2", 8443),
              ("10.244.0.7", 10250), ("127.0.0.1", 10250), ("127.0.0.1", 2379), ("169.254.169.254", 80),
              ("100.100.100.200", 80), ("fd00:ec2::254", 80), ("::1", 10250),
              ("64:ff9b::a9fe:a9fe", 80), ("64:ff9b::a00:1", 443)]
    assert [target for target in denied if egress_allows(policy, *target)] == []
    for target in (("140.82.112.3", 443), ("185.199.108.133", 443), ("2606:50c0:8000::154", 443)):
        assert egress_allows(policy, *target), target  # a forge, a registry
    assert egress_allows(policy, "10.0.0.10", 53)  # the cluster's DNS


def test_every_deployment_probes_healthz_runs_non_root_and_has_resources() -> None:
    deployments = [o for o in all_objects() if o["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                http = container[probe]["httpGet"]
                assert http["path"] == "/healthz", (container["name"], probe)
                assert http["port"] in ports or http["port"] in ports.values(), (probe, http)
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security.get("privileged") is not True
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]


def test_bot_deployment_serves_on_all_addresses_with_the_kubernetes_runtime_and_secrets_from_a_secret() -> None:
    deployment = only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--host") + 1] == "0.0.0.0"
    port = int(args[args.index("--port") + 1])
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]

    env = deployment_env(container)
    assert env["IMAGEBOT_RUNTIME"]["value"] == "kubernetes"
    assert env["IMAGEBOT_K8S_NAMESPACE"]["value"] == only("Role")["metadata"]["namespace"]
    assert "IMAGEBOT_K8S_KUBECONFIG" not in env  # in-cluster config
    assert pod.get("automountServiceAccountToken", True) is True
    database = env["IMAGEBOT_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert database.get("optional") is not True
    for wanted in ("IMAGEBOT_GITHUB_WEBHOOK_SECRET", "IMAGEBOT_GITHUB_PRIVATE_KEY"):
        assert env[wanted]["valueFrom"]["secretKeyRef"]["name"] == database["name"]
    # no secret value written into the manifests: from the Secret, or a file path
    config = only("ConfigMap")
    literal = {**config["data"], **{k: v["value"] for k, v in env.items() if "value" in v}}
    leaked = [k for k in literal if any(w in k for w in SECRET_WORDS) and not k.endswith("_FILE")]
    assert not leaked, leaked
    # the registry password is the Secret, mounted where IMAGEBOT_REGISTRY_PASSWORD_FILE points
    password_file = Path(config["data"]["IMAGEBOT_REGISTRY_PASSWORD_FILE"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {Path(m["mountPath"]): m for m in container["volumeMounts"]}
    mount = mounts[password_file.parent]
    assert volumes[mount["name"]]["secret"]["secretName"] == database["name"]
    assert "items" not in volumes[mount["name"]]["secret"]  # the kubelet refreshes whole-Secret mounts only
    # envFrom: the ConfigMap that is shipped
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert config["metadata"]["namespace"] == deployment["metadata"]["namespace"]

    service = only("Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {"http", port}


def test_the_bots_settings_in_the_manifests_are_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ConfigMap + the Deployment's env, with stand-in secret values, load as the bot's Settings."""
    deployment = only("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {k: v["value"] for k, v in deployment_env(container).items() if "value" in v}
    env.update(only("ConfigMap")["data"])
    env["IMAGEBOT_DATABASE_URL"] = "postgresql+psycopg://imagebot:pw@postgres.example:5432/imagebot"
    env["IMAGEBOT_GITHUB_WEBHOOK_SECRET"] = "s"

    unknown = {k for k in env if setting_name(k) not in Settings.model_fields}
    assert not unknown, f"not settings of the bot: {unknown}"
    settings = settings_from(env, monkeypatch, tmp_path)
    assert settings.registry == env["IMAGEBOT_REGISTRY"]
    assert settings.registry_password_file == Path(env["IMAGEBOT_REGISTRY_PASSWORD_FILE"])
    assert settings.database_url.get_secret_value().startswith("postgresql")
    if "runtime" in Settings.model_fields:
        assert settings.runtime == "kubernetes"  # type: ignore[attr-defined]
        assert settings.k8s_namespace == BUILD_NAMESPACE  # type: ignore[attr-defined]


def test_dockerfile_builds_the_bot_as_the_deployments_non_root_user() -> None:
    """Its shape (tests/e2e/test_deploy_in_cluster.py builds it, on a stand-in base, and runs it)."""
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip() and not line.startswith("#")]
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))  # ARG NAME=default
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], line.split()[1])
             for line in lines if line.startswith("FROM ")]
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    # the dependencies in a layer of their own, then the bot alone, both pinned
    assert re.search(r"pip install (--constraint|-c) constraints\.txt -r requirements\.txt", text)
    assert re.search(r"pip install --no-deps (--constraint|-c) constraints\.txt \.", text)
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"{source} (COPY, context: the repo's root) does not exist"
    (user,) = [line.split()[1] for line in lines if line.startswith("USER ")]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user (runAsNonRoot can verify it)"
    assert lines[-1] == 'CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]'
    assert 'ENTRYPOINT ["imagebot"]' in lines
    assert "git" in text  # the pipeline fetches with git

    pod = only("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid)


# --------------------------------------------------------------------------- Docker Compose


COMPOSE_ENV = {"DOCKER_GID": "998", "IMAGEBOT_POSTGRES_PASSWORD": "pw-for-the-test",
               "IMAGEBOT_GITHUB_WEBHOOK_SECRET": "webhook-secret"}


def test_compose_file_passes_docker_compose_config(
    docker_compose: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = subprocess.run([docker_compose, "version", "--short"], capture_output=True, text=True, check=True)
    result = compose_config(docker_compose, tmp_path, COMPOSE_ENV)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"bot", "postgres", "registry"}, version.stdout

    bot = services["bot"]
    assert Path(bot["build"]["context"]) == ROOT
    assert (ROOT / bot["build"]["dockerfile"]) == DOCKERFILE
    assert "/var/run/docker.sock:/var/run/docker.sock:rw" in bot["volumes"]
    assert bot["group_add"] == ["998"]
    assert bot["command"][:1] == ["serve"]
    assert bot["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "healthcheck" in services["postgres"]
    assert services["registry"]["image"].startswith("registry:2")
    assert services["postgres"]["image"].startswith("postgres:")

    env = bot["environment"]
    assert env["IMAGEBOT_RUNTIME"] == "docker"
    assert env["IMAGEBOT_GITHUB_WEBHOOK_SECRET"] == "webhook-secret"
    assert env["IMAGEBOT_GITLAB_WEBHOOK_TOKEN"] is None  # unset stays unset, never ""
    assert "" not in env.values()
    published_pg = {p.split(":")[1] for p in services["postgres"]["ports"]}
    published_reg = {p.split(":")[1] for p in services["registry"]["ports"]}
    assert env["IMAGEBOT_DATABASE_URL"] == (
        f"postgresql+psycopg://imagebot:pw-for-the-test@127.0.0.1:{published_pg.pop()}/imagebot")
    assert env["IMAGEBOT_REGISTRY"] == f"127.0.0.1:{published_reg.pop()}"

    unknown = {k for k in env if k.startswith("IMAGEBOT_") and setting_name(k) not in Settings.model_fields}
    assert not unknown, f"not settings of the bot: {unknown}"
    settings = settings_from({k: v for k, v in env.items() if k.startswith("IMAGEBOT_") and v is not None},
                             monkeypatch, tmp_path)
    assert settings.registry == "127.0.0.1:5000"


def test_compose_file_refuses_to_run_without_its_required_values(docker_compose: str, tmp_path: Path) -> None:
    for missing in ("DOCKER_GID", "IMAGEBOT_POSTGRES_PASSWORD"):
        env = {k: v for k, v in COMPOSE_ENV.items() if k != missing}
        result = compose_config(docker_compose, tmp_path, env)
        assert result.returncode != 0
        assert f"set {missing}" in result.stderr, result.stderr
