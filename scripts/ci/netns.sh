#!/usr/bin/env bash
# Network namespaces as cluster "machines" on one host, for the multi-node test (tests/test_multinode.py).
# Usage (as root):
#   bash scripts/ci/netns.sh up TAG NET N   # N namespaces TAGn1..TAGnN on a bridge TAGbr: the host has NET.1/24,
#                                           # namespace i has NET.(i+1)/24 on its eth0 (and lo up), e.g.
#                                           #   up hc12ab 10.77.0 2  ->  host 10.77.0.1, nodes 10.77.0.2, 10.77.0.3
#   bash scripts/ci/netns.sh down TAG       # kill every process left in TAG's namespaces (by pid), delete them,
#                                           # the bridge, the veth pairs and the firewall rule; idempotent
# Run a command on "machine" i:  ip netns exec TAGn<i> COMMAND
#
# TAG is at most 9 characters (Linux interface names: 15). Where bridged frames go through iptables
# (br_netfilter with net.bridge.bridge-nf-call-iptables=1, as on a host running Docker, whose FORWARD
# policy is DROP), traffic between the namespaces would be dropped: `up` inserts one ACCEPT rule for
# the bridge (FORWARD -i TAGbr -o TAGbr) and `down` deletes it. Nothing else on the host is changed.
set -Eeuo pipefail

die() { echo "netns.sh: $*" >&2; exit 2; }

check_tag() {
  [[ $1 =~ ^[a-z][a-z0-9]{0,8}$ ]] || die "TAG must be 1-9 lowercase letters/digits, starting with a letter: '$1'"
}

firewall_rule() {  # the rule's arguments for iptables -I / -C / -D
  echo "FORWARD -i ${1}br -o ${1}br -j ACCEPT -m comment --comment hetcomp-netns"
}

up() {
  local tag=$1 net=$2 n=$3 i ns
  check_tag "$tag"
  [[ $net =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "NET must be three octets, e.g. 10.77.0: '$net'"
  [[ $n =~ ^[1-9]$ ]] || die "N must be 1-9: '$n'"
  if ip link show "${tag}br" >/dev/null 2>&1 || ip netns list | grep -qE "^${tag}n[0-9]+( |$)"; then
    die "TAG $tag is in use (bash scripts/ci/netns.sh down $tag removes it)"
  fi
  trap 'down "$tag" >/dev/null 2>&1 || true' ERR   # a half-made setup is removed
  ip link add "${tag}br" type bridge
  ip addr add "${net}.1/24" dev "${tag}br"
  ip link set "${tag}br" up
  for ((i = 1; i <= n; i++)); do
    ns="${tag}n$i"
    ip netns add "$ns"
    ip link add "${tag}h$i" type veth peer name "${tag}p$i"
    ip link set "${tag}h$i" master "${tag}br"
    ip link set "${tag}h$i" up
    ip link set "${tag}p$i" netns "$ns"
    ip -n "$ns" link set "${tag}p$i" name eth0
    ip -n "$ns" addr add "${net}.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "${net}.1"
  done
  if command -v iptables >/dev/null && iptables -S FORWARD >/dev/null 2>&1; then
    # shellcheck disable=SC2046
    iptables -I $(firewall_rule "$tag")
  fi
  trap - ERR
  echo "netns.sh: up $tag: host ${net}.1, namespaces ${tag}n1..${tag}n$n at ${net}.2..${net}.$((n + 1))"
}

down() {
  local tag=$1 ns pids
  check_tag "$tag"
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^${tag}n[0-9]+$" || true); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [[ -n $pids ]]; then
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
      for _ in $(seq 50); do [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break; sleep 0.1; done
    fi
    ip netns delete "$ns" 2>/dev/null || true   # its end of the veth pair goes with it, and so the pair
  done
  for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${tag}(h[0-9]+|br)$" || true); do
    ip link delete "$link" 2>/dev/null || true
  done
  if command -v iptables >/dev/null; then
    # shellcheck disable=SC2046
    while iptables -C $(firewall_rule "$tag") 2>/dev/null; do iptables -D $(firewall_rule "$tag"); done
  fi
  echo "netns.sh: down $tag"
}

case "${1:-}" in
  up) [[ $# == 4 ]] || die "usage: netns.sh up TAG NET N"; up "$2" "$3" "$4" ;;
  down) [[ $# == 2 ]] || die "usage: netns.sh down TAG"; down "$2" ;;
  *) die "usage: netns.sh up TAG NET N | down TAG" ;;
esac
