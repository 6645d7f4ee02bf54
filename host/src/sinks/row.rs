//! What every sink makes of an event: its row, and what became of it.
//!
//! [`Row::from_event`] maps an event to the columns of `audit_logs`, the
//! same for every database, so that PostgreSQL and SQLite store the same
//! values. Values a database would refuse are made to fit by these rules,
//! so that they never cause a retry loop:
//!
//! - a NUL (`\u0000`) in any string or object key of the body is replaced
//!   by U+FFFD (an idempotency key never holds one: see [`crate::event`]);
//! - a `timestamp` that is not RFC 3339 leaves `occurred_at` NULL;
//! - an `ip_address` that is not an IPv4 or IPv6 address leaves the
//!   `ip_address` column NULL (the raw text stays in `metadata`).
//!
//! Whenever a rule fires, the row keeps the whole event as it reached the
//! sink (after the transforms, so that redaction holds) in `raw_body` and
//! names the rules in `anomalies`. [`RowOutcome`] is what a
//! sink reports for each event of a batch.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::event::{Event, Rejection};

/// What became of one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    /// A new row was committed.
    Stored,
    /// Its key was already stored (or came earlier in the same batch).
    Duplicate,
    /// The database refused the row for its content.
    Refused(Rejection),
}

/// One event's column values. Borrows from the event unless a value had to
/// be changed to fit.
#[derive(Debug)]
pub struct Row<'a> {
    pub event_id: Cow<'a, str>,
    pub event_type: Cow<'a, str>,
    pub service: Cow<'a, str>,
    pub version: Cow<'a, str>,
    pub payload: Cow<'a, Value>,
    pub metadata: Cow<'a, Value>,
    pub organization_id: Option<Cow<'a, str>>,
    pub user_id: Option<Cow<'a, str>>,
    pub ip_address: Option<String>,
    pub user_agent: Option<Cow<'a, str>>,
    pub correlation_id: Option<Cow<'a, str>>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub raw_body: Option<Vec<u8>>,
    pub anomalies: Option<String>,
}

static EMPTY_OBJECT: LazyLock<Value> = LazyLock::new(|| Value::Object(Map::new()));

impl<'a> Row<'a> {
    /// Maps an event to its row, applying the rules of this module's docs.
    pub fn from_event(e: &'a Event) -> Row<'a> {
        let body = &e.body;
        let payload = body.get("payload").unwrap_or(&EMPTY_OBJECT);
        let metadata = body
            .get("metadata")
            .filter(|m| m.is_object())
            .unwrap_or(&EMPTY_OBJECT);
        let mut anomalies = Vec::new();
        let occurred_at = parse_timestamp(body.get("timestamp"), &mut anomalies);
        let ip_address = parse_ip(metadata.get("ip_address"), &mut anomalies);
        let nul = contains_nul_map(body);
        if nul {
            anomalies.push("nul_replaced");
        }

        let text = |v: Option<&'a Value>| -> Option<Cow<'a, str>> {
            match v? {
                Value::String(s) => Some(clean_str(s, nul)),
                Value::Number(n) => Some(Cow::Owned(n.to_string())),
                _ => None,
            }
        };
        let json = |v: &'a Value| {
            if nul {
                Cow::Owned(clean_value(v))
            } else {
                Cow::Borrowed(v)
            }
        };
        let mut row = Row {
            event_id: clean_str(&e.key, nul),
            event_type: text(body.get("event_type")).unwrap_or_default(),
            service: text(body.get("service")).unwrap_or_default(),
            version: text(body.get("version")).unwrap_or(Cow::Borrowed("1.0")),
            payload: json(payload),
            metadata: json(metadata),
            organization_id: text(payload.get("organization_id"))
                .or_else(|| text(metadata.get("organization_id"))),
            user_id: text(metadata.get("user_id")).or_else(|| text(payload.get("user_id"))),
            ip_address,
            user_agent: text(metadata.get("user_agent")),
            correlation_id: text(metadata.get("correlation_id")),
            occurred_at,
            exchange: &e.exchange,
            routing_key: &e.routing_key,
            raw_body: None,
            anomalies: None,
        };
        if !anomalies.is_empty() {
            row.raw_body = Some(serde_json::to_vec(body).unwrap_or_default());
            row.anomalies = Some(anomalies.join(","));
        }
        row
    }
}

fn parse_timestamp(v: Option<&Value>, anomalies: &mut Vec<&'static str>) -> Option<DateTime<Utc>> {
    match v {
        None | Some(Value::Null) => None,
        Some(v) => {
            let parsed = v
                .as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
            if parsed.is_none() {
                anomalies.push("timestamp_unparseable");
            }
            parsed.map(|t| t.with_timezone(&Utc))
        }
    }
}

fn parse_ip(v: Option<&Value>, anomalies: &mut Vec<&'static str>) -> Option<String> {
    match v {
        None | Some(Value::Null) => None,
        Some(v) => {
            let parsed = v.as_str().and_then(|s| s.parse::<IpAddr>().ok());
            if parsed.is_none() {
                anomalies.push("ip_address_invalid");
            }
            parsed.map(|ip| ip.to_string())
        }
    }
}

fn clean_str(s: &str, nul: bool) -> Cow<'_, str> {
    if nul && s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// The value with every NUL in strings and keys replaced by U+FFFD.
fn clean_value(v: &Value) -> Value {
    match v {
        Value::String(s) if s.contains('\0') => Value::String(s.replace('\0', "\u{FFFD}")),
        Value::Array(items) => Value::Array(items.iter().map(clean_value).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.replace('\0', "\u{FFFD}"), clean_value(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(m) => contains_nul_map(m),
        _ => false,
    }
}

fn contains_nul_map(m: &Map<String, Value>) -> bool {
    m.iter().any(|(k, v)| k.contains('\0') || contains_nul(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: &str) -> Event {
        crate::event::test_event(body)
    }

    #[test]
    fn well_formed_event_maps_without_anomalies() {
        let e = event(
            r#"{"event_type":"a.b","service":"s","timestamp":"2026-11-29T12:00:00Z",
                "payload":{"organization_id":"o"},
                "metadata":{"event_id":"e-1","user_id":"u","ip_address":"2001:db8::1"}}"#,
        );
        let row = Row::from_event(&e);
        assert_eq!(row.event_id, "e-1");
        assert_eq!(row.version, "1.0");
        assert_eq!(row.organization_id.as_deref(), Some("o"));
        assert_eq!(row.user_id.as_deref(), Some("u"));
        assert_eq!(row.ip_address.as_deref(), Some("2001:db8::1"));
        assert!(row.occurred_at.is_some());
        assert_eq!(row.anomalies, None);
        assert_eq!(row.raw_body, None);
    }

    #[test]
    fn nul_bad_timestamp_and_bad_ip_are_named_in_anomalies() {
        let e = event(
            r#"{"event_type":"a","service":"s","timestamp":"yesterday",
                "payload":{"note":"x\u0000y"},"metadata":{"ip_address":"999.1.1.1"}}"#,
        );
        let row = Row::from_event(&e);
        assert_eq!(row.occurred_at, None);
        assert_eq!(row.ip_address, None);
        assert_eq!(row.payload["note"], "x\u{FFFD}y");
        assert_eq!(
            row.anomalies.as_deref(),
            Some("timestamp_unparseable,ip_address_invalid,nul_replaced")
        );
        assert!(row.raw_body.is_some());
    }
}
