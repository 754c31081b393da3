//! CPU time of the processes a command passes through, from `/proc`: what each costs per 1,000
//! commands, so that what a bigger machine sustains can be predicted from a run on this one.

use anyhow::Result;
use tokio_postgres::Client;

use cqrs_sidecar::postgres::ConnectionPurpose;

/// `utime` and `stime` in `/proc/<pid>/stat` count USER_HZ ticks, which the kernel's ABI fixes
/// at 100 a second for userspace on every architecture (times(2)).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system, every thread) the process `pid` has used so far; `None` once it
/// has exited.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) is in parentheses and may hold spaces: count after its ')'
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields 14 (utime) and 15 (stime) of proc(5), counted from field 3 (state) here
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// The processes metered: the sidecar, the walsender that decodes its slot, the backend that
/// runs its `cqrs.project_batch`, and redis-server.
pub(crate) const PROCESSES: [&str; 4] = ["sidecar", "walsender", "projecting backend", "redis-server"];

/// CPU seconds used by each of [`PROCESSES`] since [`Meter::start`].
pub(crate) struct Meter {
    pids: [Option<u32>; 4],
    start: [Option<f64>; 4],
}

impl Meter {
    /// Finds the walsender and the projecting backend by the `application_name` the sidecar
    /// gives its connections.
    pub(crate) async fn start(client: &Client, sidecar: Option<u32>, redis: Option<u32>) -> Result<Self> {
        let backend = |purpose: ConnectionPurpose| async move {
            let row = client
                .query_opt(
                    "select pid from pg_catalog.pg_stat_activity where application_name = $1 order by backend_start desc limit 1",
                    &[&purpose.application_name()],
                )
                .await?;
            Ok::<_, anyhow::Error>(row.map(|row| row.get::<_, i32>(0) as u32))
        };
        let pids = [
            sidecar,
            backend(ConnectionPurpose::Replication).await?,
            backend(ConnectionPurpose::Flush).await?,
            redis,
        ];
        Ok(Self {
            pids,
            start: pids.map(|pid| pid.and_then(cpu_seconds)),
        })
    }

    /// CPU milliseconds per 1,000 commands of each process since the start (`None` for one
    /// that was not found or has exited: a reconnection in between).
    pub(crate) fn per_thousand(&self, commands: u64) -> [Option<f64>; 4] {
        let mut out = [None; 4];
        for (i, slot) in out.iter_mut().enumerate() {
            if let (Some(pid), Some(start)) = (self.pids[i], self.start[i]) {
                *slot = cpu_seconds(pid).map(|now| (now - start) * 1000.0 * 1000.0 / commands.max(1) as f64);
            }
        }
        out
    }
}

/// A per-thousand figure for a table cell.
pub(crate) fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu() {
        let mut spent = 0u64;
        for i in 0..20_000_000u64 {
            spent = spent.wrapping_add(i * i);
        }
        std::hint::black_box(spent);
        let own = cpu_seconds(std::process::id()).expect("the test's own /proc/<pid>/stat");
        assert!(own > 0.0, "{own}");
        assert!(cpu_seconds(u32::MAX).is_none());
    }
}
