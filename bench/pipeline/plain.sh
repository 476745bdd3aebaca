#!/usr/bin/env bash
# The "plain docker CLI" contestant of bench/pipeline: what a hand-written CI script does for a
# two-platform image, every step in sequence, with the same inputs imagebot uses:
#   git fetch of exactly SHA (shallow, like imagebot) -> per platform: docker build --pull
#   --platform P (classic builder, the same build args and labels imagebot passes) -> docker tag
#   -> docker push -> then one manifest list per tag (docker manifest create/push --insecure).
#
#   usage: REGISTRY_USERNAME=u REGISTRY_PASSWORD=p bench/pipeline/plain.sh GIT_URL SHA IMAGE [BRANCH]
#     IMAGE   e.g. 127.0.0.1:5001/ns/acme/app (per-platform tags sha-<7>-linux-<arch>, list tags
#             BRANCH, sha-<7> and latest: the tags imagebot publishes for a default-branch push)
#   env: PLATFORMS (default "linux/amd64 linux/arm64"), TIMINGS (file: "step<TAB>start<TAB>end"
#        lines, epoch seconds), STEP_TIMEOUT (seconds per command, default 600).
# Logs in with a temporary DOCKER_CONFIG (removed at exit); ~/.docker is never read or written.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 GIT_URL SHA IMAGE [BRANCH]" >&2; exit 2; }
git_url=$1 sha=$2 image=$3 branch=${4:-main}
: "${REGISTRY_USERNAME:?set REGISTRY_USERNAME}" "${REGISTRY_PASSWORD:?set REGISTRY_PASSWORD}"
platforms=${PLATFORMS:-linux/amd64 linux/arm64}
timings=${TIMINGS:-/dev/null}
t=${STEP_TIMEOUT:-600}
export DOCKER_BUILDKIT=0   # the 20.10 engine has no BuildKit; the 28.x CLI needs this for build

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export DOCKER_CONFIG=$work/docker-config
mkdir -p "$DOCKER_CONFIG"

step() {  # step NAME CMD...: run CMD, append its start/end to $TIMINGS, stop on failure
  local name=$1 start rc=0
  shift
  start=$EPOCHREALTIME
  "$@" || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$start" "$EPOCHREALTIME" >>"$timings"
  [ "$rc" = 0 ] || { echo "plain: step $name failed (exit $rc)" >&2; exit "$rc"; }
}
bounded() { timeout "$t" "$@"; }  # every external command is bounded

registry=${image%%/*}
short=${sha:0:7}

login() { printf %s "$REGISTRY_PASSWORD" | bounded docker login -u "$REGISTRY_USERNAME" --password-stdin "$registry" >/dev/null 2>&1; }
step login login

fetch() {  # the exact commit, one commit deep, in an isolated git config (as imagebot fetches)
  local g=(env GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null GIT_TERMINAL_PROMPT=0
           GIT_CONFIG_COUNT=2 GIT_CONFIG_KEY_0=protocol.version GIT_CONFIG_VALUE_0=2
           GIT_CONFIG_KEY_1=advice.detachedHead GIT_CONFIG_VALUE_1=false)
  bounded "${g[@]}" git init -q "$work/src" &&
  bounded "${g[@]}" git -C "$work/src" fetch -q --depth 1 --no-tags "$git_url" "$sha" &&
  bounded "${g[@]}" git -C "$work/src" checkout -q --detach "$sha"
}
step fetch fetch

case $(uname -m) in x86_64|amd64) build_arch=amd64 ;; aarch64|arm64) build_arch=arm64 ;; *) build_arch=$(uname -m) ;; esac
created=$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)
pushed=()
for platform in $platforms; do
  IFS=/ read -r os arch variant <<<"$platform"
  tag=sha-$short-$os-$arch${variant:+-$variant}
  step "build $platform" bounded docker build --pull --platform "$platform" --rm --force-rm \
    --iidfile "$work/iid" \
    --build-arg "TARGETPLATFORM=$platform" --build-arg "TARGETOS=$os" \
    --build-arg "TARGETARCH=$arch" --build-arg "TARGETVARIANT=${variant:-}" \
    --build-arg "BUILDPLATFORM=linux/$build_arch" --build-arg "BUILDOS=linux" \
    --build-arg "BUILDARCH=$build_arch" --build-arg "BUILDVARIANT=" \
    --label "org.opencontainers.image.source=${git_url%.git}" \
    --label "org.opencontainers.image.revision=$sha" \
    --label "org.opencontainers.image.created=$created" \
    "$work/src"
  step "tag $platform" bounded docker tag "$(cat "$work/iid")" "$image:$tag"
  step "push $platform" bounded docker push "$image:$tag"
  pushed+=("$image:$tag")
done

# the manifest list, under every tag imagebot publishes for this push
list_tags=("$branch" "sha-$short")
[ "$branch" = main ] && list_tags+=(latest)
manifest() {
  local tag
  for tag in "${list_tags[@]}"; do
    bounded docker manifest create --insecure --amend "$image:$tag" "${pushed[@]}" >/dev/null &&
    bounded docker manifest push --insecure --purge "$image:$tag" >/dev/null || return 1
  done
}
step manifest manifest
echo "plain: pushed ${list_tags[*]} over ${pushed[*]}"
