//! The packages of scripts/package.sh (target/packages/), as a DBA gets them: every major's
//! .deb holds the PGDG layout and depends on its PostgreSQL, every tarball the same files; each
//! major's library loads in that major's server (and not in another's: the check can fail); and
//! the PostgreSQL 15 package, installed with `dpkg -i` on this machine, creates the extension and
//! passes pg_regress files.
//!
//! Ignored in a plain `cargo test`: the packages must be built first. scripts/test.sh runs
//! scripts/package.sh and then these with `--ignored`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use cqrs_e2e::edition::Edition;
use cqrs_e2e::{regress, repo_root};
use cqrs_harness::{ClusterOptions, PgCluster};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The majors scripts/package.sh builds for, with their pg_config (scripts/common.sh).
const MAJORS: [u32; 4] = [15, 16, 17, 18];

fn packages() -> PathBuf {
    repo_root().join("target/packages")
}

fn deb(major: u32) -> PathBuf {
    packages().join(format!("postgresql-{major}-pg-cqrs_{VERSION}_amd64.deb"))
}

fn tarball(major: u32) -> PathBuf {
    packages().join(format!("pg_cqrs-{VERSION}-pg{major}-linux-amd64.tar.gz"))
}

fn output(command: &mut Command) -> Result<String> {
    let out = command.output().with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bindir of a major, from the pg_config scripts/common.sh names for it.
fn bindir(major: u32) -> Result<PathBuf> {
    let script = format!("source scripts/common.sh && \"$(pg_config_for {major})\" --bindir");
    let out = output(
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(repo_root()),
    )?;
    Ok(PathBuf::from(out.trim()))
}

/// The files every package must hold, relative to the extension directory.
fn extension_files() -> Vec<String> {
    vec![
        "pg_cqrs.control".to_owned(),
        format!("pg_cqrs--{VERSION}.sql"),
        "pg_cqrs--0.1.0.sql".to_owned(),
        "pg_cqrs--0.1.0--0.2.0.sql".to_owned(),
    ]
}

#[test]
#[ignore = "needs scripts/package.sh first; scripts/test.sh runs it"]
fn every_major_has_a_deb_and_a_tarball_with_the_files_a_dba_needs() -> Result<()> {
    for major in MAJORS {
        let listing = output(Command::new("dpkg-deb").arg("--contents").arg(deb(major)))?;
        let mut expected = vec![format!("./usr/lib/postgresql/{major}/lib/pg_cqrs.so")];
        expected.extend(
            extension_files()
                .iter()
                .map(|f| format!("./usr/share/postgresql/{major}/extension/{f}")),
        );
        for file in &expected {
            ensure!(
                listing.contains(file.as_str()),
                "{} lacks {file}:\n{listing}",
                deb(major).display()
            );
        }
        let depends = output(
            Command::new("dpkg-deb")
                .args(["--field"])
                .arg(deb(major))
                .arg("Depends"),
        )?;
        ensure!(
            depends.contains(&format!("postgresql-{major}")),
            "postgresql-{major}-pg-cqrs depends on {depends}"
        );

        let listing = output(Command::new("tar").arg("-tzf").arg(tarball(major)))?;
        let top = format!("pg_cqrs-{VERSION}-pg{major}-linux-amd64");
        let mut expected = vec![format!("{top}/lib/pg_cqrs.so"), format!("{top}/INSTALL")];
        expected.extend(extension_files().iter().map(|f| format!("{top}/extension/{f}")));
        for file in &expected {
            ensure!(
                listing.contains(file.as_str()),
                "{} lacks {file}:\n{listing}",
                tarball(major).display()
            );
        }
    }
    Ok(())
}

/// The library of `from`'s tarball, unpacked where the postgres user can read it.
fn library(from: u32, dir: &Path) -> Result<PathBuf> {
    output(
        Command::new("tar")
            .arg("-xzf")
            .arg(tarball(from))
            .arg("-C")
            .arg(dir),
    )?;
    Ok(dir
        .join(format!("pg_cqrs-{VERSION}-pg{from}-linux-amd64"))
        .join("lib/pg_cqrs.so"))
}

#[test]
#[ignore = "needs scripts/package.sh first; scripts/test.sh runs it"]
fn each_majors_library_loads_in_that_majors_server_only() -> Result<()> {
    let dir = cqrs_harness::postgres::tempdir("pg_cqrs-package-libs")?;
    for major in MAJORS {
        let pg = PgCluster::start(ClusterOptions {
            with_extension: false,
            bindir: Some(bindir(major)?),
            ..ClusterOptions::default()
        })?;
        let own = library(major, &dir)?;
        pg.psql(&format!("load '{}'", own.display()))
            .with_context(|| format!("the PostgreSQL {major} library in a PostgreSQL {major} server"))?;
        // and another major's is refused: the check above can fail
        let other = if major == 18 { 15 } else { major + 1 };
        let foreign = library(other, &dir)?;
        ensure!(
            pg.psql(&format!("load '{}'", foreign.display())).is_err(),
            "a PostgreSQL {other} library loaded into PostgreSQL {major}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
#[ignore = "needs scripts/package.sh first; scripts/test.sh runs it"]
fn the_postgresql_15_package_installs_with_dpkg_and_passes_pg_regress() -> Result<()> {
    ensure!(
        cqrs_harness::postgres::pg_major()? == 15,
        "this test installs into the system PostgreSQL 15: run it with PG_CONFIG unset"
    );
    output(Command::new("dpkg").arg("-i").arg(deb(15)))?;
    let status =
        output(Command::new("dpkg-query").args(["-W", "-f=${Status} ${Version}", "postgresql-15-pg-cqrs"]))?;
    ensure!(
        status == format!("install ok installed {VERSION}"),
        "dpkg-query says: {status}"
    );
    regress::run(
        Edition::Extension,
        Some(&["append_basic", "append_idempotency", "project_batch"]),
    )
}
