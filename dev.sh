#!/usr/bin/env bash
# The two commands a newcomer needs, on a fresh Debian machine, as root:
#   ./dev.sh demo   build Ocelot and run the demo (pods in namespaces)
#   ./dev.sh test   build and run every test (unit, then end to end)
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(iproute2 iputils-ping iperf3 python3 sockperf containernetworking-plugins iptables netcat-openbsd ethtool clang libbpf-dev bpftool)

install_deps() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "Ocelot's demo and end-to-end tests create network namespaces and TAP devices: run as root." >&2
        exit 1
    fi
}

case "${1:-}" in
demo)
    install_deps
    cargo build --release --workspace --bins
    exec scripts/demo.sh target/release
    ;;
test)
    install_deps
    cargo build --workspace --bins
    # Unit tests first (fast), then the privileged end-to-end suite, once.
    cargo test --workspace --exclude ocelot-tests
    cargo test -p ocelot-tests -- --test-threads 2
    ;;
*)
    echo "usage: $0 demo|test" >&2
    exit 2
    ;;
esac
