//! The pipeline file: one `[source]`, an ordered `[[transforms]]` list and one
//! `[sink]`, in TOML.
//!
//! Loading a file expands `${VAR}` and `${VAR:-default}` from the
//! environment, deserializes it into the typed structs below (unknown keys and
//! wrong types are refused with the file, line and key path), then runs the
//! checks that span several sections, such as a batch that could never fill
//! within the prefetch window. Paths inside a pipeline file are relative to
//! the file's own directory.
//!
//! Every struct here is `deny_unknown_fields` and `snake_case`; each field's
//! doc states its default and unit. The reference pipeline that sets every
//! key is `pipelines/reference.toml`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A pipeline file that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read pipeline file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but says something weir cannot run. `line` is
    /// 1-based; the display form is `file:line: message`.
    #[error("{}:{line}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl ConfigError {
    fn invalid(path: &Path, line: usize, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

/// A loaded pipeline: its typed configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The pipeline file as given on the command line.
    pub path: PathBuf,
    /// The directory relative paths in the file are resolved against.
    pub base_dir: PathBuf,
    /// The file's text after environment expansion, kept so later checks
    /// (schemas, plugins) can report a line.
    pub text: String,
    pub config: PipelineConfig,
}

impl Pipeline {
    /// Reads, expands and checks a pipeline file.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] if the file cannot be read, and
    /// [`ConfigError::Invalid`] with a line for anything else.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &raw, |name| std::env::var(name).ok())
    }

    /// Parses pipeline text as if it had been read from `path`, looking
    /// environment variables up with `env`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] with the line of the first problem.
    pub fn parse(
        path: &Path,
        raw: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text =
            expand_env(raw, &env).map_err(|(line, msg)| ConfigError::invalid(path, line, msg))?;
        let config = deserialize(path, &text)?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let pipeline = Pipeline {
            path: path.to_path_buf(),
            base_dir,
            text,
            config,
        };
        pipeline.check()?;
        Ok(pipeline)
    }

    /// Resolves a path written in the pipeline file.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The 1-based line where `key` is set inside the table `table`
    /// (`"sink"`, `"transforms"` with its index, ...), or the table's header
    /// line, or 1. Used to point at a key that deserialized fine but does not
    /// make sense with the rest of the file.
    pub fn line_of(&self, table: &str, index: usize, key: Option<&str>) -> usize {
        line_of(&self.text, table, index, key)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        if let (Some(prefetch), Some(max_events)) = (c.source.prefetch(), c.sink.max_events()) {
            if max_events > prefetch as usize {
                return Err(ConfigError::invalid(
                    &self.path,
                    self.line_of("sink", 0, Some("max_events")),
                    format!(
                        "sink.max_events ({max_events}) is larger than source.prefetch \
                         ({prefetch}): a batch would wait for deliveries the broker will not \
                         send until it is acked; lower max_events or raise prefetch"
                    ),
                ));
            }
        }
        if let Some(0) = c.sink.max_events() {
            return Err(ConfigError::invalid(
                &self.path,
                self.line_of("sink", 0, Some("max_events")),
                "sink.max_events must be at least 1",
            ));
        }
        if let SinkConfig::Sqlite(s) = &c.sink {
            if s.path.is_some() == s.url.is_some() {
                return Err(ConfigError::invalid(
                    &self.path,
                    self.line_of(
                        "sink",
                        0,
                        Some(if s.url.is_some() { "url" } else { "type" }),
                    ),
                    "a sqlite sink needs exactly one of `path` (relative to the pipeline file) \
                     or `url` (e.g. \"sqlite://audit.db\")",
                ));
            }
        }
        if let SourceConfig::Amqp(a) = &c.source {
            if a.queue_type == QueueType::Quorum && !a.durable {
                return Err(ConfigError::invalid(
                    &self.path,
                    self.line_of("source", 0, Some("durable")),
                    "a quorum queue is always durable: remove `durable = false` or use \
                     queue_type = \"classic\"",
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in c.transforms.iter().enumerate() {
            let name = t.name();
            if ["decode", "source", "sink"].contains(&name) || !names.insert(name) {
                return Err(ConfigError::invalid(
                    &self.path,
                    self.line_of("transforms", i, Some("name")),
                    format!(
                        "transform name `{name}` is taken: names must be unique and not \
                         `decode`, `source` or `sink`, which dead letters and metrics use for \
                         the other stages"
                    ),
                ));
            }
        }
        if c.idempotency.key.is_empty() {
            return Err(ConfigError::invalid(
                &self.path,
                self.line_of("idempotency", 0, Some("key")),
                "idempotency.key needs at least one source, e.g. [\"sha256\"]",
            ));
        }
        Ok(())
    }
}

fn deserialize(path: &Path, text: &str) -> Result<PipelineConfig, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(path, text, &e, None))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        toml_error(path, text, e.inner(), Some(key))
    })
}

