//! Adds what an audit row needs besides the event itself, inside `metadata`
//! so that it is stored with the event, and redacts personal data.
//!
//! - `metadata.actor`: who acted, `metadata.user_id` when the event has it.
//! - `metadata.user_agent_info`: `{ browser, os, bot }` read from
//!   `metadata.user_agent`, when the event has one. `browser` is one of
//!   Firefox, Chrome, Safari, Edge, curl or other; `os` one of Windows,
//!   macOS, Linux, Android, iOS or other. `bot` is true for a client that
//!   says it is automated: crawlers (Googlebot, bingbot, anything calling
//!   itself a bot, crawler or spider), headless browsers and command-line
//!   or library HTTP clients (curl, Wget, python-requests, Go's client).
//!   A person's browser is never a bot.
//! - `metadata.severity`: from the `severity` table by `event_type`, else
//!   `default_severity`.
//! - Redaction, last, so that nothing added above escapes it: string values
//!   of payload fields named in `redact` (at any depth, names compared
//!   without case) and, with `redact_emails_anywhere`, every email address
//!   anywhere in the event, in values and keys alike, are replaced by
//!   `hmac-sha256:` and the hex HMAC-SHA256 of the value under
//!   `redact_key`. The same value always gives the same pseudonym, so rows
//!   can still be joined on it; an email address is lowercased first, so
//!   `Ann@Example.com` and `ann@example.com` match. A value that is already
//!   a pseudonym is left alone.
//!
//! The fields above overwrite whatever the producer put there.
//!
//! ```toml
//! [[transforms]]
//! type = "wasm"
//! name = "enrich"
//! path = "../plugins/target/wasm32-wasip2/release/enrich.wasm"
//!
//! [transforms.config]
//! default_severity = "low"
//! severity = { "user.login_failed" = "high", "user.role_granted" = "high" }
//! redact = ["email", "phone"]
//! redact_key = "${WEIR_REDACT_KEY}"
//! redact_emails_anywhere = true
//! ```
//!
//! `redact_key` is required whenever something is to be redacted, which is
//! the default (`redact_emails_anywhere` is on). Changing the key later
//! changes every pseudonym: rows stored before and after no longer join.

use std::collections::{BTreeMap, HashMap};

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;
use weir_plugin_sdk::{export_plugin, object_mut, serde_json, Map, Meta, Outcome, Plugin, Value};

/// What replaces a redacted value, before the hex digest.
const PSEUDONYM_PREFIX: &str = "hmac-sha256:";

/// The plugin's `config` table, as weir hands it over.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    severity: BTreeMap<String, String>,
    #[serde(default = "default_severity")]
    default_severity: String,
    #[serde(default)]
    redact: Vec<String>,
    #[serde(default)]
    redact_key: Option<String>,
    #[serde(default = "default_redact_emails_anywhere")]
    redact_emails_anywhere: bool,
}

fn default_severity() -> String {
    "low".into()
}

fn default_redact_emails_anywhere() -> bool {
    true
}

/// The built plugin.
pub struct Enrich {
    severity: BTreeMap<String, String>,
    default_severity: String,
    /// Field names to redact, lowercased.
    redact: Vec<String>,
    redact_emails_anywhere: bool,
    /// Keyed once; cloned for every value. `None` when nothing is redacted.
    mac: Option<Hmac<Sha256>>,
    /// `user_agent_info` by User-Agent header: a service sees few distinct
    /// ones, and reading one takes a few dozen substring searches.
    user_agents: HashMap<String, Value>,
}

/// The most User-Agent headers remembered; the memory is emptied when full.
const USER_AGENT_CACHE: usize = 1024;

impl Plugin for Enrich {
    fn new(config: Value) -> Result<Self, String> {
        let config: Config =
            serde_json::from_value(config).map_err(|e| format!("invalid enrich config: {e}"))?;
        let redacts = !config.redact.is_empty() || config.redact_emails_anywhere;
        let mac = match config.redact_key.as_deref() {
            Some("") => return Err("redact_key must not be empty".into()),
            Some(key) => Some(
                Hmac::<Sha256>::new_from_slice(key.as_bytes())
                    .map_err(|e| format!("redact_key is not usable: {e}"))?,
            ),
            None if redacts => {
                return Err("redact_key is required when redact is non-empty or \
                     redact_emails_anywhere is on (the default); set redact_key, or set \
                     redact = [] and redact_emails_anywhere = false"
                    .into())
            }
            None => None,
        };
        Ok(Enrich {
            severity: config.severity,
            default_severity: config.default_severity,
            redact: config.redact.iter().map(|f| f.to_lowercase()).collect(),
            redact_emails_anywhere: config.redact_emails_anywhere,
            mac,
            user_agents: HashMap::new(),
        })
    }

