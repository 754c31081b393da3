//! Typed `cqrs.*` settings. Registering them makes `SET cqrs.require_registered_types = 'maybe'`
//! an error instead of a silently ignored placeholder.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Refuse commands whose type has no registered JSON Schema. The SQL side reads it with
/// `current_setting()`, which also works in a backend that has not loaded this library yet.
pub(crate) static REQUIRE_REGISTERED_TYPES: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Largest payload `cqrs.append` accepts, in bytes of jsonb (SUSET: applications cannot raise it).
pub(crate) static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(4 * 1024 * 1024);

/// Largest metadata `cqrs.append` accepts, in bytes of jsonb.
pub(crate) static MAX_METADATA_BYTES: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);

/// Deepest nesting of payload and metadata `cqrs.append` accepts. At most 100: the projection
/// side reads events with a JSON parser whose recursion limit is 128 levels, and a batch wraps
/// each payload in two more.
pub(crate) static MAX_JSON_DEPTH: GucSetting<i32> = GucSetting::<i32>::new(64);

/// Seconds an event may stay parked (waiting for a gap in its stream to fill) before
/// `cqrs.status()` raises `gap_alert`. Read by SQL with `current_setting()`.
static GAP_ALERT_AFTER: GucSetting<i32> = GucSetting::<i32>::new(60);

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
    GucRegistry::define_int_guc(
        c"cqrs.gap_alert_after",
        c"Seconds a parked event may wait for the gap in its stream before cqrs.status() raises gap_alert.",
        c"A gap means a command was delivered before one that precedes it in its stream; it normally fills \
          within one batch. A gap this old is worth an alert: a command may be lost on its way.",
        &GAP_ALERT_AFTER,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cqrs.max_payload_bytes",
        c"Largest command payload cqrs.append() accepts, in bytes of jsonb.",
        c"Larger payloads are refused with SQLSTATE 54000. Only superusers can change it.",
        &MAX_PAYLOAD_BYTES,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cqrs.max_metadata_bytes",
        c"Largest command metadata cqrs.append() accepts, in bytes of jsonb.",
        c"Larger metadata is refused with SQLSTATE 54000. Only superusers can change it.",
        &MAX_METADATA_BYTES,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cqrs.max_json_depth",
        c"Deepest nesting of command payloads and metadata cqrs.append() accepts (levels below the root).",
        c"Deeper documents are refused with SQLSTATE 54000: the projection side could not read them. Only superusers can change it.",
        &MAX_JSON_DEPTH,
        1,
        100,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: called from _PG_init with a static C string; reserving the prefix makes a typo such
    // as `set cqrs.require_registerd_types = on` an error instead of a silent placeholder.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"cqrs".as_ptr()) };
}
