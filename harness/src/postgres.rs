//! A private PostgreSQL cluster: its own data directory, port and socket directory, started with
//! `wal_level = logical` and stopped when dropped.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::process::{as_postgres_user, chown_to_postgres, running_as_root};

/// Durability of a cluster. Tests run without fsync (they crash processes, not machines);
/// benchmarks keep the production default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Fsync,
    NoFsync,
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub durability: Durability,
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<String>,
    /// `pg_hba.conf` lines put before initdb's (the first matching line wins).
    pub hba: Vec<String>,
    /// Name of the database created for the caller (with `CREATE EXTENSION pg_cqrs` when
    /// `with_extension`).
    pub database: String,
    pub with_extension: bool,
    /// The version `CREATE EXTENSION` installs (`None`: the default version, the newest).
    pub extension_version: Option<String>,
    /// The PostgreSQL binaries to run (`None`: those of `$PG_CONFIG`, see [`pg_bindir`]).
    pub bindir: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            durability: Durability::NoFsync,
            settings: Vec::new(),
            hba: Vec::new(),
            database: "cqrs".to_owned(),
            with_extension: true,
            extension_version: None,
            bindir: None,
        }
    }
}

pub struct PgCluster {
    bindir: PathBuf,
    root: PathBuf,
    data: PathBuf,
    port: u16,
    database: String,
    keep: bool,
}

/// A free TCP port on the loopback interface (the listener is closed before returning, so a
/// race with another process is possible but harmless in practice).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(listener.local_addr()?.port())
}

/// The `pg_config` the tests run against: `$PG_CONFIG`, else Debian's PostgreSQL 15, else the
/// one on the PATH. scripts/test.sh sets it to run the suite on another major.
pub fn pg_config() -> String {
    std::env::var("PG_CONFIG").unwrap_or_else(|_| {
        let debian = "/usr/lib/postgresql/15/bin/pg_config";
        if Path::new(debian).exists() {
            debian.to_owned()
        } else {
            "pg_config".to_owned()
        }
    })
}

