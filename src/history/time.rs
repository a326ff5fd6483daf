//! Times as people read and write them: UTC only, so the same command means
//! the same instant on every machine.

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn number(s: &str, digits: usize) -> Option<i64> {
    (s.len() == digits && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Parses a time into Unix seconds: RFC 3339 (`2024-05-01T14:30:00Z`,
/// `2024-05-01T16:30:00+02:00`), or `YYYY-MM-DD[ HH:MM[:SS]]` (also with `T`),
/// read as UTC, or `@SECONDS` since the Unix epoch. Fractions of a second are
/// dropped.
pub fn parse_utc(text: &str) -> Result<i64, String> {
    let bad = || {
        format!(
            "invalid time {text:?}: use YYYY-MM-DD, YYYY-MM-DD HH:MM[:SS] (UTC) or RFC 3339 like 2024-05-01T14:30:00Z"
        )
    };
    let s = text.trim();
    if let Some(n) = s.strip_prefix('@') {
        return n.parse().map_err(|_| bad());
    }
    let (date, rest) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(s[i + 1..].trim_start())),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let (y, m, d) = (
        number(y, 4).ok_or_else(bad)?,
        number(m, 2).ok_or_else(bad)?,
        number(d, 2).ok_or_else(bad)?,
    );
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m) || d < 1 || d > month_days[(m - 1) as usize] {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    let Some(rest) = rest else { return Ok(secs) };
    // The zone: Z, or +HH:MM / -HH:MM (or without the colon).
    let (clock, offset) = if let Some(c) = rest.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else if let Some(i) = rest.rfind(['+', '-']) {
        let zone = rest[i + 1..].replace(':', "");
        let (h, mi) = (
            number(zone.get(..2).ok_or_else(bad)?, 2).ok_or_else(bad)?,
            number(zone.get(2..).ok_or_else(bad)?, 2).ok_or_else(bad)?,
        );
        if h > 23 || mi > 59 {
            return Err(bad());
        }
        let sign = if rest.as_bytes()[i] == b'-' { -1 } else { 1 };
        (&rest[..i], sign * (h * 3600 + mi * 60))
    } else {
        (rest, 0)
    };
    let clock = clock.split('.').next().unwrap_or_default();
    let fields: Vec<&str> = clock.split(':').collect();
    let (h, mi, se) = match fields[..] {
        [h, mi] => (number(h, 2), number(mi, 2), Some(0)),
        [h, mi, se] => (number(h, 2), number(mi, 2), number(se, 2)),
        _ => return Err(bad()),
    };
    let (Some(h), Some(mi), Some(se)) = (h, mi, se) else {
        return Err(bad());
    };
    if h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    secs += h * 3600 + mi * 60 + se.min(59) - offset;
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_accepted_form_as_utc() {
        assert_eq!(parse_utc("1970-01-01"), Ok(0));
        assert_eq!(parse_utc("2026-11-18 11:06:40"), Ok(1_795_000_000));
        assert_eq!(parse_utc("2026-11-18T11:06:40Z"), Ok(1_795_000_000));
        assert_eq!(parse_utc("2026-11-18T13:06:40+02:00"), Ok(1_795_000_000));
        assert_eq!(parse_utc("2026-11-18T06:06:40.25-0500"), Ok(1_795_000_000));
        assert_eq!(parse_utc("2026-11-18 11:06"), Ok(1_795_000_000 - 40));
        assert_eq!(parse_utc("2000-02-29"), Ok(951_782_400));
        assert_eq!(parse_utc("@1795000000"), Ok(1_795_000_000));
        for bad in [
            "",
            "yesterday",
            "2024-13-01",
            "2023-02-29",
            "2024-1-01",
            "2024-01-01 25:00",
            "2024-01-01 10",
            "2024-01-01T10:00:00+2",
        ] {
            assert!(parse_utc(bad).is_err(), "{bad:?}");
        }
        for secs in [0, 951_782_400, 1_795_000_000, -86_400] {
            assert_eq!(parse_utc(&format_utc(secs)), Ok(secs));
        }
    }
}
