//! Read-model writes run with the rights of the table's owner, inside a security-restricted
//! operation — as PostgreSQL runs `REFRESH MATERIALIZED VIEW` and `VACUUM` — never with the
//! rights of whoever projects.
//!
//! Whoever projects is the sidecar's role (the whole log, every read model, REPLICATION) or a
//! superuser running `cqrs.resume` or `cqrs.rebuild`. Triggers, defaults, check and index
//! expressions of a read-model table, and function handlers, are the table owner's code: run
//! with the projector's rights, a table owner could borrow them (a trigger that makes itself a
//! superuser when a superuser resumes its projection). As the owner, in a security-restricted
//! operation (no SET ROLE, no temporary objects) and with `search_path` pinned to
//! `pg_catalog, pg_temp`, that code can do nothing its owner could not do anyway.

use pgrx::pg_sys;

use crate::prepared;

/// Runs `work` as `owner` in a security-restricted operation with a safe `search_path`.
///
/// If `work` raises an ERROR, the (sub)transaction it runs in restores the user and the
/// settings when it is rolled back: every caller runs this inside `subtransaction::run`.
pub(crate) fn as_owner<R>(owner: pg_sys::Oid, work: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context: std::ffi::c_int = 0;
    // SAFETY: reading and setting the backend's current user and security context, as
    // ExecRefreshMatView does; both are restored below, or by the abort of the enclosing
    // (sub)transaction when `work` raises an ERROR.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        let restricted = saved_context
            | pg_sys::SECURITY_LOCAL_USERID_CHANGE as std::ffi::c_int
            | pg_sys::SECURITY_RESTRICTED_OPERATION as std::ffi::c_int;
        pg_sys::SetUserIdAndSecContext(owner, restricted);
    }
    let result = prepared::with_settings(&[(c"search_path", c"pg_catalog, pg_temp")], work);
    // SAFETY: restores what was read above.
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_context) };
    result
}
