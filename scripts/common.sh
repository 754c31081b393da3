# Shared by the scripts in this directory.
PGRX_VERSION=0.18.1
export PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

step() { printf '\n\033[1;34m▶ %s\033[0m\n' "$*"; }
note() { printf '  %s\n' "$*"; }
die() { printf '\033[1;31m✗ %s\033[0m\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Builds pg_cqrs in release mode and installs it into the system PostgreSQL 15.
install_extension() {
    step "building and installing the pg_cqrs extension into PostgreSQL 15 (release)"
    local sudo_flag=()
    [ "$(id -u)" -eq 0 ] || sudo_flag=(--sudo)
    (cd extension && cargo pgrx install --release --pg-config "$PG_CONFIG" "${sudo_flag[@]}")
    install_release_scripts "$PG_CONFIG"
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
    scripts/setup.sh
    install_extension
    step "building cqrs-bench and cqrs-sidecar (release)"
    cargo build --release -p cqrs-bench -p cqrs-sidecar
    export CQRS_SIDECAR_BIN="$PWD/target/release/cqrs-sidecar"
}
