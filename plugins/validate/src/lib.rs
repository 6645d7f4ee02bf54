//! Envelope rules a JSON Schema cannot say. Runs before the schema stage
//! and rejects an event whose
//!
//! - `timestamp` lies further in the future than `max_future_skew` allows
//!   (late and old events pass: a queue may hold an event for hours);
//! - ids are present but not uuids in 8-4-4-4-12 hex form;
//! - `payload`, serialized, is larger than `max_payload_bytes`.
//!
//! ```toml
//! [[transforms]]
//! type = "wasm"
//! name = "validate"
//! path = "../plugins/target/wasm32-wasip2/release/validate.wasm"
//! config = { max_future_skew = "5m", max_payload_bytes = 65536 }
//! ```
//!
//! Settings, all optional:
//!
//! - `max_future_skew`: how far ahead of this host's clock a `timestamp`
//!   may be, as `"90s"`, `"5m"`, `"1h30m"`, `"2d"` or a number of seconds.
//!   Default `"5m"`.
//! - `uuid_fields`: dotted paths that must hold a uuid when present.
//!   Default `["metadata.event_id", "metadata.correlation_id",
//!   "metadata.user_id", "payload.organization_id"]`.
//! - `max_payload_bytes`: the most bytes `payload` may take as compact
//!   JSON. Default 65536.
//!
//! The clock is the host's wall clock, read through WASI. A missing
//! `timestamp` is the schema stage's to refuse; one that is present but not
//! RFC 3339 is refused here, since its skew cannot be judged. Every rule an
//! event breaks is named in the reason, separated by `; `.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use weir_plugin_sdk::{export_plugin, serde_json, value_at, Map, Meta, Outcome, Plugin, Value};

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// The plugin's `config` table, as weir hands it over.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    max_future_skew: Option<Skew>,
    #[serde(default = "default_uuid_fields")]
    uuid_fields: Vec<String>,
    #[serde(default = "default_max_payload_bytes")]
    max_payload_bytes: u64,
}

/// `max_future_skew` as written: seconds or a duration string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Skew {
    Seconds(u64),
    Text(String),
}

fn default_uuid_fields() -> Vec<String> {
    [
        "metadata.event_id",
        "metadata.correlation_id",
        "metadata.user_id",
        "payload.organization_id",
    ]
    .map(String::from)
    .to_vec()
}

fn default_max_payload_bytes() -> u64 {
    65_536
}

/// The built plugin.
pub struct Validate {
    /// Allowed skew, in seconds.
    skew_secs: u64,
    uuid_fields: Vec<String>,
    max_payload_bytes: u64,
}

impl Plugin for Validate {
    fn new(config: Value) -> Result<Self, String> {
        let config: Config =
            serde_json::from_value(config).map_err(|e| format!("invalid validate config: {e}"))?;
        let skew_secs = match config.max_future_skew {
            None => 300,
            Some(Skew::Seconds(s)) => s,
            Some(Skew::Text(t)) => parse_duration(&t)
                .ok_or_else(|| format!("max_future_skew `{t}` is not a duration like \"5m\""))?,
        };
        if let Some(bad) = config
            .uuid_fields
            .iter()
            .find(|f| f.is_empty() || f.contains(".."))
        {
            return Err(format!("uuid_fields entry `{bad}` is not a dotted path"));
        }
        Ok(Validate {
            skew_secs,
            uuid_fields: config.uuid_fields,
            max_payload_bytes: config.max_payload_bytes,
        })
    }

    fn process(&mut self, event: &mut Map<String, Value>, _meta: &Meta<'_>) -> Outcome {
        match self.check(event, now_nanos()) {
            problems if problems.is_empty() => Outcome::Unchanged,
            problems => Outcome::Reject(problems.join("; ")),
        }
    }
}

export_plugin!(Validate);

impl Validate {
    /// Every rule `event` breaks at `now` (nanoseconds since the epoch).
    fn check(&self, event: &Map<String, Value>, now: i128) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(p) = self.check_timestamp(event.get("timestamp"), now) {
            problems.push(p);
        }
        for path in &self.uuid_fields {
            if let Some(p) = check_uuid(path, value_at(event, path)) {
                problems.push(p);
            }
        }
        if let Some(payload) = event.get("payload") {
            let size = json_len(payload);
            if size > self.max_payload_bytes {
                problems.push(format!(
                    "payload is {size} bytes, more than the {} allowed",
                    self.max_payload_bytes
                ));
            }
        }
        problems
    }

    fn check_timestamp(&self, ts: Option<&Value>, now: i128) -> Option<String> {
        let text = match ts? {
            Value::String(s) => s,
            other => return Some(format!("timestamp must be a string, found {}", kind(other))),
        };
        let Some(at) = parse_rfc3339(text) else {
            return Some(format!(
                "timestamp `{}` is not an RFC 3339 date-time",
                clip(text)
            ));
        };
        let ahead = at - now;
        if ahead > i128::from(self.skew_secs) * NANOS_PER_SEC {
            return Some(format!(
                "timestamp {} is {} in the future (allowed skew {})",
                clip(text),
                human_span(ahead / NANOS_PER_SEC),
                format_duration(self.skew_secs)
            ));
        }
        None
    }
}

fn now_nanos() -> i128 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn check_uuid(path: &str, value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if is_uuid(s) => None,
        Value::String(s) => Some(format!(
            "{path} `{}` is not a uuid (expected 8-4-4-4-12 hex digits)",
            clip(s)
        )),
        other => Some(format!(
            "{path} must be a uuid string, found {}",
            kind(other)
        )),
    }
}