fn toml_error(path: &Path, text: &str, e: &toml::de::Error, key: Option<String>) -> ConfigError {
    let line = e.span().map(|s| line_at(text, s.start)).unwrap_or(1);
    let message = match key {
        Some(key) if key != "." && !key.is_empty() => format!("{key}: {}", e.message()),
        _ => e.message().to_string(),
    };
    ConfigError::invalid(path, line, message.trim_end().to_string())
}

/// The 1-based line of a byte offset in `text`.
pub fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The 1-based line where `key` is set in the `index`-th `[table]` or
/// `[[table]]` of `text`, or that table's header line, or 1.
pub fn line_of(text: &str, table: &str, index: usize, key: Option<&str>) -> usize {
    let headers = [format!("[{table}]"), format!("[[{table}]]")];
    let mut seen = 0;
    let mut in_table = false;
    let mut header_line = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if in_table && header_line.is_some() && !t.starts_with(&format!("[{table}.")) {
                break;
            }
            if headers.iter().any(|h| t == h) {
                if seen == index {
                    in_table = true;
                    header_line = Some(n + 1);
                }
                seen += 1;
            }
            continue;
        }
        if let (true, Some(key)) = (in_table, key) {
            let rest = t.strip_prefix(key).map(str::trim_start);
            if rest.is_some_and(|r| r.starts_with('=')) {
                return n + 1;
            }
        }
    }
    header_line.unwrap_or(1)
}

/// Replaces `${VAR}` and `${VAR:-default}` in pipeline text. `$$` stands for
/// a literal `$`. A value is escaped for a TOML basic string, since that is
/// where references are written.
///
/// On failure returns the 1-based line and the message.
fn expand_env(raw: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(raw.len());
    for (n, line) in raw.split_inclusive('\n').enumerate() {
        // A comment line is kept as it is: it may mention a variable that
        // is deliberately unset.
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let tail = &rest[at + 1..];
            if let Some(after) = tail.strip_prefix('$') {
                out.push('$');
                rest = after;
                continue;
            }
            let Some(body) = tail.strip_prefix('{') else {
                out.push('$');
                rest = tail;
                continue;
            };
            let Some(end) = body.find('}') else {
                return Err((n + 1, "unterminated `${` in environment reference".into()));
            };
            let reference = &body[..end];
            let (name, default) = match reference.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (reference, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err((
                    n + 1,
                    format!("`${{{reference}}}` is not a valid environment reference"),
                ));
            }
            let value = match (env(name), default) {
                (Some(v), None) => v,
                (Some(v), Some(_)) if !v.is_empty() => v,
                (_, Some(d)) => d.to_string(),
                (None, None) => {
                    return Err((
                        n + 1,
                        format!(
                            "environment variable {name} is not set; set it or write \
                             ${{{name}:-default}}"
                        ),
                    ))
                }
            };
            push_escaped(&mut out, &value);
            rest = &body[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

fn push_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
}

/// Implements `Deserialize` for a stage enum chosen by a `type` key that
/// comes first in its table. Unlike serde's internally tagged enums, which
/// buffer the table and lose positions, the rest of the table is read
/// straight from the file, so an error keeps its line and key path.
macro_rules! tagged_enum {
    ($enum:ident, $what:literal, { $($tag:literal => $variant:ident),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $enum {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $enum;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a {} table starting with `type = ...`", $what)
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<$enum, A::Error> {
                        const TAGS: &[&str] = &[$($tag),+];
                        match map.next_key::<String>()?.as_deref() {
                            Some("type") => {}
                            _ => {
                                return Err(serde::de::Error::custom(format!(
                                    "a {} table must start with `type = ...`, one of {}",
                                    $what,
                                    TAGS.join(", ")
                                )))
                            }
                        }
                        let tag: String = map.next_value()?;
                        let rest = serde::de::value::MapAccessDeserializer::new(map);
                        match tag.as_str() {
                            $($tag => Deserialize::deserialize(rest).map($enum::$variant),)+
                            other => Err(serde::de::Error::unknown_variant(other, TAGS)),
                        }
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}

/// The whole pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct PipelineConfig {
    /// Where events come from. Required.
    pub source: SourceConfig,
    /// Stages each event passes through, in order. Default: none.
    #[serde(default)]
    pub transforms: Vec<TransformConfig>,
    /// Where events are stored. Required.
    pub sink: SinkConfig,
    /// How an event's identity is computed. Default: see
    /// [`IdempotencyConfig`].
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// How transient failures are retried. Default: see [`RetryConfig`].
    #[serde(default)]
    pub retry: RetryConfig,
}

/// Backoff for transient failures of a whole stage (database or broker
/// unreachable): each retry waits a random time between half and all of
/// `initial * 2^attempt`, capped at `max`, while nothing new is consumed.
///
/// ```toml
/// [retry]
/// initial = "100ms"
/// max = "30s"
/// ```
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RetryConfig {
    /// First wait. Default `"100ms"`.
    #[serde(default = "default_retry_initial", deserialize_with = "de_duration")]
    pub initial: Duration,
    /// Longest wait. Default `"30s"`.
    #[serde(default = "default_retry_max", deserialize_with = "de_duration")]
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: default_retry_initial(),
            max: default_retry_max(),
        }
    }
}

fn default_retry_initial() -> Duration {
    Duration::from_millis(100)
}

fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}

/// The idempotency key, computed from the message as received, before any
/// transform, so no plugin can change it.
///
/// ```toml
/// [idempotency]
/// key = ["field:metadata.event_id", "message_id", "sha256"]
/// ```
///
/// Changing the key sources on a table that already holds rows means the
/// same event may be stored again under its new key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct IdempotencyConfig {
    /// Sources tried in order; the first that yields a non-empty string
    /// wins. `field:<dotted.path>` reads a string from the body,
    /// `message_id` the AMQP property, `sha256` hashes the body's canonical
    /// JSON (always yields). Default: the three shown above.
    #[serde(default = "default_key")]
    pub key: Vec<KeySource>,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig { key: default_key() }
    }
}

