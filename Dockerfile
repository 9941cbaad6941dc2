# syntax=docker/dockerfile:1
# walden's image: built in a Rust image, run from a distroless one as a non-root user.
#   docker build -t walden .
#   docker run --rm -v $PWD/walden.toml:/etc/walden/walden.toml walden

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target directory are build caches: only the binary leaves this stage.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin walden \
    && cp target/release/walden /walden

# glibc, CA certificates (object stores, verify-full TLS to Postgres), no shell, user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /walden /usr/local/bin/walden
USER 65532:65532
# /metrics, /healthz, /readyz when [metrics] listen = "0.0.0.0:9187".
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/walden"]
CMD ["run", "--config", "/etc/walden/walden.toml"]
