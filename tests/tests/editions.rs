//! The portable edition installed the ways managed PostgreSQL allows — `psql -f` by a database
//! owner with CREATEROLE who is not a superuser (the RDS master user), and as a pg_tle extension —
//! and its catalog against the extension edition's: the same tables, columns, constraints,
//! indexes, function signatures and attributes, comments and grants; only function bodies differ.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use cqrs_e2e::edition::{build_portable, portable_script, psql_file, ADMIN};
use cqrs_e2e::{catalog, catalog_differences, connect, repo_root};
use cqrs_harness::postgres::{pg_config_value, pg_major};
use cqrs_harness::{ClusterOptions, PgCluster};

/// A release after this one, made up for the tests: its upgrade script only moves
/// `cqrs.version()`, which is what shows that the release step ran.
const NEXT: &str = "9.9.9";

/// Builds the portable edition with a made-up upgrade step to [`NEXT`] into a directory of its
/// own (target/portable-next), as a later release's scripts/portable.sh would.
/// Built under `target/portable-next/<test>`: each test its own, since the tests run at once and
/// one would rewrite the script the other's psql is reading.
fn build_with_a_next_release(test: &str) -> Result<PathBuf> {
    let root = repo_root().join("target/portable-next").join(test);
    let upgrades = root.join("upgrades");
    std::fs::create_dir_all(&upgrades)?;
    std::fs::write(
        upgrades.join(format!("pg_cqrs--{}--{NEXT}.sql", env!("CARGO_PKG_VERSION"))),
        "create or replace function cqrs.version(out version text, out edition text)
returns record
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select '@VERSION@'::text, 'portable'::text $$;
",
    )?;
    let out = root.join("out");
    portable_script(&[("PORTABLE_OUT", &out), ("PORTABLE_UPGRADES", &upgrades)])?;
    Ok(out)
}

async fn installed_version(client: &tokio_postgres::Client) -> Result<String> {
    Ok(client
        .query_one("select version from cqrs.version()", &[])
        .await?
        .get(0))
}

fn admin_database(pg: &PgCluster, database: &str) -> Result<()> {
    pg.psql_in("postgres", &format!("create database {database} owner {ADMIN}"))?;
    Ok(())
}

async fn admin_url(pg: &PgCluster, database: &str) -> Result<tokio_postgres::Client> {
    connect(&format!("postgres://{ADMIN}@127.0.0.1:{}/{database}", pg.port())).await
}