    fn process(&mut self, event: &mut Map<String, Value>, meta: &Meta<'_>) -> Outcome {
        let severity = self
            .severity
            .get(meta.event_type)
            .unwrap_or(&self.default_severity)
            .clone();
        let Some(metadata) = object_mut(event, "metadata") else {
            return Outcome::Reject("metadata is not an object, so it cannot be enriched".into());
        };
        if let Some(user_id) = metadata.get("user_id").filter(|v| v.is_string()).cloned() {
            metadata.insert("actor".into(), user_id);
        }
        if let Some(ua) = metadata.get("user_agent").and_then(Value::as_str) {
            let info = match self.user_agents.get(ua) {
                Some(info) => info.clone(),
                None => {
                    let info = user_agent_info(ua);
                    if self.user_agents.len() >= USER_AGENT_CACHE {
                        self.user_agents.clear();
                    }
                    self.user_agents.insert(ua.to_string(), info.clone());
                    info
                }
            };
            metadata.insert("user_agent_info".into(), info);
        }
        metadata.insert("severity".into(), Value::String(severity));

        if let Some(mac) = &self.mac {
            let redactor = Redactor { mac };
            if let (false, Some(Value::Object(payload))) =
                (self.redact.is_empty(), event.get_mut("payload"))
            {
                redactor.named_fields(payload, &self.redact);
            }
            if self.redact_emails_anywhere {
                redactor.emails_in_object(event);
            }
        }
        Outcome::Keep
    }
}

export_plugin!(Enrich);

/// `{ browser, os, bot }` for a User-Agent header.
fn user_agent_info(ua: &str) -> Value {
    let mut info = Map::new();
    info.insert("browser".into(), Value::from(browser(ua)));
    info.insert("os".into(), Value::from(os(ua)));
    info.insert("bot".into(), Value::Bool(is_bot(ua)));
    Value::Object(info)
}

fn browser(ua: &str) -> &'static str {
    let has = |s: &str| ua.contains(s);
    // Order matters: Edge and Opera also say Chrome and Safari, and Chrome
    // also says Safari.
    if has("Edg/") || has("Edge/") || has("EdgA/") || has("EdgiOS/") {
        "Edge"
    } else if has("OPR/") || has("Opera") {
        "other"
    } else if has("Firefox/") || has("FxiOS/") {
        "Firefox"
    } else if has("Chrome/") || has("CriOS/") || has("Chromium/") {
        "Chrome"
    } else if has("Safari/") {
        "Safari"
    } else if ua.starts_with("curl/") {
        "curl"
    } else {
        "other"
    }
}

fn os(ua: &str) -> &'static str {
    let has = |s: &str| ua.contains(s);
    // iOS says "like Mac OS X" and Android says Linux, so both go first.
    if has("iPhone") || has("iPad") || has("iPod") {
        "iOS"
    } else if has("Android") {
        "Android"
    } else if has("Windows") {
        "Windows"
    } else if has("Macintosh") || has("Mac OS X") {
        "macOS"
    } else if has("Linux") || has("X11") {
        "Linux"
    } else {
        "other"
    }
}

fn is_bot(ua: &str) -> bool {
    const MARKS: [&str; 9] = [
        "bot",
        "crawler",
        "spider",
        "slurp",
        "headlesschrome",
        "curl/",
        "wget/",
        "python-requests/",
        "go-http-client/",
    ];
    let ua = ua.to_ascii_lowercase();
    MARKS.iter().any(|m| ua.contains(m))
}

/// Replaces values by their keyed pseudonyms.
struct Redactor<'a> {
    mac: &'a Hmac<Sha256>,
}