fn default_key() -> Vec<KeySource> {
    vec![
        KeySource::Field(vec!["metadata".into(), "event_id".into()]),
        KeySource::MessageId,
        KeySource::Sha256,
    ]
}

/// One place the idempotency key can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A string at this path in the body, e.g. `metadata.event_id`.
    Field(Vec<String>),
    /// The transport's message id (AMQP `message_id`).
    MessageId,
    /// `sha256:` and the hex SHA-256 of the body's canonical JSON.
    Sha256,
}

impl<'de> Deserialize<'de> for KeySource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "message_id" => Ok(KeySource::MessageId),
            "sha256" => Ok(KeySource::Sha256),
            _ => match s.strip_prefix("field:") {
                Some(path) if !path.is_empty() && path.split('.').all(|p| !p.is_empty()) => Ok(
                    KeySource::Field(path.split('.').map(str::to_string).collect()),
                ),
                _ => Err(serde::de::Error::custom(format!(
                    "unknown key source `{s}`, expected `field:<dotted.path>`, `message_id` or \
                     `sha256`"
                ))),
            },
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Field(p) => write!(f, "field:{}", p.join(".")),
            KeySource::MessageId => f.write_str("message_id"),
            KeySource::Sha256 => f.write_str("sha256"),
        }
    }
}

/// The `[source]` table, chosen by `type`.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    Amqp(AmqpSourceConfig),
    File(FileSourceConfig),
}

tagged_enum!(SourceConfig, "source", { "amqp" => Amqp, "file" => File });

impl SourceConfig {
    /// The most deliveries the source hands out before they are acked, if
    /// it has such a window.
    pub fn prefetch(&self) -> Option<u16> {
        match self {
            SourceConfig::Amqp(a) => Some(a.prefetch),
            SourceConfig::File(_) => None,
        }
    }
}

