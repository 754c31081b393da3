//! A private `redis-server` on a free port, without persistence, killed when dropped.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::certificates::Certificates;
use crate::postgres::free_port;
use crate::process::ChildGuard;

/// What every test redis-server is started with: loopback only, no persistence (a restart comes
/// back empty, as the tests that kill it expect), no protected mode.
pub(crate) const EPHEMERAL_ON_LOOPBACK: [&str; 8] = [
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    "no",
    "--protected-mode",
    "no",
];

pub struct RedisServer {
    port: u16,
    tls_port: Option<u16>,
    child: ChildGuard,
}

impl RedisServer {
    /// The redis-server process (for its CPU time in the benchmarks).
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    pub fn start() -> Result<Self> {
        Self::start_on(free_port()?)
    }

    /// Starts on a given port (used to bring a stopped server back where clients expect it).
    pub fn start_on(port: u16) -> Result<Self> {
        Self::spawn(port, None)
    }

    /// Also listens for TLS on a port of its own, with the server certificate of `certs`
    /// (clients are not asked for certificates).
    pub fn start_with_tls(certs: &Certificates) -> Result<Self> {
        Self::spawn(free_port()?, Some((free_port()?, certs)))
    }

    fn spawn(port: u16, tls: Option<(u16, &Certificates)>) -> Result<Self> {
        let mut command = Command::new("redis-server");
        if let Some((tls_port, certs)) = tls {
            command
                .arg("--tls-port")
                .arg(tls_port.to_string())
                .arg("--tls-cert-file")
                .arg(certs.server_cert())
                .arg("--tls-key-file")
                .arg(certs.server_key())
                .arg("--tls-ca-cert-file")
                .arg(certs.ca())
                .args(["--tls-auth-clients", "no"]);
        }
        let child = command
            .args(EPHEMERAL_ON_LOOPBACK)
            .arg("--port")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // its own process group, so that Ctrl-C reaches only the program that started it
            .process_group(0)
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        let server = Self {
            port,
            tls_port: tls.map(|(tls_port, _)| tls_port),
            child: ChildGuard::new("redis-server", child),
        };
        server.wait_ready(Duration::from_secs(10))?;
        Ok(server)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(out) = self.cli(&["PING"]) {
                if out == "PONG" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} not ready after {timeout:?}", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `rediss://` URL of the TLS port, when it has one.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|port| format!("rediss://127.0.0.1:{port}/"))
    }

    /// Runs one redis-cli command and returns its raw output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(args)
            .output()
            .context("running redis-cli")?;
        if !out.status.success() {
            bail!("redis-cli failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// SIGKILL (the server is gone; start a new one with `start_on(port)`).
    pub fn kill(&mut self) {
        self.child.kill();
    }
}
