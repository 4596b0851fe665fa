# syntax=docker/dockerfile:1
# The Switchboard control plane, `switchboard serve`. Build from the repository root:
#
#   docker build -f deploy/docker/server.Dockerfile -t switchboard-server .
#
# protoc is vendored by proto/build.rs (protoc-bin-vendored): nothing to install for it.
# deploy/check.sh runs this file's cargo commands (dev profile) and checks what the runtime stage copies.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo build --release --locked -p switchboard-server --bin switchboard

# Same Debian release as the builder, so the binary's glibc matches.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin switchboard
COPY --from=builder /src/target/release/switchboard /usr/local/bin/switchboard
# listen = "0.0.0.0:7400" and JSON logs; replaced by the Kubernetes ConfigMap.
COPY deploy/docker/switchboard.toml /etc/switchboard/switchboard.toml
ENV SWITCHBOARD_CONFIG=/etc/switchboard/switchboard.toml
USER 10001:10001
# gRPC, gRPC-web, grpc.health.v1, reflection and plain HTTP (/healthz, /fleet) on one port.
EXPOSE 7400
# No curl in the image: bash's /dev/tcp asks GET /healthz (HTTP/1.1 is served on the same port).
# Kubernetes ignores this and uses its native gRPC probes (deploy/kubernetes/deployment.yaml).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7400 && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && grep -qx ok <&3"]
# The first SIGTERM drains (shutdown_grace_ms), a second one exits at once.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchboard"]
CMD ["serve"]
