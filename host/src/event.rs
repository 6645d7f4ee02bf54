//! What flows through a pipeline.
//!
//! A source hands the pipeline a [`Message`]: the body as received and the
//! transport's properties. [`Event::decode`] parses the body once into a JSON
//! object, checks the envelope every stage relies on (`event_type`,
//! `service`, `payload`) and computes the idempotency key from the message
//! as received, before any transform can touch it. Transforms then change
//! the event in place; the sink turns it into a row. When an event cannot go
//! on, a [`Rejection`] says why, and the original bytes of the message are
//! what gets dead-lettered.

use std::fmt;
use std::io::Write;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::KeySource;

/// A message as a source received it.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// The transport's message id (AMQP `message_id`), if any.
    pub message_id: Option<String>,
    /// The exchange the message was published to ("" for the default one).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
}

/// A decoded event on its way through the pipeline.
#[derive(Debug, Clone)]
pub struct Event {
    /// The idempotency key; fixed at decode time.
    pub key: String,
    /// The body as a JSON object; transforms may change it.
    pub body: Map<String, Value>,
    /// Exchange and routing key it came by, copied from the message.
    pub exchange: String,
    pub routing_key: String,
}

/// Why an event cannot be stored. Carried to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// A small fixed set, fit for a metric label.
    pub class: ReasonClass,
    /// The stage that refused the event: `decode`, a transform's name, or
    /// the sink's.
    pub stage: String,
    /// Human-readable reason, lowercase, no final period.
    pub reason: String,
}

impl Rejection {
    pub fn new(class: ReasonClass, stage: impl Into<String>, reason: impl Into<String>) -> Self {
        Rejection {
            class,
            stage: stage.into(),
            reason: reason.into(),
        }
    }

    fn decode(reason: impl Into<String>) -> Self {
        Rejection::new(ReasonClass::Decode, "decode", reason)
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, self.reason)
    }
}

/// Reason classes: the bounded label set for dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReasonClass {
    /// Not UTF-8, not JSON, not an object, or the envelope is incomplete.
    Decode,
    /// The event does not match its JSON Schema, or has none under a
    /// `reject` policy.
    Schema,
    /// A plugin rejected the event, trapped or misbehaved.
    Plugin,
    /// The database refused the event's row.
    Database,
    /// The message was delivered more often than allowed.
    DeliveryLimit,
}

impl ReasonClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonClass::Decode => "decode",
            ReasonClass::Schema => "schema",
            ReasonClass::Plugin => "plugin",
            ReasonClass::Database => "database",
            ReasonClass::DeliveryLimit => "delivery_limit",
        }
    }
}

