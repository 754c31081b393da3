# cqrs-sidecar, from its release binary, on the smallest runtime that works: the binary, the C
# libraries it links (glibc, libgcc_s, zlib for librdkafka; TLS is rustls with built-in roots, so
# no OpenSSL and no CA bundle), a passwd entry for its non-root user, and nothing else — no
# shell, no package manager.
# Configured entirely by CQRS_* environment variables (cqrs-sidecar --help).
#
#   cargo build --release -p cqrs-sidecar
#   docker build -f docker/sidecar.Dockerfile -t pg_cqrs/sidecar .
#
# BASE is only where those libraries come from: the official Debian image by default; the tests
# pass one made with debootstrap (scripts/docker-base.sh), as can anyone without Docker Hub.
ARG BASE=debian:bookworm-slim
FROM ${BASE} AS runtime
COPY target/release/cqrs-sidecar /out/usr/local/bin/cqrs-sidecar
RUN set -eu; \
    for lib in $(ldd /out/usr/local/bin/cqrs-sidecar | awk '$2 == "=>" { print $3 } $1 ~ /^\// { print $1 }'); do \
        mkdir -p "/out$(dirname "$lib")"; cp -L "$lib" "/out$lib"; \
    done; \
    mkdir -p /out/etc; \
    echo 'cqrs:x:10001:10001:cqrs-sidecar:/nonexistent:/sbin/nologin' > /out/etc/passwd; \
    echo 'cqrs:x:10001:' > /out/etc/group

FROM scratch
COPY --from=runtime /out/ /
USER 10001:10001
# 9187: the read API; 9188: /metrics, /healthz, /readyz (CQRS_ADMIN_ADDR, loopback by default)
EXPOSE 9187 9188
# ready: leading and streaming, or a standby while some sidecar leads (the binary probes itself:
# there is no curl in the image)
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s \
    CMD ["/usr/local/bin/cqrs-sidecar", "probe", "http://127.0.0.1:9188/readyz"]
ENTRYPOINT ["/usr/local/bin/cqrs-sidecar"]
