//! Code of a read model's owner runs with the rights of the table's owner, inside a
//! security-restricted operation — as PostgreSQL runs `REFRESH MATERIALIZED VIEW` and `VACUUM` —
//! never with the rights of whoever projects or reads, and it leaves nothing behind.
//!
//! Whoever projects is the sidecar's role (the whole log, every read model, REPLICATION) or a
//! superuser running `cqrs.resume` or `cqrs.rebuild`; whoever reads may be the sidecar too.
//! Triggers, defaults, domain checks, check and index expressions, row-level security policies
//! of a read-model table, and function handlers, are the table owner's code: run with the
//! caller's rights, a table owner could borrow them (a trigger that makes itself a superuser
//! when a superuser resumes its projection). As the owner, in a security-restricted operation
//! (no SET ROLE, no temporary objects) and with `search_path` pinned to `pg_catalog, pg_temp`,
//! that code can do nothing its owner could not do anyway.
//!
//! Every setting that code changes — `set_config(…, false)` as much as `set local` — is rolled
//! back when it returns (`AtEOXact_GUC(false, …)`, as `REFRESH MATERIALIZED VIEW` does): a plain
//! `SET` left behind would otherwise reach the caller's next statement (a `search_path` naming
//! the owner's schema, a `statement_timeout` that fails every later batch).

use pgrx::pg_sys;

/// Runs `work` as `owner` in a security-restricted operation with a safe `search_path`; every
/// setting changed inside is rolled back when `work` returns.
///
/// If `work` raises an ERROR, the (sub)transaction it runs in restores the user and the
/// settings when it is rolled back.
pub(crate) fn as_owner<R>(owner: pg_sys::Oid, work: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context: std::ffi::c_int = 0;
    // SAFETY: reading and setting the backend's current user and security context and opening a
    // GUC nest level, as ExecRefreshMatView does; all three are undone below, or by the abort of
    // the enclosing (sub)transaction when `work` raises an ERROR.
    let level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        let restricted = saved_context
            | pg_sys::SECURITY_LOCAL_USERID_CHANGE as std::ffi::c_int
            | pg_sys::SECURITY_RESTRICTED_OPERATION as std::ffi::c_int;
        pg_sys::SetUserIdAndSecContext(owner, restricted);
        let level = pg_sys::NewGUCNestLevel();
        // its messages (a RAISE WARNING that quotes a row) stay in the server's log, which is
        // the owner's to write to, and do not reach the caller's client — the sidecar's log
        for (name, value) in [
            (c"search_path", c"pg_catalog, pg_temp"),
            (c"client_min_messages", c"error"),
        ] {
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
        level
    };
    let result = work();
    // SAFETY: isCommit = false undoes every setting made at this nest level or below — the
    // search_path above and whatever the owner's code set, session-wide or local — then the user
    // and context read above come back.
    unsafe {
        pg_sys::AtEOXact_GUC(false, level);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
    }
    result
}