impl Event {
    /// Parses a message's body and computes its idempotency key.
    ///
    /// # Errors
    ///
    /// A [`ReasonClass::Decode`] rejection when the body is not UTF-8, not
    /// JSON, not an object, or lacks a string `event_type`, a string
    /// `service` or an object `payload`.
    pub fn decode(msg: &Message, key: &[KeySource]) -> Result<Event, Rejection> {
        let text = std::str::from_utf8(&msg.body).map_err(|e| {
            Rejection::decode(format!(
                "body is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Rejection::decode(format!("body is not JSON: {e}")))?;
        let Value::Object(body) = value else {
            return Err(Rejection::decode(format!(
                "body is JSON but not an object (found {})",
                json_kind(&value)
            )));
        };
        check_envelope(&body)?;
        let key = idempotency_key(&body, msg, key);
        if key.contains('\0') {
            // Replacing the NUL, as the sink does in values, could make
            // two distinct keys one and skip an event as a duplicate.
            return Err(Rejection::decode(
                "the idempotency key (the producer's event_id or message id) contains a NUL \
                 character, which the store cannot keep"
                    .to_string(),
            ));
        }
        Ok(Event {
            key,
            body,
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
        })
    }

    /// The event's `event_type`. Always a string after decoding, unless a
    /// transform removed it, in which case it is empty.
    pub fn event_type(&self) -> &str {
        self.str_field("event_type").unwrap_or("")
    }

    /// A top-level string field.
    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.body.get(name).and_then(Value::as_str)
    }

    /// A string at `object.field`, e.g. `metadata.user_id`.
    pub fn nested_str(&self, object: &str, field: &str) -> Option<&str> {
        self.body.get(object)?.get(field)?.as_str()
    }
}

/// Checks the fields every stage relies on: a non-empty string
/// `event_type` and `service`, an object `payload`, and `metadata` absent or
/// an object.
///
/// # Errors
///
/// A [`ReasonClass::Decode`] rejection naming the first field at fault.
pub fn check_envelope(body: &Map<String, Value>) -> Result<(), Rejection> {
    for field in ["event_type", "service"] {
        match body.get(field) {
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::String(_)) => return Err(Rejection::decode(format!("`{field}` is empty"))),
            Some(other) => {
                return Err(Rejection::decode(format!(
                    "`{field}` must be a string, found {}",
                    json_kind(other)
                )))
            }
            None => return Err(Rejection::decode(format!("missing `{field}`"))),
        }
    }
    match body.get("payload") {
        Some(Value::Object(_)) => {}
        Some(other) => {
            return Err(Rejection::decode(format!(
                "`payload` must be an object, found {}",
                json_kind(other)
            )))
        }
        None => return Err(Rejection::decode("missing `payload`")),
    }
    match body.get("metadata") {
        None | Some(Value::Object(_)) | Some(Value::Null) => Ok(()),
        Some(other) => Err(Rejection::decode(format!(
            "`metadata` must be an object, found {}",
            json_kind(other)
        ))),
    }
}

/// A word for a JSON value's type, for error messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The first key source that yields a non-empty string; `sha256` always
/// yields, and is used when the list has no match.
pub fn idempotency_key(body: &Map<String, Value>, msg: &Message, sources: &[KeySource]) -> String {
    for source in sources {
        let found = match source {
            KeySource::Field(path) => lookup(body, path).map(str::to_string),
            KeySource::MessageId => msg.message_id.clone().filter(|s| !s.is_empty()),
            KeySource::Sha256 => Some(canonical_sha256(body)),
        };
        if let Some(k) = found {
            return k;
        }
    }
    canonical_sha256(body)
}

fn lookup<'a>(body: &'a Map<String, Value>, path: &[String]) -> Option<&'a str> {
    let (first, rest) = path.split_first()?;
    let mut v = body.get(first)?;
    for p in rest {
        v = v.get(p)?;
    }
    v.as_str().filter(|s| !s.is_empty())
}

/// `sha256:` and the hex digest of the canonical JSON of `body`: object keys
/// sorted by their UTF-8 bytes, no insignificant whitespace, strings and
/// numbers as serde_json writes them.
pub fn canonical_sha256(body: &Map<String, Value>) -> String {
    let mut hasher = HashWriter(Sha256::new());
    write_object(&mut hasher, body);
    format!("sha256:{}", hex::encode(hasher.0.finalize()))
}

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_object(h: &mut HashWriter, map: &Map<String, Value>) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_unstable();
    h.0.update(b"{");
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            h.0.update(b",");
        }
        write_scalar(h, k);
        h.0.update(b":");
        write_value(h, &map[k]);
    }
    h.0.update(b"}");
}

fn write_value(h: &mut HashWriter, v: &Value) {
    match v {
        Value::Object(m) => write_object(h, m),
        Value::Array(items) => {
            h.0.update(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    h.0.update(b",");
                }
                write_value(h, item);
            }
            h.0.update(b"]");
        }
        scalar => write_scalar(h, scalar),
    }
}

fn write_scalar(h: &mut HashWriter, v: &(impl serde::Serialize + ?Sized)) {
    // Writing a scalar into a hasher cannot fail: the writer never errors.
    let _ = serde_json::to_writer(&mut *h, v);
}

