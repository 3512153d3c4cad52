# syntax=docker/dockerfile:1
# keygate's container image: the `keygate` proxy and the `auditlog` CLI, built in a Rust image and
# run from a distroless one (glibc and CA certificates only: no shell, no package manager) as the
# unprivileged user 65532 (`nonroot`).
#
#   docker build -t keygate:0.1.0 .
#   docker run --rm keygate:0.1.0 --help
#
# The Helm chart runs `keygate serve --config /etc/keygate/config/keygate.yaml` with a read-only
# root filesystem; the only writable places are its volumes (/var/lib/keygate for the write-ahead
# log, /tmp). Pin both base images by digest in your own build pipeline.

# Debian 12 for both stages: the binaries link the glibc they run with.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keygate -p keygate-auditlog --bins \
 && install -D -m 0755 target/release/keygate /out/bin/keygate \
 && install -D -m 0755 target/release/auditlog /out/bin/auditlog \
 && install -d -m 0750 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bin/ /usr/local/bin/
# The data folder, owned by the runtime user (the image has no shell to create it).
COPY --from=build --chown=65532:65532 /out/data /var/lib/keygate
USER 65532:65532
WORKDIR /var/lib/keygate
# Proxy, then admin (/healthz, /readyz, /metrics).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["serve", "--config", "/etc/keygate/config/keygate.yaml"]
