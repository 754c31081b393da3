//! What a projection may be called: 1 to 63 characters of `A-Z a-z 0-9 _ . -`. Names end up in
//! cache keys (`{prefix}:{projection}:{key}`), URLs and metric labels, where anything else would
//! need escaping. The one Rust definition (the extension's `create_projection`, the sidecar's
//! `--expose` and read URLs); the SQL one is `cqrs._is_projection_name` in
//! sql/core/projection.sql, and tests/tests/names.rs checks that the two agree.

/// The rule, as error messages state it.
pub const RULE: &str = "1 to 63 characters of A-Z a-z 0-9 _ . -";

/// The longest name, in bytes (PostgreSQL's longest identifier).
pub const MAX_BYTES: usize = 63;

/// Whether `name` may name a projection.
pub fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// What a projection group may be called (the sidecar's `--projection-group`): 1 to 40
/// characters of `a-z 0-9 _` starting with a letter, because a group's sidecars stream the slot
/// `<slot>_<group>` and slot names take only these. The SQL twin is `cqrs._is_projection_group`.
pub mod group {
    /// The rule, as error messages state it.
    pub const RULE: &str = "1 to 40 characters of a-z 0-9 _, starting with a letter";

    /// The group every projection is in until moved.
    pub const DEFAULT: &str = "default";

    /// The longest group name, in bytes.
    pub const MAX_BYTES: usize = 40;

    /// Whether `name` may name a projection group.
    pub fn is_valid(name: &str) -> bool {
        name.len() <= MAX_BYTES
            && name.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_lowercase_identifiers_up_to_40_bytes() {
        for name in ["default", "a", "billing_2", &"g".repeat(40)] {
            assert!(group::is_valid(name), "{name:?}");
        }
        for name in ["", "2a", "_a", "A", "a-b", "a.b", &"g".repeat(41), "ä"] {
            assert!(!group::is_valid(name), "{name:?}");
        }
    }

    #[test]
    fn names_of_the_allowed_characters_up_to_63_bytes() {
        for name in ["order_summary", "v2.orders-by-user", "A", &"x".repeat(63)] {
            assert!(is_valid(name), "{name:?}");
        }
        for name in [
            "",
            &"x".repeat(64),
            "with space",
            "a:b",
            "a/b",
            "ä",
            "a\0b",
            "{x}",
        ] {
            assert!(!is_valid(name), "{name:?}");
        }
    }
}
