# syntax=docker/dockerfile:1
# The Ocelot image: `ocelot` (agent, controller, install-cni, status),
# `ocelot-dataplane` and `ocelot-cni`, on Debian slim with iproute2 and the
# standard CNI plugins chained after ocelot (portmap, bandwidth).
#
#   docker build -t ghcr.io/ocelot-net/ocelot:0.1.0 .
#
# The tag must match the image in manifests/ocelot.yaml (a test checks it
# against the workspace version).

ARG DEBIAN=bookworm

# ---- build -------------------------------------------------------------
FROM rust:1-slim-${DEBIAN} AS builder
# clang and the BPF headers compile the uplink's XDP program (dataplane/build.rs).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        clang libbpf-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache the registry and the target directory between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p ocelot-control -p ocelot-dataplane -p ocelot-cni-shim --bins \
 && mkdir -p /out \
 && cp target/release/ocelot target/release/ocelot-dataplane target/release/ocelot-cni /out/

# ---- run ---------------------------------------------------------------
FROM debian:${DEBIAN}-slim
# iproute2: for operators in the pod (ip, ss); containernetworking-plugins:
# /usr/lib/cni/{portmap,bandwidth}, which `ocelot install-cni
# --chained-plugins-from=/usr/lib/cni` copies to nodes lacking them.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iproute2 containernetworking-plugins ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/ /usr/local/bin/
LABEL org.opencontainers.image.title="ocelot" \
      org.opencontainers.image.description="Kubernetes network plugin with a user-space dataplane" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT []
CMD ["ocelot", "--help"]