/// An AMQP 0-9-1 (RabbitMQ) queue, with the topology weir declares for it.
///
/// ```toml
/// [source]
/// type = "amqp"
/// url = "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
/// queue = "audit_service_queue"
/// prefetch = 50
/// message_ttl = "1h"
///
/// [[source.exchanges]]
/// name = "order_events"
/// binding_key = "#"
///
/// [source.dead_letter]
/// exchange = "audit_dlq"
/// queue = "audit_dlq_queue"
/// routing_key = "audit_dlq"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct AmqpSourceConfig {
    /// Broker URL, `amqp://user:pass@host:port/vhost` (the default vhost `/`
    /// is written `%2f`). Required.
    pub url: String,
    /// The queue to consume. Required. weir declares it; if it already
    /// exists with other arguments, weir refuses to start.
    pub queue: String,
    /// Whether the queue survives a broker restart. Default: true.
    /// Changing it on an existing queue makes weir refuse to start until
    /// the queue is deleted by hand.
    #[serde(default = "default_true")]
    pub durable: bool,
    /// Most unacknowledged deliveries the broker sends at once. Default 50.
    /// A sink's `max_events` may not exceed it.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// `x-message-ttl`: how long a message may wait in the queue before the
    /// broker dead-letters it, e.g. `"1h"`. Default: none (no expiry).
    /// Changing it on an existing queue makes weir refuse to start.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub message_ttl: Option<Duration>,
    /// Consumer tag shown in the broker's management UI. Default: chosen by
    /// the broker.
    #[serde(default)]
    pub consumer_tag: Option<String>,
    /// Connection name shown by `rabbitmqctl list_connections` and the
    /// management UI. Default `"weir"`. The queue-depth probe's connection
    /// gets the same name with `-probe` appended. Give each instance its
    /// own, e.g. `connection_name = "weir-${HOSTNAME:-local}"`, to tell them
    /// apart.
    #[serde(default = "default_connection_name")]
    pub connection_name: String,
    /// `classic` (the default, as the audit service has always declared
    /// it) or `quorum` (replicated, with a broker-side delivery limit).
    /// Changing it on an existing queue makes weir refuse to start.
    #[serde(default)]
    pub queue_type: QueueType,
    /// Most deliveries of one message; the next one is dead-lettered as a
    /// poison message (class `delivery_limit`). Quorum queues count with
    /// `x-delivery-count`, and the limit is also declared as their
    /// `x-delivery-limit`, so the broker sets the message aside itself
    /// should weir die on it every time. On classic queues, which keep no
    /// count, weir counts redelivered messages in the sink's database
    /// (`weir_redeliveries`), or in memory for sinks without one. Every
    /// return counts, a graceful restart's too, so keep it well above the
    /// restarts a message may live through. Default 20.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// Exchanges the queue is bound to. Default: none (the queue only gets
    /// what is published to it directly).
    #[serde(default)]
    pub exchanges: Vec<ExchangeBinding>,
    /// Where rejected and expired messages go. Required: weir never drops a
    /// message it cannot store.
    pub dead_letter: DeadLetterConfig,
}

/// RabbitMQ queue types weir can declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

impl AmqpSourceConfig {
    /// The delivery limit in force.
    pub fn effective_delivery_limit(&self) -> Option<u32> {
        Some(self.delivery_limit)
    }
}

/// An exchange weir declares and binds its queue to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ExchangeBinding {
    /// Exchange name. Required.
    pub name: String,
    /// `topic`, `direct`, `fanout` or `headers`. Default `topic`.
    #[serde(default = "default_topic", rename = "type")]
    pub kind: ExchangeKind,
    /// Default true. Must match an existing exchange of the same name.
    #[serde(default = "default_true")]
    pub durable: bool,
    /// Binding key, e.g. `#` for everything on a topic exchange. Default `#`.
    #[serde(default = "default_binding_key")]
    pub binding_key: String,
}

/// AMQP exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeKind {
    Topic,
    Direct,
    Fanout,
    Headers,
}

/// The dead-letter exchange and queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct DeadLetterConfig {
    /// Exchange name; set as the queue's `x-dead-letter-exchange`. Required.
    pub exchange: String,
    /// Exchange type. Default `direct`.
    #[serde(default = "default_direct", rename = "type")]
    pub kind: ExchangeKind,
    /// Queue that collects dead letters, bound to the exchange with
    /// `routing_key`. Required.
    pub queue: String,
    /// Routing key of every dead letter; set as the queue's
    /// `x-dead-letter-routing-key` so that expired messages reach the same
    /// queue as the ones weir rejects. Default `audit_dlq`.
    #[serde(default = "default_dlq_key")]
    pub routing_key: String,
}

/// NDJSON from a file, or from standard input, one event per line: weir
/// with no broker.
///
/// ```toml
/// [source]
/// type = "file"
/// path = "../samples/domain-events.ndjson"
/// follow = false
/// dead_letter = { path = "../dead-letters.ndjson" }
/// ```
///
/// The input is read from its first line. Nothing is acknowledged: reading
/// a file again is harmless, since the sink's unique key makes a second
/// insert of an event a no-op.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileSourceConfig {
    /// The NDJSON file, relative to the pipeline file, or `-` for standard
    /// input. Required.
    pub path: PathBuf,
    /// Keep waiting for lines appended to the file, like `tail -f`, until
    /// SIGINT or SIGTERM. Default false: the source ends at the end of the
    /// file, and weir writes the last batch and exits. Standard input always
    /// ends when its writer closes it.
    #[serde(default)]
    pub follow: bool,
    /// How often a followed file is checked for new lines. Default
    /// `"250ms"`.
    #[serde(default = "default_poll_interval", deserialize_with = "de_duration")]
    pub poll_interval: Duration,
    /// Where lines that cannot be stored go. Required: weir never drops a
    /// line silently.
    pub dead_letter: FileDeadLetterConfig,
}

/// The file that collects a file source's dead letters: one JSON object per
/// line with `reason`, `class`, `stage`, `line`, `source`, `key` and
/// `body`.
///
/// ```toml
/// dead_letter = { path = "../dead-letters.ndjson" }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileDeadLetterConfig {
    /// The file, relative to the pipeline file. Required. Created when
    /// missing, appended to otherwise; weir never truncates it.
    pub path: PathBuf,
}