impl Redactor<'_> {
    /// `hmac-sha256:<hex>` of `value`, lowercased first if it is an email
    /// address.
    fn pseudonym(&self, value: &str) -> String {
        self.pseudonym_of(value, is_email(value))
    }

    /// [`Redactor::pseudonym`] for a caller that knows whether `value` is
    /// an email address.
    fn pseudonym_of(&self, value: &str, email: bool) -> String {
        let mut mac = self.mac.clone();
        if email {
            mac.update(value.to_lowercase().as_bytes());
        } else {
            mac.update(value.as_bytes());
        }
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(PSEUDONYM_PREFIX.len() + 64);
        out.push_str(PSEUDONYM_PREFIX);
        for b in digest {
            out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
        }
        out
    }

    /// Redacts every string under a field named in `names`, at any depth.
    fn named_fields(&self, object: &mut Map<String, Value>, names: &[String]) {
        for (key, value) in object.iter_mut() {
            if names.iter().any(|n| n.eq_ignore_ascii_case(key)) {
                self.all_strings(value);
            } else {
                match value {
                    Value::Object(inner) => self.named_fields(inner, names),
                    Value::Array(items) => {
                        for item in items.iter_mut().filter_map(Value::as_object_mut) {
                            self.named_fields(item, names);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn all_strings(&self, value: &mut Value) {
        match value {
            Value::String(s) if !s.starts_with(PSEUDONYM_PREFIX) => *s = self.pseudonym(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.all_strings(v)),
            Value::Object(map) => map.values_mut().for_each(|v| self.all_strings(v)),
            _ => {}
        }
    }

    /// Replaces every email address in `object`'s keys and string values,
    /// at any depth.
    fn emails_in_object(&self, object: &mut Map<String, Value>) {
        if object.keys().any(|k| k.contains('@')) {
            let old = std::mem::take(object);
            for (key, value) in old {
                object.insert(self.emails_in_text(&key).unwrap_or(key), value);
            }
        }
        object.values_mut().for_each(|v| self.emails_in_value(v));
    }

    fn emails_in_value(&self, value: &mut Value) {
        match value {
            Value::String(s) => {
                if let Some(redacted) = self.emails_in_text(s) {
                    *s = redacted;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.emails_in_value(v)),
            Value::Object(map) => self.emails_in_object(map),
            _ => {}
        }
    }

    /// `text` with each email address in it replaced, or `None` if it has
    /// none.
    fn emails_in_text(&self, text: &str) -> Option<String> {
        let spans = email_spans(text);
        if spans.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for (start, end) in spans {
            out.push_str(&text[last..start]);
            out.push_str(&self.pseudonym_of(&text[start..end], true));
            last = end;
        }
        out.push_str(&text[last..]);
        Some(out)
    }
}

/// Whether all of `text` is one email address.
fn is_email(text: &str) -> bool {
    email_spans(text) == [(0, text.len())]
}

/// Byte ranges of what looks like an email address in `text`: a non-empty
/// local part and a domain around an `@`. Deliberately generous, since a
/// missed address is a leak and a redacted non-address is only a
/// pseudonym. Non-ASCII letters count, for internationalized addresses.
fn email_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let local =
        |c: u8| c >= 0x80 || c.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&c);
    let domain = |c: u8| c >= 0x80 || c.is_ascii_alphanumeric() || c == b'-' || c == b'.';
    let mut spans = Vec::new();
    let mut from = 0;
    for at in memchr_all(b, b'@') {
        if at < from {
            continue;
        }
        let mut start = at;
        while start > from && local(b[start - 1]) {
            start -= 1;
        }
        while start < at && b[start] == b'.' {
            start += 1;
        }
        let mut end = at + 1;
        while end < b.len() && domain(b[end]) {
            end += 1;
        }
        while end > at + 1 && matches!(b[end - 1], b'.' | b'-') {
            end -= 1;
        }
        let has_domain = b[at + 1..end]
            .iter()
            .any(|c| *c >= 0x80 || c.is_ascii_alphanumeric());
        if start < at && has_domain {
            spans.push((start, end));
            from = end;
        }
    }
    spans
}

fn memchr_all(haystack: &[u8], needle: u8) -> impl Iterator<Item = usize> + '_ {
    haystack
        .iter()
        .enumerate()
        .filter(move |(_, c)| **c == needle)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(config: Value) -> Enrich {
        Enrich::new(config).unwrap_or_else(|e| panic!("config refused: {e}"))
    }

    fn meta(event_type: &str) -> Meta<'_> {
        Meta {
            key: "k",
            event_type,
            exchange: "auth_events",
            routing_key: event_type,
        }
    }

    fn run(p: &mut Enrich, event_type: &str, v: Value) -> Map<String, Value> {
        let Value::Object(mut e) = v else {
            panic!("test event must be an object")
        };
        assert_eq!(p.process(&mut e, &meta(event_type)), Outcome::Keep);
        e
    }

    fn keyed() -> Value {
        serde_json::json!({
            "redact_key": "k",
            "redact": ["email"],
            "severity": { "user.login_failed": "high" },
        })
    }

    #[test]
    fn adds_actor_severity_and_user_agent_info() {
        let mut p = plugin(keyed());
        let e = run(
            &mut p,
            "user.login_failed",
            serde_json::json!({
                "payload": {},
                "metadata": {
                    "user_id": "0b6f4e2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b",
                    "user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
                                   (KHTML, like Gecko) Chrome/120.0 Safari/537.36 Edg/120.0",
                },
            }),
        );
        let m = &e["metadata"];
        assert_eq!(m["actor"], "0b6f4e2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(m["severity"], "high");
        assert_eq!(
            m["user_agent_info"],
            serde_json::json!({ "browser": "Edge", "os": "Windows", "bot": false })
        );
        let e = run(
            &mut p,
            "order.created",
            serde_json::json!({ "payload": {} }),
        );
        assert_eq!(e["metadata"]["severity"], "low");
        assert!(e["metadata"].get("actor").is_none());
    }

    #[test]
    fn recognises_common_user_agents() {
        let cases = [
            ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1", "Safari", "iOS", false),
            ("Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0", "Firefox", "Linux", false),
            ("Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari/537.36", "Chrome", "Android", false),
            ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15", "Safari", "macOS", false),
            ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "other", "other", true),
            ("curl/8.5.0", "curl", "other", true),
            ("Wget/1.21.4", "other", "other", true),
        ];
        for (ua, b, o, bot) in cases {
            assert_eq!((browser(ua), os(ua), is_bot(ua)), (b, o, bot), "{ua}");
        }
    }

    #[test]
    fn no_email_address_survives() {
        let mut p = plugin(keyed());
        let e = run(
            &mut p,
            "user.registered",
            serde_json::json!({
                "payload": { "email": "Ann@Example.com", "note": "cc bob.smith+x@mail.example.org.",
                             "list": [{ "email": ["c@d.io"] }], "a@b.c": 1 },
                "metadata": { "user_agent": "MyBot/1.0 (+ops@bots.example)" },
                "contact": "root@localhost",
            }),
        );
        let text = serde_json::to_string(&e).unwrap_or_default();
        assert!(!text.contains('@'), "{text}");
        let email = e["payload"]["email"].as_str().unwrap_or_default();
        assert!(
            email.starts_with("hmac-sha256:") && email.len() == 12 + 64,
            "{email}"
        );
        // Case does not change an address's pseudonym.
        let again = run(
            &mut p,
            "x",
            serde_json::json!({ "payload": { "email": "ann@example.com" } }),
        );
        assert_eq!(again["payload"]["email"], e["payload"]["email"]);
        assert!(e["payload"]["note"]
            .as_str()
            .unwrap_or_default()
            .ends_with('.'));
        assert_eq!(e["metadata"]["user_agent_info"]["bot"], true);
    }

    #[test]
    fn named_fields_are_redacted_even_without_an_at_sign() {
        let mut p = plugin(serde_json::json!({ "redact_key": "k", "redact": ["Phone"] }));
        let e = run(
            &mut p,
            "x",
            serde_json::json!({ "payload": { "inner": { "phone": "555-0100" } } }),
        );
        assert!(e["payload"]["inner"]["phone"]
            .as_str()
            .unwrap_or_default()
            .starts_with(PSEUDONYM_PREFIX));
    }

    #[test]
    fn redaction_needs_a_key() {
        let err = Enrich::new(serde_json::json!({ "redact": ["email"] }))
            .err()
            .unwrap_or_default();
        assert!(err.contains("redact_key is required"), "{err}");
        assert!(Enrich::new(serde_json::json!({ "redact_emails_anywhere": false })).is_ok());
        assert!(Enrich::new(serde_json::json!({ "redact_kye": "k" })).is_err());
    }

    #[test]
    fn email_spans_find_addresses_only() {
        assert_eq!(email_spans("a@b"), [(0, 3)]);
        assert_eq!(email_spans("to: x.y@z.com, w@v.org."), [(4, 13), (15, 22)]);
        assert!(email_spans("@handle and foo@ and @").is_empty());
    }
}
