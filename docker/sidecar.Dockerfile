# cqrs-sidecar: configured entirely by CQRS_* environment variables (see `cqrs-sidecar --help`).
#   docker build -f docker/sidecar.Dockerfile -t pg_cqrs/sidecar .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cqrs-sidecar

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 cqrs
COPY --from=build /src/target/release/cqrs-sidecar /usr/local/bin/cqrs-sidecar
USER cqrs
# 9187: the read API; 9188: /metrics, /healthz, /readyz (CQRS_ADMIN_ADDR, loopback by default)
EXPOSE 9187 9188
HEALTHCHECK --interval=5s --timeout=2s CMD curl -fsS http://127.0.0.1:9188/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/cqrs-sidecar"]
