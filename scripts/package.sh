#!/usr/bin/env bash
# Builds what a DBA installs, for every PostgreSQL major in PG_MAJORS, into target/packages/:
#
#   postgresql-<major>-pg-cqrs_<version>_amd64.deb   Debian package in the PGDG layout
#                                                    (/usr/lib/postgresql/<major>/lib,
#                                                    /usr/share/postgresql/<major>/extension),
#                                                    depending on postgresql-<major>
#   pg_cqrs-<version>-pg<major>-linux-amd64.tar.gz   lib/ and extension/ with an INSTALL note,
#                                                    for any PostgreSQL <major> on x86_64 Linux
#
# Each holds the extension's library, its control file, the install script of this release,
# the frozen install scripts of earlier releases and every upgrade script (ALTER EXTENSION
# pg_cqrs UPDATE). Built from `cargo pgrx package` output. Run scripts/setup.sh first (it
# installs the majors); scripts/test.sh builds and tests the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || die "no version in Cargo.toml"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian's dpkg)"
out=target/packages
rm -rf "$out"
mkdir -p "$out"

for major in "${PG_MAJORS[@]}"; do
    pg_config=$(pg_config_for "$major")
    [ -x "$pg_config" ] || die "no PostgreSQL $major at $pg_config: run scripts/setup.sh"
    step "packaging pg_cqrs $version for PostgreSQL $major"
    built=target/pgrx-package/pg$major
    rm -rf "$built"
    (cd extension && cargo pgrx package --pg-config "$pg_config" --out-dir "../$built")
    library=$(find "$built" -name 'pg_cqrs.so' | head -n 1)
    control=$(find "$built" -name 'pg_cqrs.control' | head -n 1)
    install_sql=$(find "$built" -name "pg_cqrs--$version.sql" | head -n 1)
    [ -n "$library" ] && [ -n "$control" ] && [ -n "$install_sql" ] \
        || die "cargo pgrx package left no library, control file or install script in $built"

    # the files, laid out once, copied into both packages
    files=$(mktemp -d)
    mkdir -p "$files/lib" "$files/extension"
    install -m 755 "$library" "$files/lib/pg_cqrs.so"
    install -m 644 "$control" "$install_sql" sql/releases/pg_cqrs--*.sql "$files/extension/"

    deb=$(mktemp -d)
    name=postgresql-$major-pg-cqrs
    install -d "$deb/DEBIAN" "$deb/usr/lib/postgresql/$major/lib" \
        "$deb/usr/share/postgresql/$major/extension" "$deb/usr/share/doc/$name"
    cp -p "$files"/lib/* "$deb/usr/lib/postgresql/$major/lib/"
    cp -p "$files"/extension/* "$deb/usr/share/postgresql/$major/extension/"
    install -m 644 LICENSE "$deb/usr/share/doc/$name/copyright" 2>/dev/null \
        || printf 'pg_cqrs %s\nLicense: Apache-2.0\n' "$version" > "$deb/usr/share/doc/$name/copyright"
    cat > "$deb/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: amd64
Maintainer: pg_cqrs developers <pg-cqrs@users.noreply.github.com>
Depends: postgresql-$major, libc6 (>= 2.36), libgcc-s1
Section: database
Priority: optional
Homepage: https://github.com/pg-cqrs/pg_cqrs
Description: CQRS inside PostgreSQL $major (extension pg_cqrs)
 Idempotent, sequenced, JSON-Schema-validated command append and set-based
 projections into read-model tables, inside the database.
 CREATE EXTENSION pg_cqrs; ALTER EXTENSION pg_cqrs UPDATE upgrades in place.
CONTROL
    dpkg-deb --root-owner-group --build "$deb" "$out/${name}_${version}_amd64.deb" >/dev/null

    tarball=pg_cqrs-$version-pg$major-linux-amd64
    mkdir -p "$files/$tarball"
    mv "$files/lib" "$files/extension" "$files/$tarball/"
    cat > "$files/$tarball/INSTALL" <<INSTALL
pg_cqrs $version for PostgreSQL $major (x86_64 Linux, glibc 2.36 or later)

Copy the files where your server looks for them, then create the extension:

    cp lib/pg_cqrs.so         "\$(pg_config --pkglibdir)/"
    cp extension/pg_cqrs*     "\$(pg_config --sharedir)/extension/"
    psql -c 'create extension pg_cqrs'           # a new install
    psql -c 'alter extension pg_cqrs update'     # an upgrade from an earlier release

pg_config must be the one of your PostgreSQL $major. On Debian and Ubuntu with the PGDG
packages, the .deb of the same release does this: dpkg -i postgresql-$major-pg-cqrs_${version}_amd64.deb
INSTALL
    tar -czf "$out/$tarball.tar.gz" -C "$files" "$tarball"
    rm -rf "$files" "$deb"
    note "$out/${name}_${version}_amd64.deb, $out/$tarball.tar.gz"
done
