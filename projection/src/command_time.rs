//! The time in a command id, as `cqrs.command_time` (sql/core/retention.sql) reads it: which
//! partition of the command log holds the command, and how old a retried id is.

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// The Unix milliseconds of a UUIDv7 (version 7, variant 10: RFC 9562), `None` for any other id.
pub fn unix_millis(id: [u8; 16]) -> Option<i64> {
    if id[6] >> 4 != 7 || id[8] >> 6 != 0b10 {
        return None;
    }
    Some(
        id[..6]
            .iter()
            .fold(0_i64, |acc, byte| (acc << 8) | i64::from(*byte)),
    )
}

/// PostgreSQL's `-infinity` timestamptz (`DT_NOBEGIN`): the id time of an id without a time.
pub const MINUS_INFINITY: i64 = i64::MIN;

/// The id time of a command as a timestamptz (microseconds since 2000-01-01): exactly what
/// `cqrs.command_time(id)` returns (its `to_timestamp(ms / 1000.0)` is exact to the
/// microsecond for whole milliseconds), so that the extension can pass it instead of having
/// the SQL computed on every append.
pub fn timestamptz(id: [u8; 16]) -> i64 {
    match unix_millis(id) {
        Some(millis) => millis * 1000 - POSTGRES_EPOCH_UNIX_MICROS,
        None => MINUS_INFINITY,
    }
}

/// A timestamptz (microseconds since 2000-01-01) as Unix milliseconds.
pub fn unix_millis_of_timestamptz(micros: i64) -> i64 {
    (micros + POSTGRES_EPOCH_UNIX_MICROS).div_euclid(1000)
}

#[cfg(test)]
mod tests {
    fn id(text: &str) -> [u8; 16] {
        let hex: String = text.chars().filter(|c| *c != '-').collect();
        let mut out = [0_u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
        out
    }

    #[test]
    fn reads_the_time_of_a_v7_and_nothing_of_other_ids() {
        assert_eq!(
            super::unix_millis(id("0193a0b4-1c2d-7e3f-8a4b-5c6d7e8f9a0b")),
            Some(0x0193_a0b4_1c2d)
        );
        assert_eq!(
            super::unix_millis(id("0193a0b4-1c2d-7e3f-bfff-5c6d7e8f9a0b")),
            Some(0x0193_a0b4_1c2d)
        );
        // version 4, and a version 7 with the wrong variant
        assert_eq!(
            super::unix_millis(id("0193a0b4-1c2d-4e3f-8a4b-5c6d7e8f9a0b")),
            None
        );
        assert_eq!(
            super::unix_millis(id("0193a0b4-1c2d-7e3f-ca4b-5c6d7e8f9a0b")),
            None
        );
        assert_eq!(
            super::unix_millis(id("0193a0b4-1c2d-7e3f-4a4b-5c6d7e8f9a0b")),
            None
        );
    }

    #[test]
    fn gives_the_timestamptz_cqrs_command_time_gives() {
        // select cqrs.command_time('0193a0b4-1c2d-7e3f-8a4b-5c6d7e8f9a0b') is
        // 2024-12-07 10:39:38.541+00 (pgrx-tests/expected/retention.out)
        assert_eq!(
            super::timestamptz(id("0193a0b4-1c2d-7e3f-8a4b-5c6d7e8f9a0b")),
            786_883_178_541_000
        );
        assert_eq!(
            super::timestamptz(id("0193a0b4-1c2d-4e3f-8a4b-5c6d7e8f9a0b")),
            super::MINUS_INFINITY
        );
    }

    #[test]
    fn converts_postgres_timestamps_to_unix_milliseconds() {
        assert_eq!(super::unix_millis_of_timestamptz(0), 946_684_800_000);
        assert_eq!(super::unix_millis_of_timestamptz(1_999), 946_684_800_001);
        assert_eq!(super::unix_millis_of_timestamptz(-946_684_800_000_000), 0);
    }
}
