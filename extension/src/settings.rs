//! Typed `cqrs.*` settings. Registering them makes `SET cqrs.require_registered_types = 'maybe'`
//! an error instead of a silently ignored placeholder.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Refuse commands whose type has no registered JSON Schema. The SQL side reads it with
/// `current_setting()`, which also works in a backend that has not loaded this library yet.
pub(crate) static REQUIRE_REGISTERED_TYPES: GucSetting<bool> = GucSetting::<bool>::new(false);

pub(crate) fn register() {
    GucRegistry::define_bool_guc(
        c"cqrs.require_registered_types",
        c"Refuse commands whose command_type has no registered JSON Schema.",
        c"When on, cqrs.append() raises SQLSTATE 42704 for unregistered command types. \
          Only superusers can change it, so applications cannot opt out.",
        &REQUIRE_REGISTERED_TYPES,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: called from _PG_init with a static C string; reserving the prefix makes a typo such
    // as `set cqrs.require_registerd_types = on` an error instead of a silent placeholder.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"cqrs".as_ptr()) };
}
