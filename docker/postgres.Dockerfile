# PostgreSQL with pg_cqrs, installed from the project's own Debian package — the file a DBA
# installs (scripts/package.sh writes target/packages/postgresql-<major>-pg-cqrs_<v>_amd64.deb):
#
#   scripts/package.sh
#   docker build -f docker/postgres.Dockerfile --build-arg PG_MAJOR=15 -t pg_cqrs/postgres:15 .
#   docker build -f docker/postgres.Dockerfile --build-arg PG_MAJOR=18 -t pg_cqrs/postgres:18 .
#
# BASE is the official image of that major by default (its entrypoint initialises the data
# directory and runs docker/initdb/); the tests pass a stand-in made from Debian's packages.
ARG PG_MAJOR=15
ARG BASE=postgres:${PG_MAJOR}-bookworm
FROM ${BASE}
ARG PG_MAJOR
COPY target/packages/postgresql-${PG_MAJOR}-pg-cqrs_*_amd64.deb /tmp/
RUN dpkg -i /tmp/postgresql-${PG_MAJOR}-pg-cqrs_*_amd64.deb && rm -f /tmp/*.deb
COPY sql/examples/ /opt/pg_cqrs/examples/
COPY docker/initdb/ /docker-entrypoint-initdb.d/
# the sidecar streams a logical replication slot
CMD ["postgres", "-c", "wal_level=logical", "-c", "max_replication_slots=10", "-c", "max_wal_senders=10", "-c", "shared_preload_libraries=pg_cqrs"]
