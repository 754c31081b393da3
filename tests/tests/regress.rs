//! Runs the pg_regress suite in `pgrx-tests/` against a private cluster with the installed
//! extension. On failure the regression diffs are printed.

use std::process::Command;

use cqrs_e2e::repo_root;
use cqrs_harness::{ClusterOptions, PgCluster};

#[test]
fn pg_regress_suite_passes() -> anyhow::Result<()> {
    let cluster = PgCluster::start(ClusterOptions {
        with_extension: false,
        ..Default::default()
    })?;
    let pg_config =
        std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let pkglibdir = String::from_utf8(Command::new(&pg_config).arg("--pkglibdir").output()?.stdout)?;
    let pg_regress = std::path::Path::new(pkglibdir.trim()).join("pgxs/src/test/regress/pg_regress");
    let bindir = cqrs_harness::postgres::pg_bindir()?;
    let inputdir = repo_root().join("pgrx-tests");
    let outputdir = cqrs_harness::postgres::tempdir("pg_cqrs-regress")?;
    // run from the repository root: the tests include files such as sql/examples/orders.sql
    let status = Command::new(&pg_regress)
        .current_dir(repo_root())
        .arg(format!("--bindir={}", bindir.display()))
        .arg(format!("--inputdir={}", inputdir.display()))
        .arg(format!("--outputdir={}", outputdir.display()))
        .arg(format!("--schedule={}", inputdir.join("schedule").display()))
        .args(["--host=127.0.0.1", "--user=postgres", "--dbname=cqrs_regress"])
        .arg(format!("--port={}", cluster.port()))
        .status()?;
    if !status.success() {
        let diffs = std::fs::read_to_string(outputdir.join("regression.diffs")).unwrap_or_default();
        panic!(
            "pg_regress failed ({status}); results in {}:\n{diffs}",
            outputdir.display()
        );
    }
    let _ = std::fs::remove_dir_all(&outputdir);
    Ok(())
}