/// `pg_config <flag>`, trimmed.
pub fn pg_config_value(flag: &str) -> Result<String> {
    let pg_config = pg_config();
    let out = Command::new(&pg_config)
        .arg(flag)
        .output()
        .with_context(|| format!("running {pg_config} {flag} (is PostgreSQL installed?)"))?;
    if !out.status.success() {
        bail!(
            "{pg_config} {flag} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The directory holding `initdb`, `pg_ctl` and `postgres` (see [`pg_config`]).
pub fn pg_bindir() -> Result<PathBuf> {
    Ok(PathBuf::from(pg_config_value("--bindir")?))
}

/// The major version of the PostgreSQL the tests run against (15, 16 …).
pub fn pg_major() -> Result<u32> {
    let version = pg_config_value("--version")?;
    version
        .strip_prefix("PostgreSQL ")
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("no major version in {version:?}"))
}

fn check(out: Output, what: &str) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl PgCluster {
    /// initdb + start. The cluster lives under a fresh directory in the system temp dir.
    pub fn start(options: ClusterOptions) -> Result<Self> {
        let bindir = match &options.bindir {
            Some(bindir) => bindir.clone(),
            None => pg_bindir()?,
        };
        let root = tempdir("pg_cqrs-pg")?;
        let data = root.join("data");
        let port = free_port()?;
        let mut cluster = Self {
            bindir,
            root,
            data,
            port,
            database: options.database.clone(),
            keep: std::env::var_os("CQRS_KEEP_CLUSTERS").is_some(),
        };
        cluster.initdb(&options)?;
        cluster.pg_ctl_start()?;
        cluster.create_database(&options)?;
        Ok(cluster)
    }

    fn initdb(&mut self, options: &ClusterOptions) -> Result<()> {
        let out = as_postgres_user(&self.bindir.join("initdb"))
            .args([
                "--no-sync",
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .arg("-D")
            .arg(&self.data)
            .output()
            .context("running initdb")?;
        check(out, "initdb")?;
        let mut conf = vec![
            format!("port = {}", self.port),
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("unix_socket_directories = '{}'", self.root.display()),
            "wal_level = logical".to_owned(),
            "max_wal_senders = 20".to_owned(),
            "max_replication_slots = 20".to_owned(),
            "max_connections = 200".to_owned(),
            "shared_buffers = 256MB".to_owned(),
            "logging_collector = off".to_owned(),
            "log_min_messages = warning".to_owned(),
        ];
        if options.durability == Durability::NoFsync {
            // Tests kill processes, not machines: without fsync a committed transaction still
            // survives a server crash (its WAL is in the OS page cache), which is what the fault
            // tests rely on. synchronous_commit stays on for the same reason.
            conf.push("fsync = off".to_owned());
            conf.push("full_page_writes = off".to_owned());
        }
        conf.extend(options.settings.iter().cloned());
        let path = self.data.join("postgresql.conf");
        let mut text = fs::read_to_string(&path).context("reading postgresql.conf")?;
        text.push_str("\n# pg_cqrs harness\n");
        for line in conf {
            text.push_str(&line);
            text.push('\n');
        }
        fs::write(&path, text).context("writing postgresql.conf")?;
        chown_to_postgres(&path)?;
        if !options.hba.is_empty() {
            let path = self.data.join("pg_hba.conf");
            let initial = fs::read_to_string(&path).context("reading pg_hba.conf")?;
            let text = format!("# pg_cqrs harness\n{}\n{initial}", options.hba.join("\n"));
            fs::write(&path, text).context("writing pg_hba.conf")?;
            chown_to_postgres(&path)?;
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let log = self.root.join("postgres.log");
        let out = as_postgres_user(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            // its own process group: a Ctrl-C meant for the demo must not stop the server
            // behind the demo's back (the demo stops it in order)
            .process_group(0)
            // pgrx attaches a Rust backtrace to error details when these are set; servers in
            // production do not have them, and test output must not depend on the caller's shell
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl start")?;
        check(out, "pg_ctl start").map_err(|err| {
            let tail = fs::read_to_string(&log).unwrap_or_default();
            err.context(format!("server log:\n{tail}"))
        })?;
        Ok(())
    }

    fn create_database(&self, options: &ClusterOptions) -> Result<()> {
        self.psql_in(
            "postgres",
            &format!("create database {}", quote_ident(&options.database)),
        )?;
        if options.with_extension {
            let version = options
                .extension_version
                .as_deref()
                .map(|v| format!(" version '{}'", v.replace('\'', "''")))
                .unwrap_or_default();
            self.psql(&format!("create extension pg_cqrs{version}")).context(
                "CREATE EXTENSION pg_cqrs failed; is the extension installed (cargo pgrx install)?",
            )?;
            if options.extension_version.is_none() {
                // the log's partitions, as a sidecar's first maintain() makes them: CREATE
                // EXTENSION makes none, and the first append would (tests that append in
                // rolled-back savepoints would make and lose them every time)
                self.psql("select count(*) from cqrs.maintain()")?;
            }
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the PostgreSQL binaries this cluster runs.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// A libpq/tokio-postgres connection string for the caller's database.
    pub fn url(&self) -> String {
        self.url_for(&self.database)
    }

    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, database)
    }

    /// Runs SQL through psql in the caller's database; returns stdout (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_in(&self.database, sql)
    }

    /// `pg_dump` of `database`, as postgres, into the plain SQL script `file`, with `options`
    /// (such as `--enable-row-security`) besides.
    pub fn dump(&self, database: &str, file: &Path, options: &[&str]) -> Result<()> {
        let out = Command::new(self.bindir.join("pg_dump"))
            .args(options)
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &self.port.to_string(),
                "-d",
                database,
                "-f",
            ])
            .arg(file)
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub fn psql_in(&self, database: &str, sql: &str) -> Result<String> {
        let out = Command::new(self.bindir.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        let out = check(out, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// A streaming replica of this cluster (`pg_basebackup -R`: a hot standby that follows the
    /// primary's WAL), started on a port of its own.
    pub fn start_replica(&self) -> Result<Self> {
        let root = tempdir("pg_cqrs-replica")?;
        let data = root.join("data");
        let out = as_postgres_user(&self.bindir.join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--no-sync",
                "--checkpoint=fast",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-D")
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .context("running pg_basebackup")?;
        check(out, "pg_basebackup")?;
        let replica = Self {
            bindir: self.bindir.clone(),
            root,
            data,
            port: free_port()?,
            database: self.database.clone(),
            keep: self.keep,
        };
        // postgresql.auto.conf is read after postgresql.conf: the replica's own port and socket
        let auto = replica.data.join("postgresql.auto.conf");
        // pg_basebackup -R writes every option its libpq knows (PostgreSQL 17+: sslnegotiation);
        // a server that loads an older libpq for its WAL receiver refuses the whole string, so
        // the replica gets only what it needs
        let mut text: String = fs::read_to_string(&auto)
            .unwrap_or_default()
            .lines()
            .filter(|line| !line.trim_start().starts_with("primary_conninfo"))
            .map(|line| format!("{line}\n"))
            .collect();
        text.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres'\n",
            self.port
        ));
        text.push_str(&format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            replica.port,
            replica.root.display()
        ));
        fs::write(&auto, text).context("writing the replica's postgresql.auto.conf")?;
        chown_to_postgres(&auto)?;
        replica.pg_ctl_start()?;
        Ok(replica)
    }

    /// Stops the server (fast shutdown) and starts it again on the same port.
    pub fn restart(&self) -> Result<()> {
        self.stop_mode("fast")?;
        self.pg_ctl_start()
    }

    /// Stops the server without stopping the cluster object (restart with `start_again`).
    pub fn stop_mode(&self, mode: &str) -> Result<()> {
        let out = as_postgres_user(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "-m", mode, "stop"])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl stop")?;
        check(out, "pg_ctl stop")?;
        Ok(())
    }

    pub fn start_again(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    /// Waits until the server accepts connections (after a restart).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.psql_in("postgres", "select 1").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres on port {} not ready after {timeout:?}", self.port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_postgres_user(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-m", "immediate", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !self.keep {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// A fresh directory in the system temp dir, owned by `postgres` when running as root (initdb
/// and postgres refuse to run as root).
pub fn tempdir(prefix: &str) -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let candidate = base.join(format!(
            "{prefix}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        match fs::create_dir(&candidate) {
            Ok(()) => {
                if running_as_root() {
                    chown_to_postgres(&candidate)?;
                }
                return Ok(candidate);
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err).with_context(|| format!("creating {}", candidate.display())),
        }
    }
    bail!("could not create a temp dir under {}", base.display())
}

/// Double-quotes an SQL identifier.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
