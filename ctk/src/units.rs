//! Quantities as people type them on a command line or in a config file, and times as they
//! read them.

/// Parses a rate in bytes per second: a number with an optional K, M or G (powers of
/// 1024) and an optional `/s`, e.g. `500K`, `10M`; `0` or `none` for no limit.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(0);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => {
            return Err(format!(
                "rate {text:?}: use bytes per second, e.g. 500K, 10M, 1G (powers of 1024), or 0"
            ));
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("rate {text:?}: use e.g. 500K, 10M, 1G, or 0"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("rate {text:?} is too large"))
}

/// A time for people: RFC 3339 in the system's zone, to the second
/// (`2026-12-07T14:01:00+01:00`). Reads the zone once (jiff caches it).
pub fn local_time(unix_ms: u64) -> String {
    match jiff::Timestamp::from_millisecond(unix_ms as i64) {
        Ok(t) => t
            .to_zoned(jiff::tz::TimeZone::system())
            .strftime("%Y-%m-%dT%H:%M:%S%:z")
            .to_string(),
        Err(_) => format!("unix ms {unix_ms}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_typos_are_errors() {
        assert_eq!(parse_rate("500K"), Ok(500 << 10));
        assert_eq!(parse_rate("10M/s"), Ok(10 << 20));
        assert_eq!(parse_rate("none"), Ok(0));
        assert_eq!(parse_rate("7"), Ok(7));
        for bad in ["10X", "M", "", "99999999999G", "-1"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }
}
