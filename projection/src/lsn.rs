//! PostgreSQL log sequence numbers (`16/B374D848`), for checkpoints and fencing.

/// Parses the text form of a `pg_lsn`.
pub fn parse(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    if high.is_empty() || low.is_empty() || high.len() > 8 || low.len() > 8 {
        return None;
    }
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// The text form of a `pg_lsn`.
pub fn format(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let lsn = super::parse("16/B374D848").expect("valid");
        assert_eq!(lsn, 0x16_B374_D848);
        assert_eq!(super::format(lsn), "16/B374D848");
        assert_eq!(super::format(0), "0/0");
        for bad in ["", "16", "/1", "1/", "x/1", "123456789/0"] {
            assert_eq!(super::parse(bad), None, "{bad}");
        }
    }
}
