//! The two editions of pg_cqrs, installed the way their users install them: the extension with
//! `CREATE EXTENSION` (a superuser), the portable edition with `psql -f` by the database's owner,
//! a role that may create roles but is not a superuser (the managed-PostgreSQL admin). Tests that
//! must hold for both take an [`Edition`].

use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::postgres::{quote_ident, ClusterOptions, PgCluster};
use crate::repo_root;

/// The managed-PostgreSQL admin that installs the portable edition.
pub const ADMIN: &str = "managed_admin";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edition {
    Extension,
    Portable,
}

impl Edition {
    pub fn name(self) -> &'static str {
        match self {
            Edition::Extension => "extension",
            Edition::Portable => "portable",
        }
    }
}

/// Builds target/portable/ (scripts/portable.sh), once per process: tests run in parallel
/// threads, and one rewriting the files while another's psql reads them would race.
pub fn build_portable() -> Result<()> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| portable_script(&[]).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Runs scripts/portable.sh with extra environment (`PORTABLE_OUT`, `PORTABLE_UPGRADES`).
pub fn portable_script(env: &[(&str, &std::path::Path)]) -> Result<()> {
    let mut command = Command::new(repo_root().join("scripts/portable.sh"));
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().context("running scripts/portable.sh")?;
    ensure!(
        out.status.success(),
        "scripts/portable.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `psql -v ON_ERROR_STOP=1 -1 -f <file>` as `user` (a path relative to the repository, or
/// absolute); (success, stdout + stderr).
pub fn psql_file(pg: &PgCluster, user: &str, database: &str, file: &str) -> Result<(bool, String)> {
    let out = Command::new(pg.bindir().join("psql"))
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-1",
            "-h",
            "127.0.0.1",
            "-U",
            user,
        ])
        .arg("-p")
        .arg(pg.port().to_string())
        .arg("-d")
        .arg(database)
        .arg("-f")
        .arg(repo_root().join(file))
        .output()
        .context("running psql")?;
    Ok(crate::process::success_and_output(&out))
}

/// A psql script (its backslash commands included: `\gexec`) run as `user` from standard input,
/// each statement on its own as psql runs them, stopping at the first error; (success, stdout +
/// stderr).
pub fn psql_script(pg: &PgCluster, user: &str, script: &str) -> Result<(bool, String)> {
    use std::io::Write;
    let mut child = Command::new(pg.bindir().join("psql"))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", user])
        .arg("-p")
        .arg(pg.port().to_string())
        .arg("-d")
        .arg(pg.database())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running psql")?;
    child
        .stdin
        .take()
        .context("psql's standard input")?
        .write_all(script.as_bytes())
        .context("writing psql's script")?;
    let out = child.wait_with_output().context("waiting for psql")?;
    Ok(crate::process::success_and_output(&out))
}

/// Installs the portable edition into `database` as `user`, with `psql -1 -f` as its users do.
pub fn install_portable(pg: &PgCluster, user: &str, database: &str) -> Result<()> {
    build_portable()?;
    let (ok, output) = psql_file(pg, user, database, "target/portable/pg_cqrs.sql")?;
    ensure!(ok, "installing the portable edition as {user} failed:\n{output}");
    // the log's partitions, as with the extension (PgCluster's create_database says why)
    pg.psql_in(database, "select count(*) from cqrs.maintain()")?;
    Ok(())
}

/// A private cluster whose database has `edition` installed. The portable edition is installed
/// by [`ADMIN`], who owns the database.
pub fn cluster(edition: Edition, options: ClusterOptions) -> Result<PgCluster> {
    let pg = PgCluster::start(ClusterOptions {
        with_extension: edition == Edition::Extension,
        ..options
    })?;
    if edition == Edition::Portable {
        build_portable()?;
        pg.psql_in(
            "postgres",
            &format!(
                "create role {ADMIN} login createrole; alter database {} owner to {ADMIN}",
                quote_ident(pg.database())
            ),
        )?;
        install_portable(&pg, ADMIN, pg.database())?;
    }
    Ok(pg)
}

/// The URL of `user` on the cluster's database.
pub fn url_as(pg: &PgCluster, user: &str) -> String {
    format!("postgres://{user}@127.0.0.1:{}/{}", pg.port(), pg.database())
}

/// Who creates read models: the extension's superuser, or the portable edition's admin (the
/// tables' owner, as create_projection requires).
pub fn owner_url(pg: &PgCluster, edition: Edition) -> String {
    match edition {
        Edition::Extension => pg.url(),
        Edition::Portable => url_as(pg, ADMIN),
    }
}

/// The role the sidecar logs in as on a portable-edition database: what an operator creates on
/// managed PostgreSQL (`REPLICATION`, or `rds_replication` on RDS, and `cqrs_projector`).
pub const SIDECAR_ROLE: &str = "sidecar";

/// The URL the sidecar connects with: the superuser on the extension's cluster, a
/// non-superuser [`SIDECAR_ROLE`] (created here) on the portable edition's.
pub fn sidecar_url(pg: &PgCluster, edition: Edition) -> Result<String> {
    Ok(match edition {
        Edition::Extension => pg.url(),
        Edition::Portable => {
            pg.psql(&format!(
                "create role {SIDECAR_ROLE} login replication in role cqrs_projector"
            ))?;
            url_as(pg, SIDECAR_ROLE)
        }
    })
}
