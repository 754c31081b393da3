//! docs/first-app.md, run as written, against both editions: its files are written, its shell
//! blocks run in order in one bash (the edition's install block only), and every `text output`
//! block must appear in what they print. The application role is not a superuser; the clients
//! are Python (psycopg 3) and Node (pg).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cqrs_e2e::edition::{self, Edition, ADMIN};
use cqrs_e2e::repo_root;
use cqrs_harness::postgres::{free_port, pg_bindir, tempdir};
use cqrs_harness::sidecar::sidecar_binary;
use cqrs_harness::{ClusterOptions, PgCluster, RedisServer};

const GUIDE: &str = "docs/first-app.md";

/// The guide's read API and admin addresses (the sidecar's defaults), replaced by free ports so
/// that the test can run beside others.
const HTTP_ADDR: &str = "127.0.0.1:9187";
const ADMIN_ADDR: &str = "127.0.0.1:9188";

#[derive(Debug, Default)]
struct Guide {
    files: Vec<(String, String)>,
    script: String,
    outputs: Vec<String>,
}

/// The guide's fenced blocks: ```` ```sh ```` (run), ```` ```sh extension ```` / `portable` (run
/// for that edition), ```` ```<lang> file=NAME ```` (written to NAME), ```` ```text output ````
/// (expected in what the shell blocks print). Others are prose.
fn parse(text: &str, edition: Edition) -> Result<Guide> {
    let mut guide = Guide::default();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut body = String::new();
        loop {
            let Some(line) = lines.next() else {
                bail!("{GUIDE}: a block ```{info} is not closed");
            };
            if line.starts_with("```") {
                break;
            }
            body.push_str(line);
            body.push('\n');
        }
        let words: Vec<&str> = info.split_whitespace().collect();
        match words.as_slice() {
            ["sh"] => guide.script.push_str(&body),
            ["sh", only] if *only == edition.name() => guide.script.push_str(&body),
            ["sh", "extension" | "portable"] => {}
            ["text", "output"] => guide.outputs.push(body),
            [_, file] if file.starts_with("file=") => {
                guide.files.push((file["file=".len()..].to_owned(), body));
            }
            _ => {}
        }
    }
    ensure!(
        !guide.script.is_empty() && !guide.outputs.is_empty(),
        "{GUIDE} has no shell or output blocks"
    );
    Ok(guide)
}

/// A private cluster without pg_cqrs (the guide installs it); for the portable edition the
/// database belongs to [`ADMIN`], a role that may create roles but is not a superuser.
fn cluster(edition: Edition) -> Result<(PgCluster, String)> {
    let pg = PgCluster::start(ClusterOptions {
        with_extension: false,
        ..ClusterOptions::default()
    })?;
    let owner = match edition {
        Edition::Extension => pg.url(),
        Edition::Portable => {
            pg.psql_in(
                "postgres",
                &format!("create role {ADMIN} login createrole; alter database cqrs owner to {ADMIN}"),
            )?;
            edition::url_as(&pg, ADMIN)
        }
    };
    Ok((pg, owner))
}

fn run_guide(edition: Edition) -> Result<()> {
    let guide = parse(&std::fs::read_to_string(repo_root().join(GUIDE))?, edition)?;
    let (pg, owner_url) = cluster(edition)?;
    let redis = RedisServer::start()?;
    let dir = tempdir(&format!("first-app-{}", edition.name()))?;
    for (name, body) in &guide.files {
        std::fs::write(dir.join(name), body)?;
    }
    if edition == Edition::Portable {
        edition::build_portable()?;
        std::fs::copy(
            repo_root().join("target/portable/pg_cqrs.sql"),
            dir.join("pg_cqrs.sql"),
        )?;
    }
    let http = format!("127.0.0.1:{}", free_port()?);
    let admin = format!("127.0.0.1:{}", free_port()?);
    let script = format!(
        "set -euo pipefail\n{}",
        guide.script.replace(HTTP_ADDR, &http).replace(ADMIN_ADDR, &admin)
    );
    // the sidecar and PostgreSQL's psql first; Debian's python3, which has psycopg, before any
    // other (pyenv's, say)
    let sidecar_dir = sidecar_binary()?
        .parent()
        .map(Path::to_path_buf)
        .context("the sidecar binary has no directory")?;
    let path = format!(
        "{}:{}:/usr/bin:{}",
        sidecar_dir.display(),
        pg_bindir()?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let npm_cache: PathBuf = repo_root().join("target/npm-cache");
    let child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .env("PATH", path)
        .env("SUPERUSER_URL", pg.url())
        .env("OWNER_URL", &owner_url)
        .env("APP_URL", edition::url_as(&pg, "library_app"))
        .env("SIDECAR_URL", edition::url_as(&pg, "library_sidecar"))
        .env("REDIS_URL", redis.url())
        .env("APP_PASSWORD", "app-secret")
        .env("SIDECAR_PASSWORD", "sidecar-secret")
        .env("CQRS_HTTP_ADDR", &http)
        .env("CQRS_ADMIN_ADDR", &admin)
        .env("npm_config_cache", &npm_cache)
        .env("NO_COLOR", "1")
        // its own process group: whatever it leaves running (the sidecar) is killed with it
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running the guide's shell blocks with bash")?;
    let group = child.id();
    let started = Instant::now();
    let waited = std::thread::spawn(move || child.wait_with_output());
    while !waited.is_finished() && started.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGKILL to the whole group: the sidecar the guide started in the background, if the
    // script did not stop it, and the script itself on a timeout
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status();
    let output = waited
        .join()
        .map_err(|_| anyhow::anyhow!("waiting for bash panicked"))??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let sidecar_log = std::fs::read_to_string(dir.join("sidecar.log")).unwrap_or_default();
    ensure!(
        output.status.success(),
        "the guide failed on the {} edition ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- sidecar.log\n{sidecar_log}",
        edition.name(),
        output.status
    );
    for expected in &guide.outputs {
        ensure!(
            stdout.contains(expected.as_str()),
            "the guide's output block\n{expected}is not what its commands printed on the {} edition:\n{stdout}\n--- stderr\n{stderr}",
            edition.name()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn the_first_application_guide_runs_as_written_on_the_extension() -> Result<()> {
    run_guide(Edition::Extension)
}

#[test]
fn the_first_application_guide_runs_as_written_on_the_portable_edition() -> Result<()> {
    run_guide(Edition::Portable)
}
