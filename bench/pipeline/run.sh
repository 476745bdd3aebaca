#!/usr/bin/env bash
# Pipeline benchmark: the same two-platform (linux/amd64 + linux/arm64 under QEMU) build, push
# and manifest list through `imagebot build` (the CLI), through the CLI with
# IMAGEBOT_RUNTIME=kubernetes (a Job per platform on the scripts/k8s cluster), through
# `imagebot serve` (one server for the whole run; each build is a signed GitHub push webhook, timed until /api/builds/{id} shows
# it succeeded) and through bench/pipeline/plain.sh (the docker CLI doing the steps in
# sequence), alternated in one run (script, CLI, serve, CLI-k8s cold; then the same warm) and
# repeated. Prints Markdown tables: median wall times and the CLI/script and serve/script ratios
# for cold and warm, every run (with its cache and layer counts and verification), and where
# each contestant's time goes (imagebot's from its telemetry events, the served build's queue
# pickup included). Loopback only (git over HTTP from the tests' stand-in, the scripts/infra
# registry on 127.0.0.1:5001, the server on a free 127.0.0.1 port); every contestant run is
# bounded by --timeout (the CLI and script are killed with their process group after it; a
# served build that overruns takes its server down with it, and a new server takes over).
#   usage: bench/pipeline/run.sh [--reps 3] [--timeout 900] [--base-mb 24] [--work-mb 16] [--rounds 6] [--keep] [--kube-layer-cache]
#                                [--contestants plain,imagebot,serve,kube]
# Leaves behind: registry blobs under <registry>/pb<run>/ (~350 MB per run of 3 reps; reset with
# `scripts/infra down` and removing the state dir), raw results in $TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/bootstrap
scripts/infra up docker registry binfmt base-image
# the Kubernetes-runtime contestant needs the scripts/k8s cluster (idempotent; ~1 s when it is up)
case " $* " in
  *" --contestants "*|*" --contestants="*) if [[ "$*" == *kube* ]]; then scripts/k8s up; fi ;;
  *) scripts/k8s up ;;
esac
export DOCKER_BUILDKIT=0
exec .venv/bin/python bench/pipeline/bench.py "$@"
