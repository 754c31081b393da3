# PostgreSQL 15 with pg_cqrs. The build stage runs what scripts/common.sh's install_extension
# runs (cargo pgrx, pinned to the version the scripts install); the image is the official one.
#   docker build -f docker/postgres.Dockerfile -t pg_cqrs/postgres .
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-common gnupg \
 && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
 && apt-get install -y --no-install-recommends postgresql-server-dev-15 clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-pgrx --version 0.18.1 --locked \
 && cargo pgrx init --pg15 /usr/lib/postgresql/15/bin/pg_config
WORKDIR /src
COPY . .
RUN cd extension && cargo pgrx package --pg-config /usr/lib/postgresql/15/bin/pg_config --out-dir /pkg

FROM postgres:15-bookworm
COPY --from=build /pkg/usr/ /usr/
COPY sql/examples/ /opt/pg_cqrs/examples/
COPY docker/initdb/ /docker-entrypoint-initdb.d/
# the sidecar streams a logical replication slot
CMD ["postgres", "-c", "wal_level=logical", "-c", "max_replication_slots=10", "-c", "max_wal_senders=10"]
