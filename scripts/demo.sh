#!/usr/bin/env bash
# The demo: a lab cluster from manifests/examples/lab.yaml (nodes and pods
# in network namespaces, each pod attached by the real ocelot-cni through
# its node's agent and dataplane), its pods, the reachability matrix, TCP
# between two pods with iperf3, the dataplane counters; then everything is
# removed, also on failure or Ctrl-C.
set -euo pipefail
BIN=${1:-target/release}
LAB=demo$$
OCELOT="$BIN/ocelot"
export OCELOT_LAB=$LAB
lab() { "$OCELOT" lab "$@"; }

trap 'lab down >/dev/null 2>&1 || true' EXIT
step() { printf '\n==> %s\n' "$*"; }

step "ocelot lab up -f manifests/examples/lab.yaml"
lab up -f manifests/examples/lab.yaml
lab get pods -o wide

step "ocelot lab probe: every pod to every pod, TCP 80 and UDP 81"
lab probe

step "TCP between x/a and x/b (same node) with iperf3, 3 s"
B_IP=$(lab get pods -o json | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d if isinstance(d,list) else d["pods"]; print([p["ip"] for p in d if p["namespace"]=="x" and p["name"]=="b"][0])')
lab exec x/b -- iperf3 -s -1 -D
sleep 0.3
lab exec x/a -- iperf3 -c "$B_IP" -t 3 | grep -E 'sender|receiver'

step "dataplane counters of node-1"
"$BIN/ocelot-dataplane" stats --socket "/run/ocelot-lab/$LAB/nodes/node-1/dp.sock"

step "ocelot lab down"
