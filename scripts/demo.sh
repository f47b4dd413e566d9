#!/usr/bin/env bash
# Demo: one node namespace running ocelot-dataplane, two pod namespaces
# whose eth0 are TAPs owned by it; ping, TCP and UDP between them and the
# node, then the counters. Everything is removed on exit, also on failure.
set -euo pipefail
BIN=${1:-target/release}
DP="$BIN/ocelot-dataplane"
P=ocdemo$$
NODE=$P-node A=$P-a B=$P-b
DIR=$(mktemp -d /tmp/ocelot-demo.XXXXXX)
SOCK=$DIR/dp.sock

cleanup() {
    for ns in $A $B $NODE; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$DIR"
}
trap cleanup EXIT

step() { printf '\n==> %s\n' "$*"; }

step "node namespace $NODE (192.0.2.1) running ocelot-dataplane, pool 10.65.0.0/16"
for ns in $NODE $A $B; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$NODE" addr add 192.0.2.1/32 dev lo
ip netns exec "$NODE" "$DP" run --state-dir "$DIR" --socket "$SOCK" --pool 10.65.0.0/16 2>"$DIR/dataplane.log" &
disown
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done

step "attaching pods a (10.65.0.2) and b (10.65.0.3): TAP eth0, /32, default via 169.254.1.1"
"$DP" endpoint add --socket "$SOCK" --name "${P}a" --netns "/var/run/netns/$A" --ip 10.65.0.2 --configure >/dev/null
"$DP" endpoint add --socket "$SOCK" --name "${P}b" --netns "/var/run/netns/$B" --ip 10.65.0.3 --configure >/dev/null
ip -n "$A" -br addr show eth0; ip -n "$A" route

step "ping pod a -> pod b, pod a -> node, node -> pod b"
ip netns exec "$A" ping -c 2 -W 1 10.65.0.3 | tail -1
ip netns exec "$A" ping -c 2 -W 1 192.0.2.1 | tail -1
ip netns exec "$NODE" ping -c 2 -W 1 10.65.0.3 | tail -1

step "TCP, pod a -> pod b (iperf3, 3 s)"
ip netns exec "$B" iperf3 -s -1 -D
sleep 0.3
ip netns exec "$A" iperf3 -c 10.65.0.3 -t 3 | grep -E 'sender|receiver'

step "UDP, pod a -> pod b (iperf3, 100 Mbit/s, 2 s)"
ip netns exec "$B" iperf3 -s -1 -D
sleep 0.3
ip netns exec "$A" iperf3 -u -b 100M -c 10.65.0.3 -t 2 | grep -E 'receiver'

step "dataplane counters (ocelot-dataplane stats)"
"$DP" stats --socket "$SOCK"