/// What the portable edition must do once installed, whichever way: append, register a schema
/// and validate against it, project.
async fn smoke(client: &tokio_postgres::Client) -> Result<()> {
    client
        .batch_execute(
            "select cqrs.register_command_type('T', '{\"type\": \"object\", \"required\": [\"n\"]}');
             create table public.totals (stream text primary key, n integer not null default 0, rev bigint not null default 0);
             select cqrs.create_projection('totals', 'public.totals', 'stream', '{\"T\": {\"action\": \"upsert\", \"add\": {\"n\": \"$.n\"}}}');
             select cqrs.append(cqrs.uuid_v7(), 's', 'T', '{\"n\": 2}');
             select cqrs.append(cqrs.uuid_v7(), 's', 'T', '{\"n\": 3}');
             select count(*) from cqrs.catch_up();",
        )
        .await?;
    let total: i32 = client
        .query_one("select n from public.totals where stream = 's'", &[])
        .await?
        .get(0);
    ensure!(total == 5, "the projection holds {total}, not 5");
    let refused = client
        .query("select cqrs.append(cqrs.uuid_v7(), 's', 'T', '{}')", &[])
        .await
        .err()
        .and_then(|e| e.code().map(|c| c.code().to_owned()));
    ensure!(
        refused.as_deref() == Some("22023"),
        "a payload breaking its schema: {refused:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_owner_installs_the_portable_edition_with_psql_and_it_matches_the_extension() -> Result<()>
{
    build_portable()?;
    let pg = PgCluster::start(ClusterOptions {
        with_extension: false,
        ..ClusterOptions::default()
    })?;
    pg.psql_in("postgres", &format!("create role {ADMIN} login createrole"))?;
    admin_database(&pg, "portable")?;
    pg.psql_in("postgres", "create database extension")?;
    pg.psql_in("extension", "create extension pg_cqrs")?;

    let (ok, output) = psql_file(&pg, ADMIN, "portable", "target/portable/pg_cqrs.sql")?;
    ensure!(ok, "psql -f as {ADMIN} (no superuser) failed:\n{output}");
    let client = admin_url(&pg, "portable").await?;
    let row = client
        .query_one("select version, edition from cqrs.version()", &[])
        .await?;
    let (version, edition): (String, String) = (row.get(0), row.get(1));
    ensure!(
        edition == "portable" && version == env!("CARGO_PKG_VERSION"),
        "cqrs.version() says {version} {edition}"
    );
    let superuser: bool = client
        .query_one("select rolsuper from pg_roles where rolname = current_user", &[])
        .await?
        .get(0);
    ensure!(
        !superuser,
        "the installer must not be a superuser for this test to mean anything"
    );

    // running it again changes nothing and says why
    let (ok, output) = psql_file(&pg, ADMIN, "portable", "target/portable/pg_cqrs.sql")?;
    ensure!(
        !ok && output.contains("is already installed"),
        "a second run: ok={ok}\n{output}"
    );

    let extension = connect(&pg.url_for("extension")).await?;
    let differences = catalog_differences(
        ("in the extension edition", &catalog(&extension, false).await?),
        ("in the portable edition", &catalog(&client, false).await?),
    );
    if !differences.is_empty() {
        bail!(
            "the editions' catalogs differ in {} places (bodies aside):\n{}",
            differences.len(),
            differences.join("\n")
        );
    }
    smoke(&client).await
}

/// A psql install moves to the next release with that release's upgrade script, which refuses
/// to run twice or on any other version and changes nothing then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psql_install_upgrades_with_the_release_upgrade_script() -> Result<()> {
    let build = build_with_a_next_release("psql_install")?;
    let pg = PgCluster::start(ClusterOptions {
        with_extension: false,
        ..ClusterOptions::default()
    })?;
    pg.psql_in("postgres", &format!("create role {ADMIN} login createrole"))?;
    admin_database(&pg, "app")?;
    let file = |name: &str| build.join(name).to_string_lossy().into_owned();
    let (ok, output) = psql_file(&pg, ADMIN, "app", &file("pg_cqrs.sql"))?;
    ensure!(ok, "installing with psql failed:\n{output}");
    let client = admin_url(&pg, "app").await?;
    smoke(&client).await?;
    let upgrade = file(&format!("pg_cqrs--{}--{NEXT}.sql", env!("CARGO_PKG_VERSION")));
    let (ok, output) = psql_file(&pg, ADMIN, "app", &upgrade)?;
    ensure!(ok, "the upgrade script failed:\n{output}");
    ensure!(
        installed_version(&client).await? == NEXT,
        "the upgrade did not run"
    );
    let total: i32 = client
        .query_one("select n from public.totals where stream = 's'", &[])
        .await?
        .get(0);
    ensure!(
        total == 5,
        "the read model holds {total} after the upgrade, not 5"
    );

    let (ok, output) = psql_file(&pg, ADMIN, "app", &upgrade)?;
    ensure!(
        !ok && output.contains("which is not what this database has"),
        "running the upgrade again: ok={ok}\n{output}"
    );
    ensure!(
        installed_version(&client).await? == NEXT,
        "a refused upgrade changed the version"
    );
    Ok(())
}

/// The major Debian packages plpgsql_check for.
const PLPGSQL_CHECK_MAJOR: u32 = 15;

/// The major scripts/setup.sh builds pg_tle for (its source builds against Debian's PostgreSQL).
const PG_TLE_MAJOR: u32 = 15;

/// The pg_tle library of this machine's PostgreSQL, if it is installed (scripts/setup.sh builds it
/// from the pg_tle source when the source is there).
fn pg_tle_installed() -> Result<bool> {
    Ok(PathBuf::from(pg_config_value("--pkglibdir")?)
        .join("pg_tle.so")
        .exists())
}

/// A copy of this machine's PostgreSQL without pg_cqrs's library and control file: a server like
/// a managed one, on which only pg_tle can make pg_cqrs an extension (pg_tle refuses a name that a
/// control file already uses). Debian's PostgreSQL finds its share and lib directories relative
/// to its binaries, so a copy of both trees runs as is. Kept under target/ and reused.
fn server_without_the_extension() -> Result<PathBuf> {
    let ask = |flag: &str| -> Result<PathBuf> { Ok(PathBuf::from(pg_config_value(flag)?)) };
    let (bindir, sharedir, pkglibdir) = (ask("--bindir")?, ask("--sharedir")?, ask("--pkglibdir")?);
    let root = repo_root().join("target/pg-without-pg_cqrs");
    let inside = |path: &PathBuf| root.join(path.strip_prefix("/").unwrap_or(path));
    if !root.join("ready").exists() {
        let _ = std::fs::remove_dir_all(&root);
        for tree in [
            bindir.parent().context("bindir has no parent")?.to_path_buf(),
            sharedir.clone(),
        ] {
            let target = inside(&tree);
            std::fs::create_dir_all(target.parent().context("no parent")?)?;
            let copied = Command::new("cp").arg("-a").arg(&tree).arg(&target).status()?;
            ensure!(copied.success(), "copying {} failed", tree.display());
        }
        for entry in std::fs::read_dir(inside(&sharedir).join("extension"))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with("pg_cqrs") {
                std::fs::remove_file(entry.path())?;
            }
        }
        let _ = std::fs::remove_file(inside(&pkglibdir).join("pg_cqrs.so"));
        std::fs::write(root.join("ready"), "")?;
    }
    Ok(inside(&bindir))
}

