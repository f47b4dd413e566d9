#!/usr/bin/env bash
# The two commands a newcomer needs, on a fresh Debian machine, as root:
#   ./dev.sh demo   build Ocelot and run the demo (pods in namespaces)
#   ./dev.sh test   build and run every test (unit, then end to end)
#   ./dev.sh deps   only install what the two need (Debian packages, and the
#                   Python venv that validates the manifests offline)
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(iproute2 iputils-ping iperf3 python3 python3-venv sockperf containernetworking-plugins iptables ipset netcat-openbsd socat ethtool clang libbpf-dev bpftool)

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
    install_python_deps
}

# The manifests' offline validation (control/tests/manifests.rs) runs
# kubernetes-validate (Kubernetes' schemas, 1.30 and newer) and jsonschema
# (custom resources against their CRD). A venv under the user's cache, not
# the system's site-packages: Debian 12+ refuses `pip install` there.
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/ocelot/venv"
PY_PACKAGES=("kubernetes-validate==1.37.0" "jsonschema>=4.18" "pyyaml>=6")

install_python_deps() {
    if "$VENV/bin/python3" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
        return
    fi
    echo "==> installing ${PY_PACKAGES[*]} into $VENV"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
}

case "${1:-}" in
deps)
    install_deps
    ;;
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
    echo "usage: $0 demo|test|deps" >&2
    exit 2
    ;;
esac