/// One entry of `[[transforms]]`, chosen by `type`. Events pass through
/// them in the order they are written.
#[derive(Debug, Clone)]
pub enum TransformConfig {
    Schema(SchemaTransformConfig),
    Wasm(WasmTransformConfig),
}

tagged_enum!(TransformConfig, "transform", { "schema" => Schema, "wasm" => Wasm });

impl TransformConfig {
    /// The stage's name, used in dead-letter reasons, logs and metrics.
    pub fn name(&self) -> &str {
        match self {
            TransformConfig::Schema(s) => &s.name,
            TransformConfig::Wasm(w) => &w.name,
        }
    }
}

/// Checks each event against the JSON Schema of its `event_type` and
/// `version`.
///
/// ```toml
/// [[transforms]]
/// type = "schema"
/// dir = "../schemas"
/// on_missing = "store"
/// on_invalid = "dead_letter"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct SchemaTransformConfig {
    /// Stage name. Default `schema`.
    #[serde(default = "default_schema_name")]
    pub name: String,
    /// Directory of `<event_type>/<version>.json` files, relative to the
    /// pipeline file. Required.
    pub dir: PathBuf,
    /// An event whose type has no schema. Default `store` (and count it in
    /// `weir_schema_missing_total`).
    #[serde(default = "default_on_missing")]
    pub on_missing: SchemaPolicy,
    /// An event that fails its schema. Default `dead_letter`, with every
    /// failing location in the reason.
    #[serde(default = "default_on_invalid")]
    pub on_invalid: SchemaPolicy,
}

/// What the schema stage does with an event it cannot vouch for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaPolicy {
    /// Let it through to the sink, counting it.
    Store,
    /// Send it to the dead-letter queue with the reason.
    DeadLetter,
    /// Acknowledge it and store nothing, counting it.
    Drop,
}

/// Runs a WebAssembly component that implements weir's plugin contract
/// (`plugins/wit/plugin.wit`).
///
/// ```toml
/// [[transforms]]
/// type = "wasm"
/// name = "enrich"
/// path = "../plugins/target/wasm32-wasip2/release/enrich.wasm"
/// fuel = 50_000_000
/// max_memory = "32MiB"
/// [transforms.config]
/// redact = ["email"]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct WasmTransformConfig {
    /// Stage name, in dead-letter reasons and metrics. Required.
    pub name: String,
    /// The component file, relative to the pipeline file. Required.
    pub path: PathBuf,
    /// Fuel for one call (roughly one unit per WebAssembly instruction).
    /// Default 50,000,000. A call that runs out fails its event only.
    #[serde(default = "default_fuel")]
    pub fuel: u64,
    /// Most linear memory the plugin may hold, e.g. `"32MiB"`. Default
    /// `"32MiB"`. A call that needs more fails its event only.
    #[serde(default = "default_max_memory", deserialize_with = "de_bytes")]
    pub max_memory: u64,
    /// The plugin's own settings, handed to it as JSON at start. Default: an
    /// empty table.
    #[serde(default)]
    pub config: toml::Table,
}

/// The `[sink]` table, chosen by `type`.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    Postgres(PostgresSinkConfig),
    Blackhole(BlackholeSinkConfig),
    Sqlite(SqliteSinkConfig),
    Console(ConsoleSinkConfig),
}

tagged_enum!(SinkConfig, "sink", {
    "postgres" => Postgres,
    "blackhole" => Blackhole,
    "sqlite" => Sqlite,
    "console" => Console,
});

impl SinkConfig {
    /// The sink's `type`, as written in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Postgres(_) => "postgres",
            SinkConfig::Blackhole(_) => "blackhole",
            SinkConfig::Sqlite(_) => "sqlite",
            SinkConfig::Console(_) => "console",
        }
    }

    /// The batch size the sink flushes at, if it batches.
    pub fn max_events(&self) -> Option<usize> {
        Some(self.batch().max_events)
    }

    /// When the sink flushes.
    pub fn batch(&self) -> BatchConfig {
        match self {
            SinkConfig::Postgres(p) => BatchConfig {
                max_events: p.max_events,
                max_wait: p.max_wait,
            },
            SinkConfig::Blackhole(b) => BatchConfig {
                max_events: b.max_events,
                max_wait: b.max_wait,
            },
            SinkConfig::Sqlite(s) => BatchConfig {
                max_events: s.max_events,
                max_wait: s.max_wait,
            },
            SinkConfig::Console(c) => BatchConfig {
                max_events: c.max_events,
                max_wait: c.max_wait,
            },
        }
    }
}

