# syntax=docker/dockerfile:1
# The host agent, `hostagent`. Build from the repository root:
#
#   docker build -f deploy/docker/hostagent.Dockerfile -t switchboard-hostagent .
#
# Configured by flags or HOSTAGENT_* variables (hostagent-client/src/bin/hostagent.rs): at least
# HOSTAGENT_ENDPOINT (http://…: the agent dials plaintext HTTP/2), HOSTAGENT_HOST_ID, HOSTAGENT_REGION and
# HOSTAGENT_CREDENTIAL (`switchboard host-credential --host-id ID`). On EC2 hosts the agent runs from the
# AMI under systemd instead (deploy/hostagent.service); this image is for containers (deploy/compose.yaml).
# deploy/check.sh runs this file's cargo commands (dev profile) and checks what the runtime stage copies.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo build --release --locked -p hostagent-client --bin hostagent

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin switchboard
COPY --from=builder /src/target/release/hostagent /usr/local/bin/hostagent
USER 10001:10001
# No HEALTHCHECK: the agent serves nothing locally. It reconnects by itself (with backoff) and exits
# non-zero only on a fatal error, which the container's restart policy handles.
# The first SIGTERM says goodbye and tears mandelboxes down, a second one exits at once.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/hostagent"]
