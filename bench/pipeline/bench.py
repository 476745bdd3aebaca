"""Pipeline benchmark driver (run through bench/pipeline/run.sh; cwd = repo root).

The same two-platform build + push + manifest list, through ``imagebot build`` (the CLI),
through ``imagebot serve`` (a signed GitHub push webhook, then polling ``/api/builds/{id}``),
through ``imagebot build`` with the Kubernetes runtime ("kube", below) and through
bench/pipeline/plain.sh (the docker CLI, every step in sequence), alternated in one run: script,
CLI, serve, kube cold, then the same four warm; repeated ``--reps`` times (``--contestants``
picks a subset).

* One ``imagebot serve`` process serves the whole run (started before the first rep, stopped
  after the last; its start-up is in no build's time). A served build's wall time runs from
  sending the webhook until the API shows it ``succeeded``. The server's registry setting is
  fixed, so each served commit carries a ``.imagebot.yml`` whose ``image:`` puts the image in
  that rep's own namespace (the other contestants' commits do not have the file).

* The repository is served over smart HTTP on loopback by the tests' git stand-in, in this
  process (``tests/standins/git_http.py``).
* The base image is made for this run (``<registry>/pb<run>/base:latest``, a manifest list over
  amd64 and arm64): the shared busybox base by digest plus a random payload per arch, so its
  big layer exists nowhere else in the engine and a cold ``--pull`` really downloads it.
* Cold: every image this run made is removed from the engine first (the bench base too), and
  the contestant pushes to a namespace of its own that is new. Warm: right after, the same
  namespace, a new commit that changes one line of a COPY'd file (so the heavy RUN before the
  COPY is a cache hit, the COPY and the RUN after it are not) -- one commit per contestant, so
  neither finds the other's COPY layer in the cache.
* Every run is verified in the registry (the list has exactly both platforms, each entry's
  config has the right os/arch and the revision label of the commit built); a run that fails
  or does not verify is reported and left out of the medians.
* The engine's build cache is checked from the build output: a cold run must have no "Using
  cache" step and must download the base layers.

* The fourth contestant, ``imagebot build`` with ``IMAGEBOT_RUNTIME=kubernetes`` ("kube"), runs
  the CLI against the single-node cluster of ``scripts/k8s`` (one namespace per bench run,
  deleted at the end): each platform is a Job whose pod fetches the commit with git and builds
  with buildah (vfs, chroot isolation), then pushes. Such a pod starts with no layer cache, so
  its "cold" and "warm" runs do the same build; they differ in the push (warm: the base layers
  are already in the namespace's repository) and in the commit (one line of a COPY'd file).
  Both must show no cache hit and a base pull. While it runs, a watcher follows the namespace's
  pods (watch events, with the time each arrived) and each pod's build log with the container
  runtime's own timestamps, for the breakdown.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.standins.git_http import GitHTTPServer, make_repo  # noqa: E402

PLATFORMS = ["linux/amd64", "linux/arm64"]
MT_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MT_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
SHARED_BASE = "base/busybox"  # scripts/infra base-image, on the test registry
CONTESTANTS = ("plain", "imagebot", "serve", "kube")  # the order of the runs in each case
LABELS = {"plain": "plain", "imagebot": "imagebot CLI", "serve": "imagebot serve", "kube": "imagebot CLI k8s"}
NS_LETTER = {"plain": "p", "imagebot": "i", "serve": "s", "kube": "k"}
MT_OCI = "application/vnd.oci.image.manifest.v1+json"  # what buildah pushes
#: A recorded GitHub push delivery; the fields a build depends on are overridden per build.
PUSH_PAYLOAD = ROOT / "tests/data/webhooks/github/push.payload.4.json"
POLL_S = 0.025  # how often a served build's status is polled


def say(*args: object) -> None:
    print("bench:", *args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the fixture


def dockerfile(base: str, work_mb: int, rounds: int) -> str:
    return (
        f"FROM {base}\n"
        "ARG TARGETARCH\n"
        "# the dependencies: some seconds of CPU (gzip + sha256 over a random file), a layer of "
        f"{work_mb} MB\n"
        f"RUN dd if=/dev/urandom of=/opt/deps.bin bs=1M count={work_mb} 2>/dev/null \\\n"
        f" && for i in $(seq {rounds}); do gzip -c /opt/deps.bin | sha256sum; done > /opt/deps.sums\n"
        "# the application: a few small files, then a cheap step over them\n"
        "COPY app/ /app/\n"
        'RUN sha256sum /app/* > /opt/app.sums && echo "${TARGETARCH:-unknown}" > /opt/arch\n'
        'CMD ["/app/main.sh"]\n'
    )


def fixture_files(base: str, work_mb: int, rounds: int) -> dict[str, str]:
    words = " ".join(f"word{i}" for i in range(2000))
    return {
        "Dockerfile": dockerfile(base, work_mb, rounds),
        "app/main.sh": '#!/bin/sh\necho "app $(cat /app/version.txt) on $(cat /opt/arch)"\n',
        "app/version.txt": "0.0.0\n",
        "app/config.json": json.dumps({"name": "app", "workers": 2, "words": words}, indent=1) + "\n",
        "app/README": "The benchmark's application: small files copied after the heavy RUN.\n",
    }


# --------------------------------------------------------------------------- helpers


def infra_env() -> dict[str, str]:
    out = subprocess.run(["scripts/infra", "env"], capture_output=True, text=True, check=True, timeout=30)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def run_bounded(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None,
                log: Path | None = None) -> tuple[int, float]:
    """Run ``cmd`` in its own process group; kill the group after ``timeout``. (rc, seconds).

    Its output goes to ``log``, each line prefixed with the epoch time it was read at (so the
    phases of a ``docker build`` can be timed from outside, for the plain script too).
    """
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)

    def copy() -> None:
        with open(log or os.devnull, "a", errors="replace") as out:
            for raw in proc.stdout:
                out.write(f"{time.time():.3f} {raw.decode(errors='replace').rstrip()}\n")

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        say(f"timed out after {timeout:.0f}s: {' '.join(cmd[:3])} ...")
    except BaseException:  # interrupted: the contestant (its own session) must not outlive us
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    elapsed = time.monotonic() - started
    reader.join(timeout=10)
    return rc, elapsed


def read_log(log: Path) -> list[tuple[float, str]]:
    lines = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        stamp, _, text = line.partition(" ")
        lines.append((float(stamp), text))
    return lines


def build_phases(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Inside one platform's ``docker build`` output: FROM + pull, the heavy RUN, the rest."""
    marks: dict[str, float] = {}
    for ts, text in lines:
        text = text.strip()
        for key, prefix in (("s1", "Step 1/"), ("s3", "Step 3/"), ("s4", "Step 4/"), ("end", "Successfully built")):
            if text.startswith(prefix):
                marks.setdefault(key, ts)
    if len(marks) < 4:
        return {}
    return {"FROM + pull": marks["s3"] - marks["s1"], "heavy RUN": marks["s4"] - marks["s3"],
            "COPY .. LABEL": marks["end"] - marks["s4"]}