/// When a batch is written: whichever of the two comes first.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_events: usize,
    pub max_wait: Duration,
}

/// PostgreSQL: rows in `audit_logs`, created by the migrations in
/// `migrations/postgres`, applied at start.
///
/// ```toml
/// [sink]
/// type = "postgres"
/// url = "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
/// max_events = 25
/// max_wait = "20ms"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct PostgresSinkConfig {
    /// Connection URL. Required.
    pub url: String,
    /// Flush once this many events wait. Default 25. At most the source's
    /// prefetch; below it, the broker keeps delivering while a batch
    /// commits (at the default prefetch of 50, a batch of 25 fills while
    /// the one before commits). See the README's "Performance" section for
    /// how 25 was chosen.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Flush once the oldest waiting event has waited this long, by a timer.
    /// Default `"20ms"`.
    #[serde(default = "default_max_wait", deserialize_with = "de_duration")]
    pub max_wait: Duration,
    /// Most connections the sink opens, and so most batches written at
    /// once: while one batch commits, the next can be written beside it.
    /// Default 2.
    #[serde(default = "default_pool")]
    pub pool_size: u32,
    /// How long to wait for a connection before the attempt counts as
    /// failed and is retried. Default `"5s"`.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Whether to apply the migrations at start. Default true. Turn off when
    /// a separate deploy step owns the schema.
    #[serde(default = "default_true")]
    pub migrate: bool,
}

/// Counts and acknowledges events, stores nothing. For measuring the rest of
/// the pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct BlackholeSinkConfig {
    /// As for PostgreSQL. Default 25.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// As for PostgreSQL. Default `"20ms"`.
    #[serde(default = "default_max_wait", deserialize_with = "de_duration")]
    pub max_wait: Duration,
}

/// SQLite: rows in `audit_logs` of a database file, with the same columns,
/// unique key and value rules as PostgreSQL. The file is created when
/// missing, put in WAL mode, and migrated with `migrations/sqlite` at
/// start. No server needed.
///
/// ```toml
/// [sink]
/// type = "sqlite"
/// path = "../audit.db"
/// max_events = 25
/// max_wait = "20ms"
/// ```
///
/// Give `path` or `url`, not both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct SqliteSinkConfig {
    /// The database file, relative to the pipeline file like every path in
    /// it. Default: none.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A SQLite URL such as `"sqlite://audit.db"`. A relative file in a URL
    /// is relative to the current directory, as every SQLite tool reads
    /// it. Default: none.
    #[serde(default)]
    pub url: Option<String>,
    /// As for PostgreSQL. Default 25. One transaction per batch.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// As for PostgreSQL. Default `"20ms"`.
    #[serde(default = "default_max_wait", deserialize_with = "de_duration")]
    pub max_wait: Duration,
    /// How long a write waits while another process holds the database's
    /// lock (say, a `sqlite3` shell writing) before the batch is retried.
    /// Default `"5s"`.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub busy_timeout: Duration,
}

/// Prints each event, after the transforms, as one line of JSON on standard
/// output, and acknowledges everything. For piping into other tools; logs
/// and the closing summary go to standard error.
///
/// ```toml
/// [sink]
/// type = "console"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ConsoleSinkConfig {
    /// As for PostgreSQL. Default 25.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// As for PostgreSQL. Default `"20ms"`.
    #[serde(default = "default_max_wait", deserialize_with = "de_duration")]
    pub max_wait: Duration,
}

fn default_schema_name() -> String {
    "schema".into()
}
fn default_on_missing() -> SchemaPolicy {
    SchemaPolicy::Store
}
fn default_on_invalid() -> SchemaPolicy {
    SchemaPolicy::DeadLetter
}
fn default_fuel() -> u64 {
    50_000_000
}
fn default_max_memory() -> u64 {
    32 << 20
}
fn default_delivery_limit() -> u32 {
    20
}
fn default_true() -> bool {
    true
}
fn default_connection_name() -> String {
    "weir".to_string()
}
fn default_prefetch() -> u16 {
    50
}
fn default_topic() -> ExchangeKind {
    ExchangeKind::Topic
}
fn default_direct() -> ExchangeKind {
    ExchangeKind::Direct
}
fn default_binding_key() -> String {
    "#".into()
}
fn default_dlq_key() -> String {
    "audit_dlq".into()
}
fn default_max_events() -> usize {
    25
}
fn default_max_wait() -> Duration {
    Duration::from_millis(20)
}
fn default_pool() -> u32 {
    2
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(250)
}

/// Deserializes a humantime duration string such as `"250ms"` or `"1h"`.
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration like \"250ms\" or \"1h\": {e}"
        ))
    })
}

