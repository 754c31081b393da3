//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) as a command carries it: the
//! application puts its current span's `traceparent` (and, if it has one, `tracestate`) in the
//! command's metadata; `cqrs.append` refuses one that is malformed (both editions apply these
//! rules), and the sidecar continues the trace from it.
//!
//! The rules are the specification's: `version-trace_id-parent_id-flags` in lowercase hex, a
//! version other than `ff`, trace and parent ids not all zero; version `00` is exactly 55
//! characters, a later version may append fields after a `-`. `tracestate` is kept as it is (its
//! list is the vendors' to read) but must be a string of printable ASCII within the length every
//! vendor must pass on.

/// The metadata key of the caller's `traceparent`.
pub const TRACEPARENT_KEY: &str = "traceparent";
/// The metadata key of the caller's `tracestate`.
pub const TRACESTATE_KEY: &str = "tracestate";
/// Longest `tracestate` kept (the specification's 32 members of at most 256 characters fit in
/// 8,192 bytes; 512 is what every vendor must propagate, so a longer one is refused rather than
/// cut).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Whether the caller sampled its span (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// Why a `traceparent` or `tracestate` was refused; the message names the rule, never the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceContextError {
    #[error("metadata.traceparent must be a string")]
    TraceparentNotString,
    #[error("metadata.traceparent is not a W3C traceparent (version-trace_id-parent_id-flags in lowercase hex, e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01)")]
    Malformed,
    #[error("metadata.traceparent has version ff, which W3C Trace Context forbids")]
    ForbiddenVersion,
    #[error("metadata.traceparent has an all-zero trace id or parent id, which W3C Trace Context forbids")]
    ZeroId,
    #[error("metadata.tracestate must be a string of printable ASCII of at most 512 bytes")]
    BadTracestate,
}

fn hex_digit(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        _ => None,
    }
}

/// `text` as lowercase hex into `out` (two characters per byte).
fn hex_into(text: &[u8], out: &mut [u8]) -> Result<(), TraceContextError> {
    if text.len() != out.len() * 2 {
        return Err(TraceContextError::Malformed);
    }
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let (Some(high), Some(low)) = (hex_digit(pair[0]), hex_digit(pair[1])) else {
            return Err(TraceContextError::Malformed);
        };
        *byte = high << 4 | low;
    }
    Ok(())
}

/// Parses a `traceparent` header value.
pub fn parse_traceparent(text: &str) -> Result<TraceParent, TraceContextError> {
    let bytes = text.as_bytes();
    // version 00 is exactly 55 characters; a later one may add "-…" after them
    if bytes.len() < 55 || (bytes.len() > 55 && bytes[55] != b'-') {
        return Err(TraceContextError::Malformed);
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return Err(TraceContextError::Malformed);
    }
    let mut version = [0u8; 1];
    hex_into(&bytes[0..2], &mut version)?;
    if version[0] == 0xff {
        return Err(TraceContextError::ForbiddenVersion);
    }
    if version[0] == 0 && bytes.len() != 55 {
        return Err(TraceContextError::Malformed);
    }
    let mut trace_id = [0u8; 16];
    hex_into(&bytes[3..35], &mut trace_id)?;
    let mut parent_id = [0u8; 8];
    hex_into(&bytes[36..52], &mut parent_id)?;
    let mut flags = [0u8; 1];
    hex_into(&bytes[53..55], &mut flags)?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return Err(TraceContextError::ZeroId);
    }
    Ok(TraceParent {
        trace_id,
        parent_id,
        flags: flags[0],
    })
}

/// Checks a `tracestate` value.
pub fn check_tracestate(text: &str) -> Result<(), TraceContextError> {
    if text.len() > MAX_TRACESTATE_BYTES || !text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(TraceContextError::BadTracestate);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_parses() {
        let parsed = parse_traceparent(GOOD).unwrap();
        assert_eq!(parsed.trace_id[0], 0x4b);
        assert_eq!(parsed.trace_id[15], 0x36);
        assert_eq!(parsed.parent_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(parsed.sampled());
        let unsampled = parse_traceparent(&GOOD.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn malformed_values_are_refused_by_rule() {
        use TraceContextError::*;
        let cases: &[(&str, TraceContextError)] = &[
            ("", Malformed),
            (&GOOD[..54], Malformed),
            (&GOOD.to_uppercase(), Malformed),
            (&GOOD.replace('-', "_"), Malformed),
            (&format!("{GOOD}-extra"), Malformed), // version 00 has no more fields
            (&GOOD.replacen("00-", "ff-", 1), ForbiddenVersion),
            ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", ZeroId),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", ZeroId),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                Malformed,
            ),
            (&format!(" {}", &GOOD[1..]), Malformed),
        ];
        for (text, rule) in cases {
            assert_eq!(parse_traceparent(text), Err(*rule), "{text:?}");
        }
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let later = GOOD.replacen("00-", "01-", 1);
        assert!(parse_traceparent(&later).is_ok());
        assert!(parse_traceparent(&format!("{later}-what-comes-next")).is_ok());
        assert_eq!(
            parse_traceparent(&format!("{later}x")),
            Err(TraceContextError::Malformed)
        );
    }

    #[test]
    fn tracestate_is_printable_ascii_within_512_bytes() {
        assert!(check_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE").is_ok());
        assert!(check_tracestate("").is_ok());
        assert!(check_tracestate(&"a".repeat(512)).is_ok());
        assert!(check_tracestate(&"a".repeat(513)).is_err());
        assert!(check_tracestate("rojo=\n").is_err());
        assert!(check_tracestate("rojo=é").is_err());
    }
}