/// Where the pg_tle source would be (scripts/setup.sh: $PG_TLE_SOURCE or ../shared/vendor).
fn pg_tle_source() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PG_TLE_SOURCE") {
        return Some(PathBuf::from(path));
    }
    let vendor = repo_root().join("../shared/vendor");
    std::fs::read_dir(vendor)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pg_tle-"))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portable_edition_installs_as_a_pg_tle_extension() -> Result<()> {
    if pg_major()? != PG_TLE_MAJOR {
        eprintln!(
            "SKIPPED on PostgreSQL {}: scripts/setup.sh builds pg_tle for PostgreSQL {PG_TLE_MAJOR}, where scripts/test.sh runs this test",
            pg_major()?
        );
        return Ok(());
    }
    if !pg_tle_installed()? {
        match pg_tle_source() {
            Some(source) => bail!(
                "pg_tle is not installed although its source is at {}: run scripts/setup.sh",
                source.display()
            ),
            None => {
                eprintln!("SKIPPED: no pg_tle source (../shared/vendor/pg_tle-*.tar.gz or $PG_TLE_SOURCE) and no pg_tle installed");
                return Ok(());
            }
        }
    }
    let build = build_with_a_next_release("pg_tle")?;
    let pg = PgCluster::start(ClusterOptions {
        with_extension: false,
        settings: vec!["shared_preload_libraries = 'pg_tle'".to_owned()],
        bindir: Some(server_without_the_extension()?),
        ..ClusterOptions::default()
    })?;
    pg.psql_in("postgres", &format!("create role {ADMIN} login createrole"))?;
    admin_database(&pg, "tle")?;
    pg.psql_in(
        "tle",
        &format!("create extension pg_tle; grant pgtle_admin to {ADMIN}"),
    )?;
    let (ok, output) = psql_file(
        &pg,
        ADMIN,
        "tle",
        &build.join("pg_cqrs--pgtle.sql").to_string_lossy(),
    )?;
    ensure!(ok, "registering pg_cqrs with pg_tle failed:\n{output}");
    let client = admin_url(&pg, "tle").await?;
    client
        .batch_execute("create extension pg_cqrs")
        .await
        .context("create extension pg_cqrs (pg_tle)")?;
    let row = client
        .query_one(
            "select v.version, v.edition, e.extversion from cqrs.version() v, pg_extension e where e.extname = 'pg_cqrs'",
            &[],
        )
        .await?;
    let (version, edition, extversion): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    ensure!(
        edition == "portable" && version == extversion && version == env!("CARGO_PKG_VERSION"),
        "pg_tle install: cqrs.version() {version} {edition}, extension {extversion}"
    );
    let available: i64 = client
        .query_one(
            "select count(*) from pgtle.available_extension_versions() where name = 'pg_cqrs'",
            &[],
        )
        .await?
        .get(0);
    ensure!(available >= 1, "pg_tle does not list pg_cqrs");
    smoke(&client).await?;
    dump_and_restore_with_pg_tle(&pg, &client).await?;
    // a later release's update path, registered by the same file, is what ALTER EXTENSION takes
    client
        .batch_execute(&format!("alter extension pg_cqrs update to '{NEXT}'"))
        .await
        .context("alter extension pg_cqrs update (pg_tle update path)")?;
    let extversion: String = client
        .query_one(
            "select extversion from pg_extension where extname = 'pg_cqrs'",
            &[],
        )
        .await?
        .get(0);
    let version = installed_version(&client).await?;
    ensure!(
        version == NEXT && extversion == NEXT,
        "after the update: cqrs.version() {version}, extension {extversion}"
    );
    let appended: i64 = client
        .query_one("select count(*) from cqrs.command_log", &[])
        .await?
        .get(0);
    ensure!(appended == 2, "the update lost commands: {appended} left of 2");
    // and it goes as an extension goes (schema cqrs itself stays, as with the extension edition:
    // CREATE EXTENSION made it for the control file's schema)
    client.batch_execute("drop extension pg_cqrs cascade").await?;
    let left: i64 = client
        .query_one(
            "select (select count(*) from pg_proc where pronamespace = 'cqrs'::regnamespace)
                  + (select count(*) from pg_class where relnamespace = 'cqrs'::regnamespace)
                  + (to_regnamespace('cqrs_portable') is not null)::int",
            &[],
        )
        .await?
        .get(0);
    ensure!(left == 0, "drop extension left {left} objects behind");
    Ok(())
}

