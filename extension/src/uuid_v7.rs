//! `cqrs.uuid_v7()`: PostgreSQL 15 has no time-ordered UUID generator, and time-ordered ids keep
//! the command_id index append-mostly instead of scattering random inserts over it.

use pgrx::prelude::*;

/// Returns a new UUID version 7 (RFC 9562): 48-bit Unix milliseconds, then random bits, with a
/// per-backend counter so ids generated within one millisecond still sort in creation order.
#[pg_extern(sql = false)]
fn uuid_v7() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes())
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn uuid_v7_is_version_7_and_time_ordered() {
        let ids: Vec<pgrx::Uuid> = (0..1000).map(|_| super::uuid_v7()).collect();
        for id in &ids {
            let parsed = uuid::Uuid::from_bytes(*id.as_bytes());
            assert_eq!(parsed.get_version_num(), 7);
        }
        for pair in ids.windows(2) {
            assert!(
                pair[0].as_bytes() < pair[1].as_bytes(),
                "uuid_v7 must be monotonic in one backend"
            );
        }
    }

    #[pg_test]
    fn uuid_v7_sql_function_is_callable() {
        let version: Option<i32> =
            Spi::get_one("select substr(cqrs.uuid_v7()::text, 15, 1)::int").expect("spi");
        assert_eq!(version, Some(7));
    }
}