/// An event decoded from `body` with the default key sources, for tests.
#[cfg(test)]
pub(crate) fn test_event(body: &str) -> Event {
    let msg = Message {
        body: body.as_bytes().to_vec(),
        ..Message::default()
    };
    Event::decode(&msg, &crate::config::IdempotencyConfig::default().key)
        .expect("test body decodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> Message {
        Message {
            body: body.as_bytes().to_vec(),
            ..Message::default()
        }
    }

    fn default_key() -> Vec<KeySource> {
        crate::config::IdempotencyConfig::default().key
    }

    const GOOD: &str = r#"{"event_type":"a.b","service":"s","payload":{},"metadata":{"event_id":"e-1","correlation_id":"c"}}"#;

    #[test]
    fn event_id_is_the_key_when_present() {
        let e = Event::decode(&msg(GOOD), &default_key()).expect("decodes");
        assert_eq!(e.key, "e-1");
        assert_eq!(e.event_type(), "a.b");
    }

    #[test]
    fn message_id_is_the_key_without_event_id() {
        let mut m = msg(r#"{"event_type":"a","service":"s","payload":{}}"#);
        m.message_id = Some("m-7".into());
        assert_eq!(
            Event::decode(&m, &default_key()).expect("decodes").key,
            "m-7"
        );
    }

    #[test]
    fn a_key_with_a_nul_is_refused_not_merged_with_its_lookalike() {
        let body = r#"{"event_type":"a","service":"s","payload":{"s":"x\u0000"}}"#;
        let mut with_nul = msg(body);
        with_nul.message_id = Some("m\0b".into());
        let why = Event::decode(&with_nul, &default_key()).expect_err("refused");
        assert_eq!(why.class, ReasonClass::Decode);
        assert!(why.reason.contains("NUL"), "{}", why.reason);

        let field =
            r#"{"event_type":"a","service":"s","payload":{},"metadata":{"event_id":"e\u0000"}}"#;
        assert!(Event::decode(&msg(field), &default_key()).is_err());

        let mut lookalike = msg(body);
        lookalike.message_id = Some("m\u{FFFD}b".into());
        let key = Event::decode(&lookalike, &default_key())
            .expect("decodes")
            .key;
        assert_eq!(key, "m\u{FFFD}b");
    }

    #[test]
    fn correlation_id_alone_never_becomes_the_key() {
        let a = r#"{"event_type":"a","service":"s","payload":{"n":1},"metadata":{"correlation_id":"c"}}"#;
        let b = r#"{"event_type":"a","service":"s","payload":{"n":2},"metadata":{"correlation_id":"c"}}"#;
        let ka = Event::decode(&msg(a), &default_key()).expect("decodes").key;
        let kb = Event::decode(&msg(b), &default_key()).expect("decodes").key;
        assert_ne!(ka, kb);
        assert!(ka.starts_with("sha256:"));
    }

    #[test]
    fn hash_ignores_key_order_and_whitespace() {
        let a = r#"{"event_type":"a","service":"s","payload":{"x":1,"y":[1,2]}}"#;
        let b = r#"{ "payload": {"y": [1, 2], "x": 1}, "service": "s", "event_type": "a" }"#;
        let ka = Event::decode(&msg(a), &default_key()).expect("decodes").key;
        let kb = Event::decode(&msg(b), &default_key()).expect("decodes").key;
        assert_eq!(ka, kb);
    }

    #[test]
    fn bad_bodies_are_rejected_with_a_reason() {
        let cases = [
            (&b"\xff\xfe"[..], "not UTF-8"),
            (b"not json", "not JSON"),
            (b"[1,2]", "not an object (found an array)"),
            (br#"{"service":"s","payload":{}}"#, "missing `event_type`"),
            (br#"{"event_type":"a","payload":{}}"#, "missing `service`"),
            (br#"{"event_type":"a","service":"s"}"#, "missing `payload`"),
            (
                br#"{"event_type":1,"service":"s","payload":{}}"#,
                "`event_type` must be a string",
            ),
            (
                br#"{"event_type":"a","service":"s","payload":[]}"#,
                "`payload` must be an object",
            ),
        ];
        for (body, want) in cases {
            let m = Message {
                body: body.to_vec(),
                ..Message::default()
            };
            let err = Event::decode(&m, &default_key()).expect_err("must be rejected");
            assert_eq!(err.class, ReasonClass::Decode);
            assert!(
                err.reason.contains(want),
                "{:?} gave {}",
                String::from_utf8_lossy(body),
                err
            );
        }
    }
}