class Docker:
    """The docker CLI with this run's own DOCKER_CONFIG (never ~/.docker)."""

    def __init__(self, config_dir: Path, log: Path) -> None:
        self.env = {**os.environ, "DOCKER_CONFIG": str(config_dir), "DOCKER_BUILDKIT": "0"}
        self.log = log

    def __call__(self, *args: str, check: bool = True, timeout: float = 600, stdin: str | None = None) -> str:
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, input=stdin)
        with open(self.log, "a") as f:
            f.write(f"$ docker {' '.join(args)}\n{result.stdout}{result.stderr}")
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} failed: {result.stderr.strip()[-400:]}")
        return result.stdout


class Registry:
    def __init__(self, host: str, user: str, password: str) -> None:
        self.host = host
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def get(self, path: str, accept: str | None = None) -> tuple[dict[str, str], bytes]:
        req = urllib.request.Request(f"http://{self.host}/v2/{path}", headers={"Authorization": self.auth})
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return {k.lower(): v for k, v in resp.headers.items()}, resp.read()

    def verify(self, repository: str, tag: str, sha: str) -> list[str]:
        """Check the list under ``tag``; return its images' config digests (= engine image ids)."""
        headers, body = self.get(f"{repository}/manifests/{tag}", MT_LIST)
        listing = json.loads(body)
        if listing.get("mediaType") != MT_LIST:
            raise AssertionError(f"{repository}:{tag} is {listing.get('mediaType')}, not a manifest list")
        seen = {f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"] for m in listing["manifests"]}
        if sorted(seen) != sorted(PLATFORMS) or len(listing["manifests"]) != len(PLATFORMS):
            raise AssertionError(f"{repository}:{tag} lists {sorted(seen)}, not {PLATFORMS}")
        ids = []
        for platform, digest in seen.items():
            _, manifest = self.get(f"{repository}/manifests/{digest}", f"{MT_V2}, {MT_OCI}")
            config_digest = json.loads(manifest)["config"]["digest"]
            _, config = self.get(f"{repository}/blobs/{config_digest}")
            config = json.loads(config)
            got = f"{config['os']}/{config['architecture']}"
            revision = (config.get("config", {}).get("Labels") or {}).get("org.opencontainers.image.revision")
            if got != platform or revision != sha:
                raise AssertionError(f"{repository}:{tag} {platform}: image is {got}, revision {revision}")
            ids.append(config_digest)
        return ids


def count(lines: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(1 for line in lines if rx.search(line))


def cache_stats(lines: list[str]) -> dict[str, int]:
    return {
        "cache_hits": count(lines, r"Using cache"),
        "pulled": count(lines, r"(^|: )Pull complete"),
        "pushed": count(lines, r"(^|: )Pushed$"),
        "mounted": count(lines, r"Mounted from"),
        # the engine resolved FROM to another platform's image (two builds pulling one tag)
        "mixups": count(lines, r"WARNING: Pulled image with specified platform"),
    }


def utc(ts: str) -> float:
    """A telemetry ``ts`` (naive UTC) as epoch seconds."""
    return datetime.fromisoformat(ts).replace(tzinfo=timezone.utc).timestamp()


def iso(ts: str) -> float:
    """An RFC 3339 time from Kubernetes (``...Z``, up to nanoseconds) as epoch seconds."""
    ts = ts.rstrip("Z")
    whole, _, frac = ts.partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp() + float(f"0.{frac or 0}")


def kube_phases(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Inside one pod's build step (buildah bud, stamped by the container runtime): from the
    first line ("fetched", after git) the FROM + pull, the heavy RUN, COPY .. CMD, the commit."""
    marks: dict[str, float] = {}
    for ts, text in lines:
        text = text.strip()
        for key, prefix in (("s1", "STEP 1/"), ("s3", "STEP 3/"), ("s4", "STEP 4/"), ("commit", "COMMIT")):
            if text.startswith(prefix):
                marks.setdefault(key, ts)
    if len(marks) < 4 or not lines:
        return {}
    return {"FROM + pull": marks["s3"] - marks["s1"], "heavy RUN": marks["s4"] - marks["s3"],
            "COPY .. LABEL": marks["commit"] - marks["s4"], "commit (vfs)": lines[-1][0] - marks["commit"],
            "fetched": lines[0][0], "last line": lines[-1][0], "fetch to FROM": marks["s1"] - lines[0][0]}


def kube_stats(lines: list[tuple[str, str]]) -> dict[str, int]:
    """(platform, line) of a kube build's log: cache hits, base layers copied during FROM."""
    pulled, in_from = 0, {}
    for platform, line in lines:
        text = line.strip()
        if text.startswith("STEP "):
            in_from[platform] = text.startswith("STEP 1/")
        elif in_from.get(platform) and text.startswith("Copying blob") and "skipped" not in text:
            pulled += 1
    return {"cache_hits": sum(1 for _, line in lines if "Using cache" in line), "pulled": pulled}


class Kube:
    """The scripts/k8s cluster as admin (its env file's server, CA and token), over httpx."""

    def __init__(self, env: dict[str, str]) -> None:
        import ssl

        import httpx

        self.httpx = httpx
        self.server = env["IMAGEBOT_TEST_K8S_SERVER"]
        self.kubeconfig = env["IMAGEBOT_TEST_K8S_KUBECONFIG"]
        self.builder_image = env["IMAGEBOT_TEST_K8S_BUILDER_IMAGE"]
        self.ssl = ssl.create_default_context(cafile=env["IMAGEBOT_TEST_K8S_CA"])
        self.headers = {"Authorization": f"Bearer {env['IMAGEBOT_TEST_K8S_TOKEN']}"}

    def client(self, timeout: float = 30.0):
        return self.httpx.Client(base_url=self.server, verify=self.ssl, headers=self.headers, timeout=timeout)

    def create_namespace(self, name: str) -> None:
        with self.client() as api:
            r = api.post("/api/v1/namespaces", json={"metadata": {"name": name}})
            if r.status_code != 201:
                raise RuntimeError(f"creating namespace {name}: {r.status_code} {r.text[:300]}")
            deadline = time.monotonic() + 60  # a pod is refused until the default SA exists
            while api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no ServiceAccount {name}/default after 60 s")
                time.sleep(0.1)

    def delete_jobs(self, namespace: str) -> None:
        with self.client() as api:
            api.request("DELETE", f"/apis/batch/v1/namespaces/{namespace}/jobs",
                        params={"propagationPolicy": "Background", "gracePeriodSeconds": "0"})

    def delete_namespace(self, name: str) -> None:
        with self.client() as api:
            api.delete(f"/api/v1/namespaces/{name}")


class PodWatch:
    """Follows a namespace's pods during one run: every watch event (the time it arrived and the
    containers' states), and each pod's ``build`` log with the container runtime's timestamps
    (``?timestamps=true``: the time each line was written, not read)."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        self.events: list[tuple[float, str, dict]] = []
        self.logs: dict[str, list[tuple[float, str]]] = {}
        self.platform: dict[str, str] = {}  # pod name -> platform slug (linux-amd64)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        with kube.client() as api:
            self._rv = api.get(f"/api/v1/namespaces/{namespace}/pods").json()["metadata"]["resourceVersion"]

    def __enter__(self) -> "PodWatch":
        t = threading.Thread(target=self._watch, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(timeout=5)

    def _watch(self) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        while not self._stop.is_set():
            try:
                with self.kube.client(timeout=1.0) as api, api.stream(
                        "GET", path, params={"watch": "1", "resourceVersion": self._rv}) as resp:
                    for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        pod = event["object"]
                        if event["type"] == "ERROR":  # e.g. 410 Gone: start from now
                            self._rv = ""
                            break
                        self._rv = pod["metadata"]["resourceVersion"]
                        self._seen(time.time(), event["type"], pod)
                        if self._stop.is_set():
                            return
            except self.kube.httpx.ReadTimeout:
                continue  # no event for 1 s: look at the stop flag, then watch on from _rv
            except (self.kube.httpx.HTTPError, ValueError, KeyError) as exc:
                say(f"pod watch: {type(exc).__name__}: {exc}")
                time.sleep(0.2)

    def _seen(self, now: float, kind: str, pod: dict) -> None:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        brief = {"name": name, "node": (pod.get("spec") or {}).get("nodeName"), "phase": status.get("phase"),
                 "deleting": bool(pod["metadata"].get("deletionTimestamp")), "created": pod["metadata"]["creationTimestamp"]}
        for key in ("initContainerStatuses", "containerStatuses"):
            for c in status.get(key) or []:
                brief[c["name"]] = {"state": c.get("state") or {}, "restarts": c.get("restartCount", 0)}
        self.events.append((now, kind, brief))
        self.platform.setdefault(name, (pod["metadata"].get("labels") or {}).get("imagebot.dev/platform", "?"))
        build = (brief.get("build") or {}).get("state") or {}
        if name not in self.logs and ("running" in build or "terminated" in build):
            self.logs[name] = []
            t = threading.Thread(target=self._log, args=(name,), daemon=True)
            t.start()
            self._threads.append(t)

    def _log(self, name: str) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods/{name}/log"
        try:
            with self.kube.client(timeout=None) as api, api.stream(
                    "GET", path, params={"container": "build", "follow": "true", "timestamps": "true"}) as resp:
                for line in resp.iter_lines():
                    stamp, _, text = line.partition(" ")
                    try:
                        self.logs[name].append((iso(stamp), text))
                    except ValueError:
                        continue
        except self.kube.httpx.HTTPError as exc:
            say(f"log of pod {name}: {type(exc).__name__}: {exc}")

    def first(self, slug: str, test) -> float | None:
        """When an event about the platform's pod first satisfied ``test`` (None: never seen)."""
        for now, kind, brief in self.events:
            if self.platform.get(brief["name"]) == slug and test(kind, brief):
                return now
        return None

    def last_state(self, slug: str, container: str) -> dict:
        states = [b.get(container, {}).get("state") for _, _, b in self.events
                  if self.platform.get(b["name"]) == slug and b.get(container)]
        return states[-1] if states else {}


# --------------------------------------------------------------------------- the bench


@dataclass
class Run:
    rep: int
    case: str  # cold / warm
    who: str  # plain / imagebot (the CLI) / serve
    namespace: str
    sha: str
    wall: float = 0.0
    ok: bool = False
    error: str = ""
    load: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # inside the builds, from the build output


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        env = infra_env()
        self.reg_host = env["IMAGEBOT_TEST_REGISTRY"]
        self.user = env["IMAGEBOT_TEST_REGISTRY_USERNAME"]
        self.password = env["IMAGEBOT_TEST_REGISTRY_PASSWORD"]
        self.forge_url = ""  # the git server's URL, once it runs (IMAGEBOT_GITHUB_URL)
        self.registry = Registry(self.reg_host, self.user, self.password)
        self.run_id = secrets.token_hex(3)
        self.prefix = f"pb{self.run_id}"
        self.work = Path(tempfile.mkdtemp(prefix=f"imagebot-bench-pipeline-{self.run_id}-"))
        (self.work / "docker-config").mkdir()
        self.docker = Docker(self.work / "docker-config", self.work / "docker.log")
        self.base_ids: set[str] = set()
        self.preexisting: set[str] = set()
        self.runs: list[Run] = []
        self.db = self.work / "bot.db"
        self.base_ref = ""
        self.serve_db = self.work / "serve.db"
        self.serve_secret = secrets.token_hex(20)
        self.serve_proc: subprocess.Popen | None = None
        self.serve_port = 0
        self.serve_starts = 0
        self.contestants = [who for who in CONTESTANTS if who in args.contestants.split(",")]
        self.kube = Kube(env) if "kube" in self.contestants else None
        self.kube_ns = f"imagebot-bench-{self.run_id}"
        self.watches: dict[tuple[int, str], dict] = {}  # (rep, case) -> the kube run's pod events

    # -- setup -----------------------------------------------------------------------------------

    def make_base(self) -> None:
        """``<reg>/pb<run>/base:latest``: the shared busybox (by digest) + a random payload per arch."""
        self.docker("login", "-u", self.user, "--password-stdin", self.reg_host, stdin=self.password)
        self.preexisting = set(self.digest_refs())
        _, body = self.registry.get(f"{SHARED_BASE}/manifests/latest", MT_LIST)
        digests = {m["platform"]["architecture"]: m["digest"] for m in json.loads(body)["manifests"]}
        repo = f"{self.reg_host}/{self.prefix}/base"
        for platform in PLATFORMS:
            arch = platform.split("/")[1]
            ctx = self.work / f"base-{arch}"
            ctx.mkdir()
            (ctx / "payload").write_bytes(os.urandom(self.args.base_mb << 20))
            (ctx / "Dockerfile").write_text(
                f"FROM {self.reg_host}/{SHARED_BASE}@{digests[arch]}\nCOPY payload /opt/base-payload\n")
            self.docker("build", "--pull", "--platform", platform, "-t", f"{repo}:{arch}", str(ctx))
            self.docker("push", f"{repo}:{arch}")
        arches = [f"{repo}:{p.split('/')[1]}" for p in PLATFORMS]
        self.docker("manifest", "create", "--insecure", f"{repo}:latest", *arches)
        self.docker("manifest", "push", "--insecure", "--purge", f"{repo}:latest")
        self.base_ref = f"{repo}:latest"
        self.base_ids.update(self._base_ids(f"{self.prefix}/base"))
        say(f"base image {self.base_ref} ({self.args.base_mb} MB payload per arch)")

    def digest_refs(self) -> list[str]:
        refs = self.docker("image", "ls", "--digests", "--format", "{{.Repository}}@{{.Digest}}", check=False).split()
        return [r for r in refs if r.startswith(f"{self.reg_host}/{SHARED_BASE}@sha256:")]

    def _base_ids(self, repository: str) -> list[str]:
        _, body = self.registry.get(f"{repository}/manifests/latest", MT_LIST)
        ids = []
        for m in json.loads(body)["manifests"]:
            _, manifest = self.registry.get(f"{repository}/manifests/{m['digest']}", MT_V2)
            ids.append(json.loads(manifest)["config"]["digest"])
        return ids

    def ours(self) -> list[str]:
        """Every image in the engine built on this run's base images, deepest first.

        They all descend from the bench base (its payload layer is unique to this run), so the
        ``Parent`` chains find them all, the intermediate per-step images of the classic builder
        and the leftovers of a failed build included, and nothing of anyone else's.
        """
        ids = self.docker("image", "ls", "-aq", "--no-trunc", check=False).split()
        if not ids:
            return []
        out = self.docker("image", "inspect", "-f", "{{.Id}} {{.Parent}}", *sorted(set(ids)), check=False)
        parent = dict((line.split() + [""])[:2] for line in out.splitlines() if line.strip())
        found: list[tuple[int, str]] = []
        for image in parent:
            depth, node = 0, parent.get(image, "")
            while node and node not in self.base_ids and depth < 1000:
                node, depth = parent.get(node, ""), depth + 1
            if node in self.base_ids:
                found.append((depth, image))
        return [image for _, image in sorted(found, reverse=True)]

    def purge(self) -> None:
        """Remove every image this run made (and the bench base) from the engine.

        Not ``docker image prune``: the engine is shared (tests may be building on it), and a
        prune can delete another build's intermediate images.
        """
        for _ in range(3):
            doomed = self.ours()
            if doomed:
                self.docker("image", "rm", "-f", *doomed, check=False)
            present = [i for i in sorted(self.base_ids)
                       if self.docker("image", "inspect", "-f", "{{.Id}}", i, check=False).strip()]
            if present:
                self.docker("image", "rm", "-f", *present, check=False)
            if not self.ours() and not [i for i in sorted(self.base_ids) if self.docker(
                    "image", "inspect", "-f", "{{.Id}}", i, check=False).strip()]:
                return
        raise RuntimeError(f"could not remove this run's images from the engine: {self.ours()}")

    def db_upgrade(self) -> None:
        rc, _ = run_bounded([str(ROOT / ".venv/bin/imagebot"), "db", "upgrade"], timeout=120,
                            env=self.bot_env("unused"), cwd=self.work, log=self.work / "imagebot-db.log")
        if rc != 0:
            raise RuntimeError(f"imagebot db upgrade failed; see {self.work / 'imagebot-db.log'}")

    def bot_env(self, namespace: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBOT_") or
               k == "IMAGEBOT_PLATFORM_PARALLELISM"}
        env.update({
            "IMAGEBOT_DATABASE_URL": f"sqlite:///{self.db}",
            "IMAGEBOT_REGISTRY": f"{self.reg_host}/{namespace}",
            "IMAGEBOT_REGISTRY_USERNAME": self.user,
            "IMAGEBOT_REGISTRY_PASSWORD": self.password,
        })
        return env

    # -- one contestant run ----------------------------------------------------------------------

    def plain(self, run: Run, url: str) -> None:
        timings = self.work / f"plain-{run.rep}-{run.case}.tsv"
        log = self.work / f"plain-{run.rep}-{run.case}.log"
        env = {**os.environ, "REGISTRY_USERNAME": self.user, "REGISTRY_PASSWORD": self.password,
               "TIMINGS": str(timings), "PLATFORMS": " ".join(PLATFORMS),
               "STEP_TIMEOUT": str(int(self.args.timeout))}
        image = f"{self.reg_host}/{run.namespace}/acme/app"
        launched = time.time()
        rc, run.wall = run_bounded([str(ROOT / "bench/pipeline/plain.sh"), url, run.sha, image, "main"],
                                   timeout=self.args.timeout, env=env, cwd=self.work, log=log)
        ended = launched + run.wall
        stamped = read_log(log)
        lines = [text for _, text in stamped]
        run.stats = cache_stats(lines)
        if rc != 0:
            run.error = f"exit {rc}: {' / '.join(lines[-3:])}"
            return
        starts = [i for i, (_, text) in enumerate(stamped) if text.startswith("Sending build context")]
        for n, p in enumerate(PLATFORMS[:len(starts)]):
            end = starts[n + 1] if n + 1 < len(starts) else len(stamped)
            for k, v in build_phases(stamped[starts[n]:end]).items():
                run.phases[f"{k} {p}"] = v
        spans = [line.split("\t") for line in timings.read_text().splitlines()] if timings.exists() else []
        if not spans:
            return
        run.steps["start-up"] = float(spans[0][1]) - launched
        for name, start, end in spans:
            run.steps[name] = run.steps.get(name, 0.0) + float(end) - float(start)
        run.steps["exit"] = ended - float(spans[-1][2])
        run.steps["between steps"] = run.wall - sum(run.steps.values())

    def cli_build(self, run: Run, url: str, env: dict[str, str], log: Path) -> tuple[int, float, float]:
        """``imagebot build`` of the run's commit: exit code, launch and end (epoch seconds)."""
        launched = time.time()
        rc, run.wall = run_bounded(
            [str(ROOT / ".venv/bin/imagebot"), "build", url, run.sha, "--platform", ",".join(PLATFORMS)],
            timeout=self.args.timeout, env=env, cwd=self.work, log=log)
        return rc, launched, launched + run.wall

    @staticmethod
    def cli_build_id(run: Run, rc: int, log: Path) -> tuple[int | None, str]:
        """The build id the CLI printed (None, with ``run.error`` set, if it printed none) and
        its whole output."""
        out = "\n".join(text for _, text in read_log(log))
        match = re.search(r"^build (\d+): ", out, re.M)
        if not match:
            run.error = f"exit {rc}, no build id: {out[-300:]}"
            return None, out
        return int(match.group(1)), out

    def cli_steps(self, run: Run, rc: int, out: str, first: dict, launched: float, ended: float) -> bool:
        """Start-up, pipeline and exit steps of a CLI run; False (``run.error`` set) if it failed."""
        if rc != 0:
            run.error = f"exit {rc}: {' / '.join(out.strip().splitlines()[-2:])}"
            return False
        run.steps["start-up"] = first[("build_started", None)][0] - launched
        self.pipeline_steps(run, first)
        run.steps["exit"] = ended - first[("build_succeeded", None)][0]
        return True

    def imagebot(self, run: Run, url: str) -> None:
        log = self.work / f"imagebot-{run.rep}-{run.case}.log"
        rc, launched, ended = self.cli_build(run, url, self.bot_env(run.namespace), log)
        build_id, out = self.cli_build_id(run, rc, log)
        if build_id is not None:
            self.cli_steps(run, rc, out, self.telemetry(run, self.db, build_id), launched, ended)

    def kube_env(self, namespace: str) -> dict[str, str]:
        """The CLI's environment plus the Kubernetes runtime's settings (those of the tests'
        ``k8s_settings``), as admin: this is a benchmark, not the least-privilege test."""
        assert self.kube is not None
        env = self.bot_env(namespace)
        env.update({
            "IMAGEBOT_RUNTIME": "kubernetes",
            "IMAGEBOT_K8S_NAMESPACE": self.kube_ns,
            "IMAGEBOT_K8S_KUBECONFIG": self.kube.kubeconfig,
            "IMAGEBOT_K8S_BUILDER_IMAGE": self.kube.builder_image,
            "IMAGEBOT_K8S_IMAGE_PULL_POLICY": "Never",
            "IMAGEBOT_K8S_HOST_NETWORK": "true",
            "IMAGEBOT_K8S_REGISTRY_TLS_VERIFY": "false",
            "IMAGEBOT_K8S_POLL_SECONDS": "0.2",
        })
        if self.args.kube_layer_cache:  # the kubelet runs on this machine: the node dir is here
            env["IMAGEBOT_K8S_LAYER_CACHE_DIR"] = str(self.work / "kube-layer-cache")
        return env

    def kube_run(self, run: Run, url: str) -> None:
        """``imagebot build`` with the Kubernetes runtime, its pods watched meanwhile."""
        assert self.kube is not None
        log = self.work / f"kube-{run.rep}-{run.case}.log"
        with PodWatch(self.kube, self.kube_ns) as watch:
            rc, launched, ended = self.cli_build(run, url, self.kube_env(run.namespace), log)
        (self.work / f"kube-{run.rep}-{run.case}-pods.json").write_text(json.dumps(
            {"events": watch.events, "logs": watch.logs, "platform": watch.platform}, indent=1))
        if rc != 0:
            self.kube.delete_jobs(self.kube_ns)  # a killed CLI leaves its Jobs running
        build_id, out = self.cli_build_id(run, rc, log)
        if build_id is None:
            return
        first = self.telemetry(run, self.db, build_id)
        conn = sqlite3.connect(self.db)
        try:
            logged = list(conn.execute("SELECT platform, line FROM build_logs WHERE build_id = ? ORDER BY id",
                                       (build_id,)))
        finally:
            conn.close()
        run.stats = kube_stats(logged)
        run.phases = {}
        if not self.cli_steps(run, rc, out, first, launched, ended):
            return
        for p in PLATFORMS:
            slug = p.replace("/", "-")
            pods = [name for name, s in watch.platform.items() if s == slug]
            lines = sorted((line for name in pods for line in watch.logs.get(name, [])), key=lambda x: x[0])
            started = first[("build_platform_started", p)][0]
            created = watch.first(slug, lambda kind, b: kind == "ADDED")
            if created is not None:
                run.phases[f"Job -> pod created {p}"] = created - started
            ph = kube_phases(lines)
            if not ph:
                continue
            if created is not None:
                run.phases[f"pod created -> fetched {p}"] = ph["fetched"] - created
            for k in ("fetch to FROM", "FROM + pull", "heavy RUN", "COPY .. LABEL", "commit (vfs)"):
                run.phases[f"{k} {p}"] = ph[k]
            run.phases[f"build ended -> seen {p}"] = first[("build_platform_succeeded", p)][0] - ph["last line"]
            push = watch.last_state(slug, "push").get("terminated") or {}
            if push.get("startedAt") and push.get("finishedAt"):
                run.phases[f"push container (1 s res.) {p}"] = iso(push["finishedAt"]) - iso(push["startedAt"])
        run.steps["release (after last push)"] = first[("manifest_started", None)][0] - max(
            first[("push_succeeded", p)][0] for p in PLATFORMS)

    @staticmethod
    def telemetry(run: Run, db: Path, build_id: int) -> dict[tuple[str, str | None], tuple[float, dict]]:
        """Read a build's log and events from imagebot's DB: cache stats and build phases go into
        ``run``; returns the first event of each (name, platform) as (epoch ts, data)."""
        conn = sqlite3.connect(db)
        try:
            logged = [(platform, utc(ts), line) for platform, ts, line in conn.execute(
                "SELECT platform, ts, line FROM build_logs WHERE build_id = ? ORDER BY id", (build_id,))]
            events = [(name, platform, utc(ts), json.loads(data)) for name, platform, ts, data in conn.execute(
                "SELECT name, platform, ts, data FROM telemetry_events WHERE build_id = ? ORDER BY id", (build_id,))]
        finally:
            conn.close()
        run.stats = cache_stats([line for _, _, line in logged])
        for p in PLATFORMS:
            for k, v in build_phases([(ts, line) for platform, ts, line in logged if platform == p]).items():
                run.phases[f"{k} {p}"] = v
        first: dict[tuple[str, str | None], tuple[float, dict]] = {}
        for name, platform, ts, data in events:
            first.setdefault((name, platform), (ts, data))
        return first

    @staticmethod
    def pipeline_steps(run: Run, first: dict[tuple[str, str | None], tuple[float, dict]]) -> None:
        """The steps of one imagebot build from its telemetry (the same for the CLI and serve)."""

        def at(name: str, platform: str | None = None) -> float:
            return first[(name, platform)][0]

        def dur(name: str, platform: str | None = None) -> float:
            return float(first[(name, platform)][1]["duration_s"])

        s = run.steps
        s["fetch"] = at("fetch_succeeded") - at("build_started")
        s["config + plan"] = min(at("build_platform_started", p) for p in PLATFORMS) - at("fetch_succeeded")
        for p in PLATFORMS:
            s[f"build {p}"] = dur("build_platform_succeeded", p)
            s[f"tag {p}"] = at("tag_succeeded", p) - at("tag_started", p)
            s[f"push {p}"] = dur("push_succeeded", p)
        s["platforms critical path"] = max(at("push_succeeded", p) for p in PLATFORMS) - min(
            at("build_platform_started", p) for p in PLATFORMS)
        s["manifest"] = at("manifest_published") - at("manifest_started")
        s["pipeline"] = dur("build_succeeded")

    # -- the served contestant -------------------------------------------------------------------

    def serve_env(self) -> dict[str, str]:
        env = self.bot_env("unused")
        env.update({
            "IMAGEBOT_DATABASE_URL": f"sqlite:///{self.serve_db}",
            # the run's prefix; each served commit's .imagebot.yml adds r<rep>s/acme/app below it
            "IMAGEBOT_REGISTRY": f"{self.reg_host}/{self.prefix}",
            "IMAGEBOT_GITHUB_WEBHOOK_SECRET": self.serve_secret,
            "IMAGEBOT_PLATFORMS": ",".join(PLATFORMS),
            "IMAGEBOT_POLL_SECONDS": "0.2",
            # clone URLs must be on the forge's URL: here the run's git server
            "IMAGEBOT_GITHUB_URL": self.forge_url,
        })
        return env

    def http(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 30) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.serve_port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
        except http.client.HTTPException as exc:  # a broken answer counts as a connection error
            raise OSError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else {}
        except ValueError:
            return resp.status, {"raw": raw[:300].decode(errors="replace")}

    def start_serve(self) -> None:
        """One ``imagebot serve`` on a free loopback port, in its own process group; wait until
        ``/healthz`` answers (migrating the new DB is part of that, not of any build)."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.serve_port = sock.getsockname()[1]
        self.serve_starts += 1
        log = open(self.work / f"serve-{self.serve_starts}.log", "ab")
        started = time.monotonic()
        self.serve_proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/imagebot"), "serve", "--port", str(self.serve_port)],
            env=self.serve_env(), cwd=self.work, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        while time.monotonic() - started < 120:
            if self.serve_proc.poll() is not None:
                raise RuntimeError(f"imagebot serve exited with {self.serve_proc.returncode}; "
                                   f"see {self.work}/serve-{self.serve_starts}.log")
            try:
                if self.http("GET", "/healthz", timeout=2)[0] == 200:
                    say(f"imagebot serve on 127.0.0.1:{self.serve_port} (pid {self.serve_proc.pid}), "
                        f"ready after {time.monotonic() - started:.2f}s")
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop_serve()
        raise RuntimeError("imagebot serve did not answer /healthz within 120 s")

    def stop_serve(self) -> None:
        """SIGTERM to the server's process group (a graceful stop), SIGKILL if it lingers."""
        proc, self.serve_proc = self.serve_proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()

    def serve(self, run: Run, url: str) -> None:
        if self.serve_proc is None or self.serve_proc.poll() is not None:
            say("imagebot serve is not running; starting it again")
            self.start_serve()
        payload = json.loads(PUSH_PAYLOAD.read_text())
        payload.update(ref="refs/heads/main", after=run.sha)
        payload["repository"].update(full_name="acme/app", clone_url=url, default_branch="main")
        payload["head_commit"].update(id=run.sha, message=f"bench rep {run.rep} {run.case}")
        body = json.dumps(payload).encode()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": f"bench-{self.run_id}-{run.rep}-{run.case}-{secrets.token_hex(4)}",
            "X-Hub-Signature-256": "sha256=" + hmac.new(self.serve_secret.encode(), body, hashlib.sha256).hexdigest(),
        }
        sent = time.time()
        t0 = time.monotonic()
        deadline = t0 + self.args.timeout
        status, answer = self.http("POST", "/webhooks/github", body, headers)
        answered = time.monotonic() - t0
        build_id = answer.get("build_id")
        if status != 201 or answer.get("outcome") != "queued" or build_id is None:
            run.wall = time.monotonic() - t0
            run.error = f"webhook answered {status}: {answer}"
            return
        state = "queued"
        while True:
            try:
                code, build = self.http("GET", f"/api/builds/{build_id}")
            except OSError as exc:
                code, build = 0, {"error": str(exc)}
            now = time.monotonic()
            state = build.get("status", state) if code == 200 else state
            if state not in ("queued", "running"):
                break
            if now >= deadline or self.serve_proc.poll() is not None:
                run.wall = now - t0
                run.error = (f"timed out after {self.args.timeout:.0f}s" if now >= deadline else
                             f"imagebot serve exited with {self.serve_proc.returncode}") + f" (build {build_id} {state})"
                say(run.error + "; stopping imagebot serve (a new one serves the next run)")
                self.stop_serve()  # the build may still hold the engine; its server goes with it
                return
            time.sleep(POLL_S)
        run.wall = now - t0
        ended = sent + run.wall
        first = self.telemetry(run, self.serve_db, build_id)
        if state != "succeeded":
            run.error = f"build {build_id} {state}: {build.get('error')}"
            return
        run.steps["webhook answered"] = answered
        run.steps["queue pickup"] = first[("build_started", None)][0] - sent
        self.pipeline_steps(run, first)
        run.steps["status seen"] = ended - first[("build_succeeded", None)][0]

    def one(self, rep: int, case: str, who: str, url: str, sha: str, namespace: str) -> Run:
        run = Run(rep, case, who, namespace, sha, load=os.getloadavg()[0])
        say(f"rep {rep} {case:4} {LABELS[who]:14} building {sha[:7]} into {namespace} ...")
        try:
            {"plain": self.plain, "imagebot": self.imagebot, "serve": self.serve, "kube": self.kube_run}[who](run, url)
            if not run.error:
                for tag in (f"sha-{sha[:7]}", "main", "latest"):
                    self.registry.verify(f"{namespace}/acme/app", tag, sha)
                if who == "kube" and self.args.kube_layer_cache:
                    # a cache directory per image repository: each rep's namespace starts cold
                    if case == "cold" and (run.stats["cache_hits"] or run.stats["pulled"] < len(PLATFORMS)):
                        raise AssertionError(f"not cold: {run.stats}")
                    if case == "warm" and run.stats["cache_hits"] < 2 * len(PLATFORMS):  # ARG + heavy RUN
                        raise AssertionError(f"not warm: {run.stats}")
                elif who == "kube":  # a fresh pod has no layer cache: both cases pull and build all
                    if run.stats["cache_hits"] or run.stats["pulled"] < len(PLATFORMS):
                        raise AssertionError(f"not a from-scratch buildah build: {run.stats}")
                elif case == "cold" and (run.stats["cache_hits"] or not run.stats["pulled"]):
                    raise AssertionError(f"not cold: {run.stats}")
                elif case == "warm" and run.stats["cache_hits"] < 2 * len(PLATFORMS):  # ARG + heavy RUN
                    raise AssertionError(f"not warm: {run.stats}")
                run.ok = True
        except (AssertionError, urllib.error.URLError, KeyError, ValueError, OSError) as exc:
            run.error = f"{type(exc).__name__}: {exc}"
        say(f"rep {rep} {case:4} {LABELS[who]:14} {'ok' if run.ok else 'FAILED'} in {run.wall:.2f}s {run.stats}"
            + (f" {run.error}" if run.error else ""))
        self.runs.append(run)
        return run

    def main(self) -> int:
        say(f"run {self.run_id}, work dir {self.work}")
        try:
            self.make_base()
            self.db_upgrade()
            repo = make_repo(self.work / "git", "acme/app",
                             fixture_files(self.base_ref, self.args.work_mb, self.args.rounds))
            if self.kube is not None:
                self.kube.create_namespace(self.kube_ns)
                say(f"Kubernetes namespace {self.kube_ns}, builder {self.kube.builder_image}")
            with GitHTTPServer(self.work / "git") as git:
                url = git.repo_url("acme/app")
                say(f"git repo {url}")
                self.forge_url = git.url
                if "serve" in self.contestants:
                    self.start_serve()
                for rep in range(1, self.args.reps + 1):
                    ns = {who: f"{self.prefix}/r{rep}{NS_LETTER[who]}" for who in CONTESTANTS}
                    # The server's IMAGEBOT_REGISTRY is the run's prefix; a served commit names its
                    # rep's namespace below it in .imagebot.yml, which no other contestant's has.
                    own = {who: {".imagebot.yml": f"image: r{rep}s/acme/app\n" if who == "serve" else None}
                           for who in CONTESTANTS}
                    cold = repo.commit({"app/version.txt": f"{rep}.0.0\n", **own["plain"]}, f"rep {rep}")
                    # serve's cold commit: the same tree plus its .imagebot.yml
                    cold_of = {"plain": cold, "imagebot": cold,
                               "serve": repo.commit(own["serve"], f"rep {rep} serve")}
                    cold_of["kube"] = cold
                    for who in self.contestants:
                        if who != "kube":  # the pods never use the engine; a purge would only
                            self.purge()   # take the warm cache from the Docker runs after it
                        self.one(rep, "cold", who, url, cold_of[who], ns[who])
                    for who in self.contestants:
                        warm = repo.commit({"app/version.txt": f"{rep}.0.1-{who}\n", **own[who]}, f"rep {rep} {who}")
                        self.one(rep, "warm", who, url, warm, ns[who])
        except BaseException:
            say(f"stopped; logs kept in {self.work}")
            raise
        finally:
            try:
                self.stop_serve()
            except Exception as exc:  # noqa: BLE001 - report, keep cleaning up
                say(f"stopping imagebot serve: {exc}")
            if self.kube is not None:
                try:
                    self.kube.delete_namespace(self.kube_ns)
                except Exception as exc:  # noqa: BLE001 - report, keep cleaning up
                    say(f"deleting namespace {self.kube_ns}: {exc}")
            try:
                self.purge()
                for ref in set(self.digest_refs()) - self.preexisting:  # what make_base pulled by digest
                    self.docker("image", "rm", ref, check=False)
            except Exception as exc:  # noqa: BLE001 - report, keep cleaning up
                say(f"cleanup: {exc}")
            shutil.rmtree(self.work / "docker-config", ignore_errors=True)  # holds the registry login
        self.report()
        raw = Path(tempfile.gettempdir()) / f"imagebot-bench-pipeline-{self.run_id}.json"
        raw.write_text(json.dumps([r.__dict__ for r in self.runs], indent=1))
        ok = bool(self.runs) and all(r.ok for r in self.runs)
        if ok and not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
            say(f"raw results: {raw}")
        else:
            say(f"raw results: {raw}; logs kept in {self.work}")
        return 0 if ok else 1

    # -- the report ------------------------------------------------------------------------------

    def report(self) -> None:
        a = self.args

        def med(who: str, case: str) -> float | None:
            walls = [r.wall for r in self.runs if r.ok and r.who == who and r.case == case]
            return statistics.median(walls) if walls else None

        def fmt(value: float | None) -> str:
            return f"{value:.2f}" if value is not None else "-"

        parallelism = os.environ.get("IMAGEBOT_PLATFORM_PARALLELISM", "2 (default)")
        print(f"\n| case | plain docker CLI s | imagebot CLI s | imagebot serve s | CLI/plain | serve/plain "
              f"| runs ok |  (median of {a.reps}; base +{a.base_mb} MB/arch, RUN {a.rounds}x gzip of "
              f"{a.work_mb} MB; IMAGEBOT_PLATFORM_PARALLELISM={parallelism})")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for case in ("cold", "warm"):
            p, b, v = med("plain", case), med("imagebot", case), med("serve", case)
            ok = sum(1 for r in self.runs if r.ok and r.case == case)
            total = sum(1 for r in self.runs if r.case == case)
            ratio_b = f"{b / p:.2f}" if p and b else "-"
            ratio_v = f"{v / p:.2f}" if p and v else "-"
            print(f"| {case} | {fmt(p)} | {fmt(b)} | {fmt(v)} | {ratio_b} | {ratio_v} | {ok}/{total} |")
        if "kube" in self.contestants:
            print("\n| case | imagebot CLI, Docker runtime s | imagebot CLI, Kubernetes runtime s | overhead s "
                  "| k8s/docker | k8s/plain |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for case in ("cold", "warm"):
                p, b, k = med("plain", case), med("imagebot", case), med("kube", case)
                print(f"| {case} | {fmt(b)} | {fmt(k)} | {fmt(k - b) if k and b else '-'} | "
                      f"{f'{k / b:.2f}' if k and b else '-'} | {f'{k / p:.2f}' if k and p else '-'} |")
            print("\n| rep | case | Docker runtime s | Kubernetes runtime s | overhead s | k8s/docker |")
            print("| ---: | --- | ---: | ---: | ---: | ---: |")
            for r in self.runs:
                d = next((x for x in self.runs if x.rep == r.rep and x.case == r.case and x.who == "imagebot"), None)
                if r.who == "kube" and r.ok and d is not None and d.ok:
                    print(f"| {r.rep} | {r.case} | {d.wall:.2f} | {r.wall:.2f} | {r.wall - d.wall:.2f} "
                          f"| {r.wall / d.wall:.2f} |")
        mixed = [r for r in self.runs if r.stats.get("mixups")]
        print("\ntarget: imagebot <= 0.8x the script")
        if self.serve_starts > 1:
            print(f"imagebot serve was started {self.serve_starts} times (after a run that timed out or a crash)")
        if mixed:
            print(f"platform mix-ups (a build got another platform's base image): "
                  f"{', '.join(f'rep {r.rep} {r.case} {LABELS[r.who]}' for r in mixed)}")
        print()

        print("| rep | case | contestant | wall s | load1 | cache hits | layers pulled | pushed | mounted "
              "| platform mix-ups | ok |")
        print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in self.runs:
            st = r.stats
            print(f"| {r.rep} | {r.case} | {LABELS[r.who]} | {r.wall:.2f} | {r.load:.2f} | {st.get('cache_hits', '-')} | "
                  f"{st.get('pulled', '-')} | {st.get('pushed', '-')} | {st.get('mounted', '-')} | "
                  f"{st.get('mixups', '-')} | "
                  f"{'yes' if r.ok else 'NO: ' + r.error[:120]} |")

        rows = ["start-up", "webhook answered", "queue pickup", "login", "fetch", "config + plan"]
        for p in PLATFORMS:
            rows += [f"build {p}", f"Job -> pod created {p}", f"pod created -> fetched {p}", f"fetch to FROM {p}",
                     f"FROM + pull {p}", f"heavy RUN {p}", f"COPY .. LABEL {p}", f"commit (vfs) {p}",
                     f"build ended -> seen {p}", f"tag {p}", f"push {p}", f"push container (1 s res.) {p}"]
        rows += ["platforms critical path", "release (after last push)", "manifest", "pipeline", "exit",
                 "status seen", "between steps"]
        cols = [(who, case) for case in ("cold", "warm") for who in self.contestants]

        def cell(who: str, case: str, row: str) -> str:
            vals = [(r.steps | r.phases)[row] for r in self.runs
                    if r.ok and r.who == who and r.case == case and row in (r.steps | r.phases)]
            return f"{statistics.median(vals):.2f}" if vals else "-"

        print("\n| where the time goes (median s) | " + " | ".join(f"{LABELS[w]} {c}" for w, c in cols) + " |")
        print("| --- |" + " ---: |" * len(cols))
        for row in rows:
            label = f"&nbsp;&nbsp;{row}" if row.split(" linux/")[0] in (
                "FROM + pull", "heavy RUN", "COPY .. LABEL", "Job -> pod created", "pod created -> fetched",
                "fetch to FROM", "commit (vfs)", "build ended -> seen") else row
            if all(cell(w, c, row) == "-" for w, c in cols):
                continue
            print(f"| {label} | " + " | ".join(cell(w, c, row) for w, c in cols) + " |")
        print("| **wall** | " + " | ".join(f"**{fmt(med(w, c))}**" for w, c in cols) + " |")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the 8 runs (default 3)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per contestant run (default 900)")
    parser.add_argument("--base-mb", type=int, default=24, help="random payload per arch in the base image")
    parser.add_argument("--work-mb", type=int, default=16, help="size of the file the heavy RUN makes")
    parser.add_argument("--rounds", type=int, default=6, help="gzip|sha256sum passes over it in the RUN")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, repo, DB) after success")
    parser.add_argument("--kube-layer-cache", action="store_true",
                        help="kube: IMAGEBOT_K8S_LAYER_CACHE_DIR in the work dir (warm runs then hit the cache)")
    parser.add_argument("--contestants", default=",".join(CONTESTANTS),
                        help=f"which to run, comma-separated (default {','.join(CONTESTANTS)})")
    args = parser.parse_args()
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the running contestant is killed and the engine purged
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    return Bench(args).main()


if __name__ == "__main__":
    raise SystemExit(main())