/// 8-4-4-4-12 hex digits, either case, as in `0b6f4e2a-...`.
fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The size of `v` as compact JSON, without building the text.
fn json_len(v: &Value) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// At most 64 characters of a value quoted in a reason.
fn clip(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// `"90s"`, `"5m"`, `"1h30m"`, `"2d"` or plain digits (seconds), in
/// seconds.
fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok();
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let scale = match &rest[..unit] {
            "s" | "sec" | "secs" => 1,
            "m" | "min" | "mins" => 60,
            "h" | "hour" | "hours" => 3_600,
            "d" | "day" | "days" => 86_400,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(scale)?)?;
        rest = rest[unit..].trim_start();
    }
    (!text.is_empty()).then_some(total)
}

/// Seconds as the shortest `1h30m`-style text.
fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3_600, "h"),
        (secs % 3_600 / 60, "m"),
        (secs % 60, "s"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

/// A span of seconds as the largest whole unit: "4 years", "1 day",
/// "12 minutes".
fn human_span(secs: i128) -> String {
    let (n, unit) = [
        (365 * 86_400, "year"),
        (86_400, "day"),
        (3_600, "hour"),
        (60, "minute"),
    ]
    .into_iter()
    .find(|(size, _)| secs >= *size)
    .map(|(size, unit)| (secs / size, unit))
    .unwrap_or((secs, "second"));
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

/// Nanoseconds since the Unix epoch of an RFC 3339 date-time such as
/// `2026-11-29T16:01:15.135Z` or `2026-11-29T17:01:15+01:00`.
fn parse_rfc3339(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let seps = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if seps.iter().any(|&(i, c)| b[i] != c) || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }

    let mut rest = &s[19..];
    let mut nanos: i128 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac.bytes().take(digits).enumerate() {
            if i < 9 {
                nanos += i128::from(c - b'0') * 10i128.pow(8 - i as u32);
            }
        }
        rest = &frac[digits..];
    }
    let offset_secs: i64 = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digit = |c: &u8| c.is_ascii_digit().then(|| i64::from(c - b'0'));
            let h = digit(h1)? * 10 + digit(h2)?;
            let m = digit(m1)? * 10 + digit(m2)?;
            if h > 23 || m > 59 {
                return None;
            }
            let secs = h * 3_600 + m * 60;
            if *sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };

    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_secs;
    Some(i128::from(secs) * NANOS_PER_SEC + nanos)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date, counted in whole
/// 400-year eras (146,097 days each) plus the day within the era, with the
/// year starting in March so that leap days fall at its end.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(config: Value) -> Validate {
        Validate::new(config).unwrap_or_else(|e| panic!("config refused: {e}"))
    }

    fn event(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("test event must be an object, got {other}"),
        }
    }

    /// 2026-12-04T12:00:00Z.
    fn now() -> i128 {
        parse_rfc3339("2026-12-04T12:00:00Z").unwrap_or_default()
    }

    #[test]
    fn parses_rfc3339_with_fraction_and_offset() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00Z"),
            Some(951_868_800 * NANOS_PER_SEC)
        );
        for bad in [
            "2026-02-30T00:00:00Z",
            "2026-11-29 16:01",
            "2026-11-29T16:01:15",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn far_future_timestamp_is_rejected_with_its_distance() {
        let v = plugin(Value::Object(Map::new()));
        let e = event(serde_json::json!({ "timestamp": "2031-01-01T00:00:00Z" }));
        assert_eq!(
            v.check(&e, now()),
            ["timestamp 2031-01-01T00:00:00Z is 4 years in the future (allowed skew 5m)"]
        );
    }

    #[test]
    fn skew_is_allowed_and_old_events_pass() {
        let v = plugin(serde_json::json!({ "max_future_skew": "10m" }));
        let soon = event(serde_json::json!({ "timestamp": "2026-12-04T12:09:00Z" }));
        let old = event(serde_json::json!({ "timestamp": "2019-01-01T00:00:00Z" }));
        assert!(v.check(&soon, now()).is_empty());
        assert!(v.check(&old, now()).is_empty());
        let late = event(serde_json::json!({ "timestamp": "2026-12-04T12:11:00Z" }));
        assert_eq!(
            v.check(&late, now()),
            ["timestamp 2026-12-04T12:11:00Z is 11 minutes in the future (allowed skew 10m)"]
        );
    }

    #[test]
    fn malformed_ids_are_named() {
        let v = plugin(Value::Object(Map::new()));
        let e = event(serde_json::json!({
            "metadata": { "user_id": "not-a-uuid", "event_id": 7,
                          "correlation_id": "0b6f4e2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b" },
            "payload": { "organization_id": "0B6F4E2A-1C3D-4E5F-8A9B-0C1D2E3F4A5B" },
        }));
        assert_eq!(
            v.check(&e, now()),
            [
                "metadata.event_id must be a uuid string, found a number",
                "metadata.user_id `not-a-uuid` is not a uuid (expected 8-4-4-4-12 hex digits)",
            ]
        );
    }

    #[test]
    fn oversized_payload_is_rejected() {
        let v = plugin(serde_json::json!({ "max_payload_bytes": 10 }));
        let e = event(serde_json::json!({ "payload": { "a": "0123456789" } }));
        assert_eq!(
            v.check(&e, now()),
            ["payload is 18 bytes, more than the 10 allowed"]
        );
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("5m"), Some(300));
        assert_eq!(parse_duration("1h30m"), Some(5_400));
        assert_eq!(parse_duration("45"), Some(45));
        assert_eq!(parse_duration("5 minutes"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(format_duration(300), "5m");
        assert_eq!(format_duration(5_400), "1h30m");
        assert_eq!(format_duration(90_061), "1d1h1m1s");
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(Validate::new(serde_json::json!({ "max_future_skew": "soon" })).is_err());
        assert!(Validate::new(serde_json::json!({ "max_skew": "5m" })).is_err());
    }
}
