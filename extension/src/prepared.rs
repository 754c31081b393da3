//! Fixed statements prepared once per backend (`SPI_keepplan`) and reused by every call.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};

use crate::errors::spi_error;

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Executes the kept plan of `sql` with `args`, whose types are its parameters' types;
/// `doing` names the work in the error.
pub(crate) fn execute(
    client: &mut SpiClient<'_>,
    sql: &'static str,
    args: &[pgrx::datum::DatumWithOid<'_>],
    doing: &str,
) -> Result<(), ErrorReport> {
    let types: Vec<PgOid> = args.iter().map(|arg| PgOid::from(arg.oid())).collect();
    let kept = statement(client, sql, &types)?;
    client
        .update(&*kept, None, args)
        .map(|_| ())
        .map_err(|err| spi_error(doing, err))
}

/// The kept statement of `sql`, prepared with `args` on first use. The cache is not borrowed while
/// the caller executes it, so user code run by the statement may re-enter the extension.
pub(crate) fn statement(
    client: &SpiClient<'_>,
    sql: &'static str,
    args: &[PgOid],
) -> Result<Rc<OwnedPreparedStatement>, ErrorReport> {
    if let Some(plan) = PLANS.with_borrow(|plans| plans.get(sql).cloned()) {
        return Ok(plan);
    }
    let prepared = Rc::new(
        client
            .prepare_mut(sql, args)
            .map_err(|err| spi_error("preparing a statement", err))?
            .keep(),
    );
    PLANS.with_borrow_mut(|plans| plans.insert(sql, Rc::clone(&prepared)));
    Ok(prepared)
}

/// Runs `work` (which plans and executes the extension's own statements) with the planner
/// limited to index scans and nested loops.
///
/// Every statement of the extension looks rows up by their unique keys. Statements are kept for the
/// backend's life, and one made while a table was empty or unanalysed (the first batch, always)
/// would scan that table — sequentially or through a bitmap of a whole projection — long after
/// it has grown. Restricted like this, plans are index nested loops whatever the statistics say.
/// User code (function handlers) never runs under this restriction.
///
/// JIT is off too: a disabled plan type is not forbidden but costed at 1e10, which pushes every
/// estimate past `jit_above_cost`, and compiling a small statement costs ~25 ms per execution
/// (found with perf: LLVM in a 1-event batch).
pub(crate) fn index_plans<R>(work: impl FnOnce() -> R) -> R {
    const OFF: [(&std::ffi::CStr, &std::ffi::CStr); 5] = [
        (c"enable_seqscan", c"off"),
        (c"enable_bitmapscan", c"off"),
        (c"enable_hashjoin", c"off"),
        (c"enable_mergejoin", c"off"),
        (c"jit", c"off"),
    ];
    with_settings(&OFF, work)
}

/// Runs `work` with `settings` (name, value) in force, and the previous values back after.
pub(crate) fn with_settings<R>(
    settings: &[(&std::ffi::CStr, &std::ffi::CStr)],
    work: impl FnOnce() -> R,
) -> R {
    // GUC_ACTION_SAVE, as for a function's SET clause: the values are undone when the nest level
    // closes (GUC_ACTION_LOCAL would merge into the caller's transaction and leak to its later
    // statements).
    // SAFETY: a GUC nest level opened and closed around `work`; if `work` raises an ERROR the
    // (sub)transaction abort unwinds the level and restores the settings.
    unsafe {
        let level = pg_sys::NewGUCNestLevel();
        for (name, value) in settings {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        let result = work();
        pg_sys::AtEOXact_GUC(true, level);
        result
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn our_statements_plan_without_jit_or_scans_and_the_settings_come_back() {
        let inside = super::index_plans(|| {
            Spi::get_one::<String>("select current_setting('jit') || current_setting('enable_seqscan')")
        });
        assert_eq!(inside.expect("spi"), Some("offoff".to_owned()));
        let after =
            Spi::get_one::<String>("select current_setting('jit') || current_setting('enable_seqscan')");
        assert_eq!(after.expect("spi"), Some("onon".to_owned()));
    }
}
