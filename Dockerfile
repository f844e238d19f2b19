# syntax=docker/dockerfile:1
#
# Coffer: one image, one binary; the subcommand picks the process.
#
#   docker build -t coffer .
#   docker run --rm -p 8080:8080 -e COFFER_NATS_URL=nats://host.docker.internal:4222 \
#     -e COFFER_HTTP_ADDR=0.0.0.0:8080 coffer writer
#   docker run --rm -p 8081:8081 -v coffer-reader:/data -e COFFER_DATA_DIR=/data \
#     -e COFFER_NATS_URL=... -e COFFER_HTTP_ADDR=0.0.0.0:8081 coffer reader
#
# The listen addresses default to 127.0.0.1 (see the contract): set COFFER_HTTP_ADDR
# to 0.0.0.0:PORT in a container. The reader needs a writable COFFER_DATA_DIR volume.

FROM rust:1.95-bookworm AS builder
WORKDIR /app
# The whole workspace (see .dockerignore): every member must be present for cargo to
# load the workspace, and --locked builds exactly what Cargo.lock pins.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo build --release --locked -p coffer

# glibc, libgcc and CA certificates, no shell; Debian 12 like the builder, so the
# binary's glibc requirement is met.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /app/target/release/coffer /usr/local/bin/coffer
# distroless `nonroot` (uid/gid 65532). Numeric so that Kubernetes runAsNonRoot can
# verify it without a runAsUser.
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["coffer"]