/// Deserializes a size such as `"32MiB"`, `"512KiB"`, `"1GiB"` or a plain
/// number of bytes.
pub fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(s) => parse_bytes(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("`{s}` is not a size like \"32MiB\" or \"512KiB\""))
        }),
    }
}

fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// A connection URL without its password, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_urls() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    const MINIMAL: &str = r#"
[source]
type = "amqp"
url = "${AMQP_URL:-amqp://127.0.0.1:5672/%2f}"
queue = "q"

[source.dead_letter]
exchange = "dlx"
queue = "dlq"

[sink]
type = "blackhole"
"#;

    fn parse(text: &str) -> Result<Pipeline, ConfigError> {
        Pipeline::parse(Path::new("p.toml"), text, |_| None)
    }

    #[test]
    fn minimal_pipeline_takes_defaults() -> Result<(), ConfigError> {
        let p = parse(MINIMAL)?;
        let SourceConfig::Amqp(a) = &p.config.source else {
            panic!("MINIMAL has an amqp source");
        };
        assert_eq!(a.url, "amqp://127.0.0.1:5672/%2f");
        assert_eq!(a.prefetch, 50);
        assert!(a.durable);
        assert_eq!(a.dead_letter.routing_key, "audit_dlq");
        assert_eq!(p.config.sink.max_events(), Some(25));
        assert_eq!(p.config.idempotency.key, default_key());
        Ok(())
    }

    #[test]
    fn rejects_unknown_pipeline_key_with_line_and_path() {
        let text = MINIMAL.replace("queue = \"q\"", "queue = \"q\"\nqueue_nmae = \"x\"");
        let err = parse(&text)
            .expect_err("unknown key must be refused")
            .to_string();
        assert!(err.starts_with("p.toml:6: "), "{err}");
        assert!(err.contains("queue_nmae"), "{err}");
    }

    #[test]
    fn rejects_wrong_type_naming_the_key() {
        let text = MINIMAL.replace("queue = \"q\"", "queue = \"q\"\nprefetch = \"many\"");
        let err = parse(&text)
            .expect_err("wrong type must be refused")
            .to_string();
        assert!(err.contains("p.toml:6: "), "{err}");
        assert!(err.contains("prefetch"), "{err}");
    }

    #[test]
    fn rejects_missing_key() {
        let text = MINIMAL.replace("queue = \"q\"\n", "");
        let err = parse(&text)
            .expect_err("missing queue must be refused")
            .to_string();
        assert!(err.contains("queue"), "{err}");
    }

    #[test]
    fn expands_environment_with_defaults_and_escapes() {
        let env = |name: &str| (name == "AMQP_URL").then(|| "amqp://a\"b".to_string());
        let p = Pipeline::parse(Path::new("p.toml"), MINIMAL, env).expect("parses");
        let SourceConfig::Amqp(a) = &p.config.source else {
            panic!("MINIMAL has an amqp source");
        };
        assert_eq!(a.url, "amqp://a\"b");
    }

    #[test]
    fn unset_variable_without_default_is_refused_with_its_name() {
        let text = MINIMAL.replace("${AMQP_URL:-amqp://127.0.0.1:5672/%2f}", "${NOPE_URL}");
        let err = parse(&text).expect_err("unset var").to_string();
        assert!(err.starts_with("p.toml:4: "), "{err}");
        assert!(err.contains("NOPE_URL"), "{err}");
    }

    #[test]
    fn batch_larger_than_prefetch_is_refused() {
        let text = format!("{MINIMAL}max_events = 51\n");
        let err = parse(&text).expect_err("batch > prefetch").to_string();
        assert!(err.contains("max_events (51)"), "{err}");
        assert!(err.starts_with("p.toml:13: "), "{err}");
    }

    #[test]
    fn key_sources_parse() {
        let text = format!("{MINIMAL}\n[idempotency]\nkey = [\"field:a.b\", \"sha256\"]\n");
        let p = parse(&text).expect("parses");
        assert_eq!(
            p.config.idempotency.key,
            vec![
                KeySource::Field(vec!["a".into(), "b".into()]),
                KeySource::Sha256
            ]
        );
        let bad = format!("{MINIMAL}\n[idempotency]\nkey = [\"correlation\"]\n");
        assert!(parse(&bad).is_err());
    }
    const LOCAL: &str = r#"
[source]
type = "file"
path = "events.ndjson"
dead_letter = { path = "dead.ndjson" }

