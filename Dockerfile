# syntax=docker/dockerfile:1
# shutdown-guard: one static binary on an empty base image. Two ways to build it:
#
#   docker build -t shutdown-guard:0.1.0 .
#       The default: self-contained, compiles the binary (musl) in the build stage below.
#
#   docker build --target prebuilt --build-arg BINARY=shutdown-guard -t shutdown-guard:0.1.0 DIR
#       The same final image around a static binary built beforehand, found at BINARY in the
#       build context DIR. scripts/image.sh does this with buildah from a binary built on the
#       host; it needs no base image, so it also works where no registry can be reached.
#
# The build stage runs exactly:
#   CC_x86_64_unknown_linux_musl=musl-gcc \
#   cargo build --release --locked --target x86_64-unknown-linux-musl -p shutdown-guard --bin shutdown-guard
# (ring compiles C and assembly, hence musl-gcc.) The profile in Cargo.toml (lto, one codegen
# unit, strip, panic=abort, opt-level s) keeps the binary small.

ARG RUST_VERSION=1.95

# What every image is, whichever way its binary was built.
FROM scratch AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="shutdown-guard" \
      org.opencontainers.image.description="Holds a node's shutdown with a systemd-logind delay lock until its KubeVirt VMs have migrated or stopped" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/shutdown-guard" \
      org.opencontainers.image.documentation="https://example.invalid/shutdown-guard/docs/operator-guide.md" \
      org.opencontainers.image.base.name="scratch"
# uid 0, but the DaemonSet drops every capability, forbids privilege escalation and mounts the
# root filesystem read-only. logind lets uid 0 take a delay lock without polkit; a non-root uid
# needs polkitd on the host and a uid the host's dbus-daemon can resolve, which Kubernetes
# nodes do not promise (measured: docs/operator-guide.md, "Why root without capabilities").
USER 0:0
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/shutdown-guard"]
CMD ["run"]

# Around a binary built beforehand. It must be static: the image has no dynamic loader.
FROM runtime AS prebuilt
ARG BINARY=shutdown-guard
COPY ${BINARY} /usr/local/bin/shutdown-guard

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# The registry and target caches survive between builds (BuildKit cache mounts), so a source
# change recompiles only this crate.
COPY . .
# musl-gcc compiles ring's C and assembly only. Linking stays with Rust's default for the
# target (self-contained musl CRT, static PIE): musl-gcc as the linker gives a binary that
# crashes at start.
ENV CC_x86_64_unknown_linux_musl=musl-gcc
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl \
        -p shutdown-guard --bin shutdown-guard \
 && install -D -m 0555 target/x86_64-unknown-linux-musl/release/shutdown-guard /out/shutdown-guard

# The default target (the last stage): the binary from the build stage.
FROM runtime
COPY --from=build /out/shutdown-guard /usr/local/bin/shutdown-guard
