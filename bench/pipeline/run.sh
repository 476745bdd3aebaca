#!/usr/bin/env bash
# Pipeline benchmark: the same two-platform (linux/amd64 + linux/arm64 under QEMU) build, push
# and manifest list through `imagebot build` and through bench/pipeline/plain.sh (the docker
# CLI doing the steps in sequence), alternated in one run (script cold, imagebot cold, script
# warm, imagebot warm) and repeated. Prints Markdown tables: median wall times and the ratio for
# cold and warm, every run (with its cache and layer counts and verification), and where each
# contestant's time goes (imagebot's from its telemetry events). Loopback only (git over HTTP
# from the tests' stand-in, the scripts/infra registry on 127.0.0.1:5001); every contestant run
# is bounded by --timeout and killed with its process group after it.
#   usage: bench/pipeline/run.sh [--reps 3] [--timeout 900] [--base-mb 24] [--work-mb 16] [--rounds 6]
# Leaves behind: registry blobs under <registry>/pb<run>/ (~200 MB per run of 3 reps; reset with
# `scripts/infra down` and removing the state dir), raw results in $TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/bootstrap
scripts/infra up docker registry binfmt base-image
export DOCKER_BUILDKIT=0
exec .venv/bin/python bench/pipeline/bench.py "$@"
