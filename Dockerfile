# The one Backstop binary (sidecar and operator) in a minimal, non-root image.
#
#   docker build -t ghcr.io/backstop/backstop:0.1.0 .
#
# Build stage: a release build with the locked dependencies.
FROM docker.io/library/rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
COPY crds ./crds
RUN cargo build --release --locked --bin backstop \
    && install -D -m 0755 target/release/backstop /out/backstop

# Runtime: distroless (glibc, CA certificates, no shell), as the non-root user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/backstop /usr/local/bin/backstop
USER 65532:65532
EXPOSE 7400 7401 7402 7403 9443
ENTRYPOINT ["/usr/local/bin/backstop"]
CMD ["--help"]
