//! Running server programs as the `postgres` user when the harness itself runs as root, and
//! child processes that are killed when their handle is dropped.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program` to be run as `postgres` when we are root (initdb and postgres refuse root), as
/// ourselves otherwise.
pub fn as_postgres_user(program: &Path) -> Command {
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn postgres_ids() -> Result<(u32, u32)> {
    static IDS: OnceLock<Result<(u32, u32), String>> = OnceLock::new();
    IDS.get_or_init(|| {
        let id = |flag: &str| -> Result<u32, String> {
            let out = Command::new("id")
                .arg(flag)
                .arg("postgres")
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err("there is no postgres user (install postgresql-15)".to_owned());
            }
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|e| format!("{e}"))
        };
        Ok((id("-u")?, id("-g")?))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

pub fn chown_to_postgres(path: &Path) -> Result<()> {
    if !running_as_root() {
        return Ok(());
    }
    let (uid, gid) = postgres_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown postgres {}", path.display()))
}

/// A child process killed (SIGKILL) and reaped when dropped, unless it already exited.
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    pub fn new(name: impl Into<String>, child: Child) -> Self {
        Self {
            child: Some(child),
            name: name.into(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} is not running", self.name)
        };
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        if rc != 0 {
            bail!(
                "kill({pid}, {signal}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code (None if killed by a
    /// signal) or an error on timeout.
    pub fn wait_timeout(&mut self, timeout: std::time::Duration) -> Result<Option<i32>> {
        let deadline = std::time::Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            bail!("{} already reaped", self.name)
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if std::time::Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a finished command succeeded, and everything it printed (stdout, then stderr): for
/// tests that assert on what a client tool says either way.
pub fn success_and_output(out: &std::process::Output) -> (bool, String) {
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits until `program` accepts connections on loopback `port`; `log` (its log so far) goes
/// into the error when it does not within `timeout`.
pub fn wait_for_port(
    program: &str,
    port: u16,
    timeout: std::time::Duration,
    log: impl Fn() -> String,
) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("{program} on port {port} not ready after {timeout:?}: {}", log());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}
