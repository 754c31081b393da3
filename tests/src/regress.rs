//! The pg_regress runner of the suite in `pgrx-tests/`, against both editions: the extension (installed with
//! `cargo pgrx install`) and the portable edition (target/portable, built by
//! scripts/portable.sh, installed by a role that is not a superuser but owns the database and
//! may create roles — the managed-PostgreSQL admin). Every file in `pgrx-tests/sql` runs against
//! both and must produce the same output; what legitimately differs lives in
//! `pgrx-tests/<edition>/` (its own sql/, expected/ and schedule). Each file installs pg_cqrs with
//! `\ir install.sql`, which this runner writes per edition. On failure the diffs are printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use cqrs_harness::edition::Edition;
use cqrs_harness::{ClusterOptions, PgCluster};

use crate::repo_root;

/// The role that installs the portable edition, as on RDS: owns the database, CREATEROLE, no
/// superuser.
use cqrs_harness::edition::ADMIN as INSTALLER;
const DATABASE: &str = "cqrs_regress";

/// The portable install script's body (between its markers): what `psql -f` runs, without the
/// guard, the transaction settings and ON_ERROR_STOP, which a test file must keep its own of.
fn portable_body() -> Result<String> {
    cqrs_harness::edition::build_portable()?;
    let script = std::fs::read_to_string(repo_root().join("target/portable/pg_cqrs.sql"))?;
    let start = script
        .find("-- pg_cqrs body begins")
        .context("no body marker in target/portable/pg_cqrs.sql")?;
    let end = script
        .find("-- pg_cqrs body ends")
        .context("no body end marker in target/portable/pg_cqrs.sql")?;
    Ok(script[start..end].to_owned())
}

/// `call pg_temp.cqrs_set(name, value)`: changes a pg_cqrs setting for the rest of the test's
/// transaction, the edition's way — the extension's are settings (`cqrs.<name>`), the portable
/// edition's a row only its installer may change (`cqrs_portable.settings`).
const SETTING_HELPER: [&str; 2] = [
    "create procedure pg_temp.cqrs_set(name text, value text) language sql \
     as $$ select pg_catalog.set_config('cqrs.' || name, value, true) $$;\n",
    "create procedure pg_temp.cqrs_set(name text, value text) language plpgsql \
     as $$ begin execute pg_catalog.format('update cqrs_portable.settings set %I = %L', name, value); end $$;\n",
];

fn install_scripts(edition: Edition) -> Result<(String, String)> {
    Ok(match edition {
        Edition::Extension => (
            format!(
                "\\set ECHO none\ncreate extension pg_cqrs;\n{}\\set ECHO all\n",
                SETTING_HELPER[0]
            ),
            "\\set ECHO none\ndrop extension pg_cqrs cascade;\n\\set ECHO all\n".to_owned(),
        ),
        Edition::Portable => (
            format!(
                "\\set ECHO none\n\
                 select pg_catalog.current_setting('client_min_messages') as cqrs_saved_messages \\gset\n\
                 set client_min_messages = warning;\n\
                 set role {INSTALLER};\n{}\nreset role;\n{}\
                 set client_min_messages = :'cqrs_saved_messages';\n\\set ECHO all\n",
                portable_body()?,
                SETTING_HELPER[1]
            ),
            "\\set ECHO none\nset client_min_messages = warning;\ndrop schema cqrs, cqrs_portable cascade;\nreset client_min_messages;\n\\set ECHO all\n".to_owned(),
        ),
    })
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    if !from.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

fn schedule(edition: Edition, only: Option<&[&str]>) -> Result<String> {
    if let Some(files) = only {
        return Ok(files.iter().map(|f| format!("test: {f}\n")).collect());
    }
    let mut schedule = std::fs::read_to_string(repo_root().join("pgrx-tests/schedule"))?;
    let own = repo_root()
        .join("pgrx-tests")
        .join(edition.name())
        .join("schedule");
    if own.exists() {
        schedule.push_str(&std::fs::read_to_string(own)?);
    }
    Ok(schedule)
}

/// Runs the suite (or `only` those files) against `edition`, on a private cluster of the
/// PostgreSQL the tests run against (see [`cqrs_harness::postgres::pg_config`]); the extension
/// edition must be installed in that PostgreSQL.
pub fn run(edition: Edition, only: Option<&[&str]>) -> Result<()> {
    let cluster = PgCluster::start(ClusterOptions {
        with_extension: false,
        ..Default::default()
    })?;
    cluster.psql_in("postgres", &format!("create role {INSTALLER} login createrole"))?;
    cluster.psql_in(
        "postgres",
        &format!("create database {DATABASE} owner {INSTALLER}"),
    )?;
    let pkglibdir = cqrs_harness::postgres::pg_config_value("--pkglibdir")?;
    let pg_regress = Path::new(&pkglibdir).join("pgxs/src/test/regress/pg_regress");
    let bindir = cqrs_harness::postgres::pg_bindir()?;

    // the working directory: install.sql for \ir, and sql/ (the repository's) for the examples
    let work = cqrs_harness::postgres::tempdir(&format!("pg_cqrs-regress-{}", edition.name()))?;
    let (install, uninstall) = install_scripts(edition)?;
    std::fs::write(work.join("install.sql"), install)?;
    std::fs::write(work.join("uninstall.sql"), uninstall)?;
    std::os::unix::fs::symlink(repo_root().join("sql"), work.join("sql"))?;
    let input = work.join("input");
    for part in ["sql", "expected"] {
        copy_dir(&repo_root().join("pgrx-tests").join(part), &input.join(part))?;
        copy_dir(
            &repo_root().join("pgrx-tests").join(edition.name()).join(part),
            &input.join(part),
        )?;
    }
    std::fs::write(input.join("schedule"), schedule(edition, only)?)?;
    let output: PathBuf = work.join("output");
    std::fs::create_dir_all(&output)?;
    cqrs_harness::process::chown_to_postgres(&output).ok();
    let status = Command::new(&pg_regress)
        .current_dir(&work)
        .arg(format!("--bindir={}", bindir.display()))
        .arg(format!("--inputdir={}", input.display()))
        .arg(format!("--outputdir={}", output.display()))
        .arg(format!("--schedule={}", input.join("schedule").display()))
        .args(["--host=127.0.0.1", "--user=postgres", "--use-existing"])
        .arg(format!("--dbname={DATABASE}"))
        .arg(format!("--port={}", cluster.port()))
        .status()?;
    if !status.success() {
        let diffs = std::fs::read_to_string(output.join("regression.diffs")).unwrap_or_default();
        bail!(
            "pg_regress against the {} edition failed ({status}); results in {}:\n{diffs}",
            edition.name(),
            output.display()
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