[sink]
type = "sqlite"
path = "audit.db"
max_events = 500
"#;

    #[test]
    fn file_source_and_sqlite_sink_take_defaults_and_have_no_prefetch() {
        let p = parse(LOCAL).expect("parses");
        let SourceConfig::File(f) = &p.config.source else {
            panic!("LOCAL has a file source");
        };
        assert_eq!(f.path, Path::new("events.ndjson"));
        assert!(!f.follow);
        assert_eq!(f.poll_interval, Duration::from_millis(250));
        assert_eq!(f.dead_letter.path, Path::new("dead.ndjson"));
        assert_eq!(p.config.source.prefetch(), None);
        let SinkConfig::Sqlite(s) = &p.config.sink else {
            panic!("LOCAL has a sqlite sink");
        };
        assert_eq!(s.path.as_deref(), Some(Path::new("audit.db")));
        assert_eq!(s.url, None);
        assert_eq!(s.busy_timeout, Duration::from_secs(5));
        assert_eq!(p.config.sink.max_events(), Some(500));
    }

    #[test]
    fn file_source_requires_a_dead_letter_file() {
        let text = LOCAL.replace("dead_letter = { path = \"dead.ndjson\" }\n", "");
        let err = parse(&text).expect_err("no dead_letter").to_string();
        assert!(err.contains("dead_letter"), "{err}");
    }

    #[test]
    fn sqlite_sink_needs_exactly_one_of_path_and_url() {
        let both = LOCAL.replace(
            "path = \"audit.db\"",
            "path = \"a.db\"\nurl = \"sqlite://a.db\"",
        );
        let err = parse(&both).expect_err("path and url").to_string();
        assert!(err.starts_with("p.toml:10: "), "{err}");
        assert!(err.contains("exactly one of `path`"), "{err}");
        let neither = LOCAL.replace("path = \"audit.db\"\n", "");
        assert!(parse(&neither).is_err());
        let url = LOCAL.replace("path = \"audit.db\"", "url = \"sqlite://audit.db\"");
        assert!(parse(&url).is_ok());
    }

    #[test]
    fn console_sink_parses_and_refuses_unknown_keys() {
        let text = LOCAL.replace(
            "type = \"sqlite\"\npath = \"audit.db\"\nmax_events = 500",
            "type = \"console\"",
        );
        let p = parse(&text).expect("parses");
        assert!(matches!(p.config.sink, SinkConfig::Console(_)));
        let bad = format!("{text}colour = true\n");
        let err = parse(&bad).expect_err("unknown key").to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn transform_names_must_be_unique() {
        let stage = "\n[[transforms]]\ntype = \"schema\"\ndir = \"s\"\n";
        let text = MINIMAL.replace("[sink]", &format!("{stage}{stage}\n[sink]"));
        let err = parse(&text)
            .expect_err("two stages named schema")
            .to_string();
        assert!(err.contains("transform name `schema` is taken"), "{err}");
    }

    /// pipelines/reference.toml sets every key to something other than its
    /// default; reading it back shows each key is understood.
    #[test]
    fn reference_pipeline_sets_every_key() -> Result<(), ConfigError> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/reference.toml");
        let p = Pipeline::load(&path)?;
        let SourceConfig::Amqp(a) = &p.config.source else {
            panic!("the reference source is amqp");
        };
        assert!(a.durable && a.prefetch == 100 && a.delivery_limit == 3);
        assert_eq!(a.message_ttl, Some(Duration::from_secs(1800)));
        assert_eq!(a.consumer_tag.as_deref(), Some("weir-reference"));
        assert_eq!(a.connection_name, "weir-reference");
        assert_eq!(a.queue_type, QueueType::Quorum);
        let ex = &a.exchanges[0];
        assert_eq!(
            (ex.kind, ex.durable, ex.binding_key.as_str()),
            (ExchangeKind::Topic, true, "order.*")
        );
        assert_eq!(a.dead_letter.routing_key, "weir_reference_dlq");
        let [TransformConfig::Wasm(v), TransformConfig::Schema(s), TransformConfig::Wasm(f)] =
            p.config.transforms.as_slice()
        else {
            panic!("the reference has wasm, schema, wasm transforms");
        };
        assert_eq!((v.fuel, v.max_memory), (20_000_000, 16 << 20));
        assert!(v.config.contains_key("max_future_skew"));
        assert_eq!(
            (s.name.as_str(), s.on_missing, s.on_invalid),
            ("contract", SchemaPolicy::DeadLetter, SchemaPolicy::Drop)
        );
        assert_eq!(f.name, "quiet");
        assert_eq!(p.config.idempotency.key.len(), 2);
        assert_eq!(p.config.retry.initial, Duration::from_millis(250));
        assert_eq!(p.config.retry.max, Duration::from_secs(10));
        let SinkConfig::Postgres(pg) = &p.config.sink else {
            panic!("the reference sink is postgres");
        };
        assert_eq!((pg.max_events, pg.pool_size, pg.migrate), (100, 4, false));
        assert_eq!(pg.max_wait, Duration::from_millis(50));
        assert_eq!(pg.connect_timeout, Duration::from_secs(2));
        Ok(())
    }
}