/// `pg_dump` of a pg_tle install, restored whole with `psql -1 -v ON_ERROR_STOP=1` (the restore
/// stopped at the settings' row before: CREATE EXTENSION had made one), keeps the settings and
/// the log; the projection, whose writer names its table by oid, goes on once rebound.
async fn dump_and_restore_with_pg_tle(pg: &PgCluster, client: &tokio_postgres::Client) -> Result<()> {
    client
        .batch_execute("update cqrs_portable.settings set max_json_depth = 33")
        .await?;
    let dir = cqrs_harness::postgres::tempdir("pg_cqrs-tle-dump")?;
    let file = dir.join("dump.sql");
    pg.dump("tle", &file, &[])?;
    pg.psql_in("postgres", &format!("create database tle_restored owner {ADMIN}"))?;
    let (ok, output) = psql_file(pg, "postgres", "tle_restored", &file.to_string_lossy())?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(ok, "restoring a dump of the pg_tle install failed:\n{output}");
    let restored = connect(&pg.url_for("tle_restored")).await?;
    let row = restored
        .query_one(
            "select (select max_json_depth from cqrs_portable.settings), (select count(*) from cqrs_portable.settings),
                    (select count(*) from cqrs.command_log), (select edition from cqrs.version())",
            &[],
        )
        .await?;
    let (depth, settings, commands, restored_edition): (i32, i64, i64, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    ensure!(
        depth == 33 && settings == 1 && commands == 2 && restored_edition == "portable",
        "restored: max_json_depth {depth} in {settings} settings rows, {commands} commands, edition {restored_edition}"
    );
    restored
        .batch_execute(
            "select cqrs_portable.rebind('totals');
             select cqrs.append(cqrs.uuid_v7(), 's', 'T', '{\"n\": 4}');
             select count(*) from cqrs.catch_up();",
        )
        .await?;
    let total: i32 = restored
        .query_one("select n from public.totals where stream = 's'", &[])
        .await?
        .get(0);
    ensure!(
        total == 9,
        "after the restore the projection holds {total}, not 9"
    );
    Ok(())
}

/// Every PL/pgSQL function of the portable edition passes plpgsql_check: no errors, no warnings
/// (unused variables, type mismatches, records read before assignment …).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portable_plpgsql_passes_plpgsql_check() -> Result<()> {
    // Debian 12 packages plpgsql_check for its PostgreSQL 15 only; the PL/pgSQL is the same on
    // every major, and scripts/test.sh runs this on 15
    if pg_major()? != PLPGSQL_CHECK_MAJOR {
        eprintln!(
            "SKIPPED on PostgreSQL {}: plpgsql_check is installed for PostgreSQL {PLPGSQL_CHECK_MAJOR} (postgresql-15-plpgsql-check)",
            pg_major()?
        );
        return Ok(());
    }
    build_portable()?;
    let pg = PgCluster::start(ClusterOptions {
        with_extension: false,
        ..ClusterOptions::default()
    })?;
    let (ok, output) = psql_file(&pg, "postgres", pg.database(), "target/portable/pg_cqrs.sql")?;
    ensure!(ok, "installing the portable edition failed:\n{output}");
    let client = connect(&pg.url()).await?;
    client
        .batch_execute("create extension plpgsql_check")
        .await
        .context("create extension plpgsql_check (apt-get install postgresql-15-plpgsql-check)")?;
    let query = std::fs::read_to_string(repo_root().join("tests/sql/plpgsql_check.sql"))?;
    let findings: Vec<String> = client
        .query(query.as_str(), &[])
        .await?
        .iter()
        .map(|r| {
            format!(
                "{} line {:?}: {} {} ({})",
                r.get::<_, String>(0),
                r.get::<_, Option<i32>>(3),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, Option<String>>(4).unwrap_or_default()
            )
        })
        .collect();
    ensure!(
        findings.is_empty(),
        "plpgsql_check found:\n{}",
        findings.join("\n")
    );
    Ok(())
}
