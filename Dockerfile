# Presence: a two-stage image.
#   build   - compiles the `presence` binary with the pinned Rust toolchain.
#   runtime - distroless cc (glibc + libgcc + CA certificates, no shell, no
#             package manager), running the binary as a numeric non-root user.
#
#   docker build -t presence:dev .
#   docker run --rm -p 50051:50051 -p 9090:9090 presence:dev
#
# Configuration is by environment variables only (PRESENCE_*, RUST_LOG); see
# the README. Without PRESENCE_REDIS_URL the service uses its in-memory store,
# which is correct for one process only.

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
# Pinned to a full toolchain version and to bookworm, so that the glibc the
# binary links against matches the runtime image (distroless cc-debian12 is
# bookworm). rust:*-slim already carries gcc and libc6-dev, and build.rs uses
# protox (pure Rust), so no apt-get and no system protoc are needed.
FROM rust:1.95.0-slim-bookworm AS build

WORKDIR /src

# 1. Dependency layer. Only the manifests, the build script and the protos go
#    in first, with a stub main.rs and lib.rs (Cargo.toml has a [lib]
#    section, so cargo wants the file): this layer (every crate in Cargo.lock,
#    compiled) is reused for as long as those files do not change, so editing
#    src/ rebuilds only the presence crate itself.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin presence \
    && rm -rf src

# 2. The real sources. COPY keeps the files' original mtimes, which can be
#    older than the stub's build artefacts; touching them makes sure cargo
#    sees the change and recompiles the crate instead of shipping the stub.
COPY src ./src
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin presence \
    && cp target/release/presence /presence

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
# :nonroot runs as uid/gid 65532. The numeric USER below repeats it so that
# Kubernetes' runAsNonRoot can verify it without resolving a user name.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime

LABEL org.opencontainers.image.title="presence" \
      org.opencontainers.image.description="Who's online, over gRPC, on Redis" \
      org.opencontainers.image.licenses="MIT"

COPY --from=build /presence /usr/local/bin/presence

# The service's own defaults, spelled out so that `docker inspect` shows them.
# Everything else (PRESENCE_REDIS_URL, PRESENCE_TICK_INTERVAL, ...) is left to
# the deployment.
ENV PRESENCE_LISTEN=0.0.0.0:50051 \
    PRESENCE_METRICS_LISTEN=0.0.0.0:9090

# gRPC (with the grpc.health.v1 health service and server reflection).
EXPOSE 50051
# Prometheus metrics, GET /metrics.
EXPOSE 9090

USER 65532:65532

# No HEALTHCHECK: the image has no shell or probe tool to run one, and
# Kubernetes probes the gRPC health service natively (see helm/presence).
# On SIGTERM the service reports NOT_SERVING, drains for up to
# PRESENCE_SHUTDOWN_GRACE (default 10s) and exits 0; the exec-form
# ENTRYPOINT makes the binary PID 1, so it receives that signal directly.
ENTRYPOINT ["/usr/local/bin/presence"]
