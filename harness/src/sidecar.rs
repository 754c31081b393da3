//! `cqrs-sidecar` processes: started with their configuration in the environment, probed over
//! HTTP, stopped with SIGTERM or killed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::postgres::free_port;
use crate::process::ChildGuard;

/// The sidecar binary: `$CQRS_SIDECAR_BIN`, else `target/{release,debug}/cqrs-sidecar` of this
/// workspace (whichever is newer).
pub fn sidecar_binary() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("CQRS_SIDECAR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let candidates = ["debug", "release"].map(|profile| target.join(profile).join("cqrs-sidecar"));
    candidates
        .iter()
        .filter_map(|p| {
            p.metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, p.clone()))
        })
        .max()
        .map(|(_, p)| p)
        .context("cqrs-sidecar is not built: run `cargo build -p cqrs-sidecar` (or set CQRS_SIDECAR_BIN)")
}

/// A running sidecar.
pub struct Sidecar {
    child: ChildGuard,
    /// its projection group
    group: String,
    /// the read API
    http_port: u16,
    /// /metrics, /healthz, /readyz (the read API's port for sidecars before 0.2.0)
    admin_port: u16,
    log: PathBuf,
    /// Keep the log file when dropped (`CQRS_KEEP_LOGS`, or [`Sidecar::keep_log`]).
    keep_log: bool,
}

/// Test runs start hundreds of sidecars: their logs go with them unless asked for (a test that
/// fails on something the log explains puts the log in its error, see `Rig::logs`).
impl Drop for Sidecar {
    fn drop(&mut self) {
        if !self.keep_log {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// GET `path` on `127.0.0.1:port`; returns status code and body.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

impl Sidecar {
    /// Starts a sidecar for `database_url` and `redis_url`; `extra` environment variables
    /// (`CQRS_*`) override the defaults chosen here.
    pub fn start<K: AsRef<str>, V: AsRef<str>>(
        name: &str,
        database_url: &str,
        redis_url: &str,
        extra: &[(K, V)],
    ) -> Result<Self> {
        Self::start_binary(&sidecar_binary()?, name, database_url, redis_url, extra)
    }

    /// Like [`Sidecar::start`], running `binary` of release `version`; before 0.2.0 a sidecar
    /// served /metrics and /readyz on its read API's port.
    pub fn start_release<K: AsRef<str>, V: AsRef<str>>(
        binary: &std::path::Path,
        version: &str,
        name: &str,
        database_url: &str,
        redis_url: &str,
        extra: &[(K, V)],
    ) -> Result<Self> {
        let mut sidecar = Self::start_binary(binary, name, database_url, redis_url, extra)?;
        if version == "0.1.0" {
            sidecar.admin_port = sidecar.http_port;
        }
        Ok(sidecar)
    }

    /// Like [`Sidecar::start`], running `binary`. The read API serves every projection to
    /// anyone (`CQRS_EXPOSE=*`, `CQRS_READ_AUTH=none`) unless `extra` says otherwise.
    pub fn start_binary<K: AsRef<str>, V: AsRef<str>>(
        binary: &std::path::Path,
        name: &str,
        database_url: &str,
        redis_url: &str,
        extra: &[(K, V)],
    ) -> Result<Self> {
        let http_port = free_port()?;
        let admin_port = free_port()?;
        let log = std::env::temp_dir().join(format!("pg_cqrs-{name}-{}-{http_port}.log", std::process::id()));
        let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .env("CQRS_DATABASE_URL", database_url)
            .env("CQRS_REDIS_URL", redis_url)
            .env("CQRS_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("CQRS_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("CQRS_EXPOSE", "*")
            .env("CQRS_READ_AUTH", "none")
            .env("CQRS_STATUS_INTERVAL", "1s")
            .env("CQRS_LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            // its own process group, so that Ctrl-C reaches only the program that started it
            .process_group(0)
            .stdout(file.try_clone()?)
            .stderr(file);
        for (key, value) in extra {
            command.env(key.as_ref(), value.as_ref());
        }
        let child = command.spawn().context("starting cqrs-sidecar")?;
        let group = extra
            .iter()
            .rev()
            .find(|(key, _)| key.as_ref() == "CQRS_PROJECTION_GROUP")
            .map_or_else(|| "default".to_owned(), |(_, value)| value.as_ref().to_owned());
        Ok(Self {
            child: ChildGuard::new(name.to_owned(), child),
            group,
            http_port,
            admin_port,
            log,
            keep_log: std::env::var_os("CQRS_KEEP_LOGS").is_some(),
        })
    }

    /// The projection group it projects (`CQRS_PROJECTION_GROUP`, `default` without one).
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The read API's port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The port of /metrics, /healthz and /readyz.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Base URL of its read API.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// Keeps the log file after the sidecar is gone (the demo points its user at it).
    pub fn keep_log(&mut self) {
        self.keep_log = true;
    }

    /// Where the sidecar logs to.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/readyz` status code, `None` when the server does not answer.
    pub fn readiness(&self) -> Option<u16> {
        http_get(self.admin_port, "/readyz", Duration::from_secs(2))
            .ok()
            .map(|(status, _)| status)
    }

    /// The Prometheus metrics text.
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(self.admin_port, "/metrics", Duration::from_secs(2))?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }

    /// The value of an unlabelled metric (or the sum over its labels).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics()?;
        Ok(text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
            .filter_map(|line| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum())
    }

    /// Whether this sidecar is the leader right now.
    pub fn is_leader(&self) -> bool {
        self.metric("cqrs_leader").map(|v| v >= 1.0).unwrap_or(false)
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.readiness() == Some(200) {
                return Ok(());
            }
            if !self.child.is_running() {
                bail!("{} exited; its log:\n{}", self.child.name(), self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {timeout:?}; its log:\n{}",
                    self.child.name(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        self.child.signal(signal)
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// SIGTERM, then waits for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Result<Option<i32>> {
        self.child.signal(libc::SIGTERM)?;
        self.child.wait_timeout(timeout)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Its exit code once it exits by itself within `timeout`; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        self.child.wait_timeout(timeout)
    }
}

/// Indexes of the sidecars that say they lead.
pub fn leaders(sidecars: &[Sidecar]) -> Vec<usize> {
    (0..sidecars.len()).filter(|&i| sidecars[i].is_leader()).collect()
}

/// Waits until exactly one of `sidecars` leads and streams (`/readyz` 200) and returns its
/// index; two leaders at once is an error, and so is none by `timeout` (with every log).
pub fn wait_for_leader(sidecars: &[Sidecar], timeout: Duration) -> Result<usize> {
    wait_for_leader_among(sidecars, |_| true, timeout)
}

/// Like [`wait_for_leader`], among the sidecars of projection group `group` (each group has a
/// leader of its own).
pub fn wait_for_group_leader(sidecars: &[Sidecar], group: &str, timeout: Duration) -> Result<usize> {
    wait_for_leader_among(sidecars, |s| s.group() == group, timeout)
}

fn wait_for_leader_among(
    sidecars: &[Sidecar],
    member: impl Fn(&Sidecar) -> bool,
    timeout: Duration,
) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let leaders: Vec<usize> = leaders(sidecars)
            .into_iter()
            .filter(|&i| member(&sidecars[i]))
            .collect();
        if let [leader] = leaders[..] {
            if sidecars[leader].readiness() == Some(200) {
                return Ok(leader);
            }
        }
        if leaders.len() > 1 {
            bail!("two leaders at once: {leaders:?}");
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = sidecars.iter().map(Sidecar::log).collect();
            bail!(
                "no streaming leader after {timeout:?}; logs:\n{}",
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
