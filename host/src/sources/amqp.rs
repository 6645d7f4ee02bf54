//! The AMQP 0-9-1 source: RabbitMQ through lapin.
//!
//! At start it declares the topology the pipeline file describes (the
//! dead-letter exchange and queue, the bound exchanges, the queue with its
//! TTL and dead-letter arguments), sets the prefetch window and consumes
//! with manual acknowledgements. Dead letters are published on a second
//! channel in confirm mode, with `mandatory` set, so that a dead letter the
//! broker could not route is noticed rather than silently lost; only after
//! the broker confirms it is the original delivery acknowledged.
//!
//! Acknowledgements are gathered: [`AmqpSource::ack`] only notes a delivery
//! as settled, and [`AmqpSource::flush_acks`] sends one `basic.ack` with
//! `multiple` set for the highest delivery tag below which every delivery
//! of the link is settled. A batch of fifty events then costs one frame
//! instead of fifty round trips through lapin.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::basic::AMQPProperties;
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use std::collections::BTreeSet;
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::config::{redact_url, AmqpSourceConfig, ExchangeKind as Kind, QueueType, RetryConfig};
use crate::event::{Message, Rejection};
use crate::metrics::Metrics;
use crate::retry::Backoff;

/// What can go wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The queue exists with arguments that differ from the pipeline's. The
    /// queue and its messages are left alone.
    #[error(
        "queue `{queue}` already exists with other arguments ({detail}); weir leaves it and its \
         messages alone: make the pipeline file match it, or move its messages and delete it"
    )]
    QueueMismatch { queue: String, detail: String },
    /// An exchange exists with another type or durability.
    #[error(
        "exchange `{exchange}` already exists with another type or durability ({detail}); make \
         the pipeline file match it"
    )]
    ExchangeMismatch { exchange: String, detail: String },
    /// The broker could not route a dead letter to any queue.
    #[error(
        "dead letter was not routed by exchange `{exchange}` with routing key `{routing_key}`; \
         is the dead-letter queue bound?"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    /// The broker refused (nacked) a dead letter.
    #[error("broker refused to take a dead letter on exchange `{0}`")]
    Nacked(String),
    /// Anything else from lapin: connection, channel or protocol.
    #[error("{context}")]
    Broker {
        context: String,
        #[source]
        source: lapin::Error,
    },
}

impl AmqpError {
    fn broker(context: impl Into<String>) -> impl FnOnce(lapin::Error) -> AmqpError {
        let context = context.into();
        move |source| AmqpError::Broker { context, source }
    }

    /// Whether waiting and reconnecting may fix this. A topology mismatch
    /// never fixes itself.
    pub fn is_transient(&self) -> bool {
        match self {
            AmqpError::QueueMismatch { .. } | AmqpError::ExchangeMismatch { .. } => false,
            AmqpError::Unroutable { .. } | AmqpError::Nacked(_) => true,
            AmqpError::Broker { source, .. } => source.can_be_recovered(),
        }
    }
}

/// One message handed out by the broker, not yet acknowledged.
#[derive(Debug)]
pub struct Delivery {
    /// The message as received.
    pub message: Message,
    /// Whether the broker says it delivered this message before.
    pub redelivered: bool,
    /// How often the broker delivered it before (`x-delivery-count`, set
    /// by quorum queues); `None` where the queue keeps no count.
    pub delivery_count: Option<u32>,
    properties: AMQPProperties,
    /// The broker's number for this delivery on its channel; tags rise by
    /// one with each delivery.
    tag: u64,
    generation: u64,
}

/// The longest weir waits for the broker at each step of shutting down.
const SHUTDOWN_STEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Header that marks a message sent back by `weir replay`.
pub const REPLAYED: &str = "x-weir-replayed";
/// Headers that keep where a dead letter first came from.
pub const ORIGINAL_EXCHANGE: &str = "x-weir-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "x-weir-original-routing-key";

/// One connection with its channels and consumer. Replaced as a whole when
/// the broker connection or a channel fails.
struct Link {
    connection: Connection,
    consume: Channel,
    publish: Channel,
    consumer: Consumer,
}

/// Opens a connection named after the source's `connection_name` and
/// `suffix`, so each of weir's connections can be told apart by the broker.
async fn connect(cfg: &AmqpSourceConfig, suffix: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("{}{suffix}", cfg.connection_name).into());
    Connection::connect(&cfg.url, props)
        .await
        .map_err(AmqpError::broker(format!(
            "cannot connect to the broker at {}",
            redact_url(&cfg.url)
        )))
}

impl Link {
    /// Connects, declares the topology and starts consuming.
    async fn open(cfg: &AmqpSourceConfig) -> Result<Link, AmqpError> {
        let connection = connect(cfg, "").await?;
        info!(url = %redact_url(&cfg.url), "Connected to the broker.");

        let consume = connection
            .create_channel()
            .await
            .map_err(AmqpError::broker("cannot open a channel"))?;
        declare_topology(&connection, cfg).await?;
        consume
            .basic_qos(cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(AmqpError::broker("cannot set the prefetch window"))?;

        let publish = connection
            .create_channel()
            .await
            .map_err(AmqpError::broker("cannot open the dead-letter channel"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::broker("cannot turn on publisher confirms"))?;

        let consumer = consume
            .basic_consume(
                &cfg.queue,
                cfg.consumer_tag.as_deref().unwrap_or(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(AmqpError::broker(format!(
                "cannot consume from queue `{}`",
                cfg.queue
            )))?;
        info!(queue = %cfg.queue, prefetch = cfg.prefetch, "Consuming.");
        Ok(Link {
            connection,
            consume,
            publish,
            consumer,
        })
    }

    /// Closes channels and connection, giving each step a bounded time: a
    /// half-open connection must not hold up shutdown.
    async fn close(&self) {
        let steps = async {
            let _ = self.publish.close(200, "weir shutting down").await;
            let _ = self.consume.close(200, "weir shutting down").await;
            let _ = self.connection.close(200, "weir shutting down").await;
        };
        if tokio::time::timeout(SHUTDOWN_STEP * 2, steps)
            .await
            .is_err()
        {
            warn!("The broker connection did not close in time; leaving it.");
        }
    }
}

/// A connected, consuming AMQP source that reconnects by itself.
///
/// Every delivery remembers the link (its generation) it came on. Once a
/// link fails, the broker puts its unacknowledged messages back in the
/// queue; their delivery tags mean nothing on the next link, so settling a
/// delivery of an old generation does nothing, and the message is handled
/// again when it comes back (a no-op in the sink, thanks to its key).
pub struct AmqpSource {
    cfg: AmqpSourceConfig,
    link: Link,
    generation: u64,
    /// Set when a settle call found the link dead; the next `next` call
    /// reconnects.
    broken: bool,
    stopping: bool,
    retry: RetryConfig,
    metrics: Option<Arc<Metrics>>,
    /// Which deliveries of the current link are settled but not yet
    /// acknowledged to the broker.
    acks: AckTracker,
}

/// Delivery tags of one link: those handed out and not settled, and those
/// settled whose acknowledgement is not sent yet.
///
/// A `multiple` acknowledgement of tag `t` settles every delivery up to
/// `t` at the broker, so it may only be sent once no delivery at or below
/// `t` is still open. Deliveries are handed out in tag order, so every tag
/// below the highest one handed out is either open or settled here.
#[derive(Debug, Default)]
struct AckTracker {
    open: BTreeSet<u64>,
    settled: BTreeSet<u64>,
}

impl AckTracker {
    fn received(&mut self, tag: u64) {
        self.open.insert(tag);
    }

    fn settled(&mut self, tag: u64) {
        if self.open.remove(&tag) {
            self.settled.insert(tag);
        }
    }

    /// The highest tag that can be acknowledged with `multiple` now, and
    /// forgets the tags it covers.
    fn take_ackable(&mut self) -> Option<u64> {
        let below = self.open.first().copied().unwrap_or(u64::MAX);
        let tag = self.settled.range(..below).next_back().copied()?;
        self.settled = self.settled.split_off(&(tag + 1));
        Some(tag)
    }

    fn clear(&mut self) {
        self.open.clear();
        self.settled.clear();
    }
}

impl AmqpSource {
    /// Connects, declares the topology and starts consuming.
    ///
    /// # Errors
    ///
    /// [`AmqpError::QueueMismatch`] when the queue exists with other
    /// arguments; [`AmqpError::Broker`] when the broker cannot be reached.
    pub async fn connect(cfg: &AmqpSourceConfig) -> Result<AmqpSource, AmqpError> {
        Ok(AmqpSource {
            cfg: cfg.clone(),
            link: Link::open(cfg).await?,
            generation: 0,
            broken: false,
            stopping: false,
            retry: RetryConfig::default(),
            metrics: None,
            acks: AckTracker::default(),
        })
    }

    /// Uses these backoff bounds when reconnecting.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Reports readiness and reconnections here.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The next delivery; `None` once the consumer was stopped. A failed
    /// link is replaced, with backoff, before this returns.
    ///
    /// # Errors
    ///
    /// Only what reconnecting cannot fix, such as a queue that now exists
    /// with other arguments.
    pub async fn next(&mut self) -> Option<Result<Delivery, AmqpError>> {
        loop {
            if self.broken && !self.stopping {
                if let Err(e) = self.reconnect().await {
                    return Some(Err(e));
                }
            }
            match self.link.consumer.next().await {
                Some(Ok(d)) => {
                    self.acks.received(d.delivery_tag);
                    return Some(Ok(self.delivery(d)));
                }
                Some(Err(error)) if !self.stopping => {
                    warn!(%error, "Broker connection lost; reconnecting.");
                    self.broken = true;
                }
                None if !self.stopping => {
                    warn!("The broker cancelled the consumer; reconnecting.");
                    self.broken = true;
                }
                _ => return None,
            }
        }
    }

    fn delivery(&self, d: lapin::message::Delivery) -> Delivery {
        let headers = d.properties.headers().as_ref();
        let replayed = headers.and_then(|h| h.inner().get(REPLAYED)).is_some();
        let original = |name: &str| {
            headers
                .filter(|_| replayed)
                .and_then(|h| match h.inner().get(name) {
                    Some(AMQPValue::LongString(s)) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                })
        };
        let delivery_count = headers.and_then(|h| match h.inner().get("x-delivery-count") {
            Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).ok(),
            Some(AMQPValue::LongInt(n)) => u32::try_from(*n).ok(),
            Some(AMQPValue::LongUInt(n)) => Some(*n),
            Some(AMQPValue::ShortInt(n)) => u32::try_from(*n).ok(),
            _ => None,
        });
        let message = Message {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_string()),
            exchange: original(ORIGINAL_EXCHANGE)
                .unwrap_or_else(|| d.exchange.as_str().to_string()),
            routing_key: original(ORIGINAL_ROUTING_KEY)
                .unwrap_or_else(|| d.routing_key.as_str().to_string()),
            body: d.data,
        };
        Delivery {
            message,
            redelivered: d.redelivered,
            delivery_count,
            properties: d.properties,
            tag: d.delivery_tag,
            generation: self.generation,
        }
    }

    /// Replaces the link, retrying with backoff until the broker is back.
    async fn reconnect(&mut self) -> Result<(), AmqpError> {
        if let Some(m) = &self.metrics {
            m.set_ready(false);
        }
        self.generation += 1;
        self.acks.clear();
        let mut backoff = Backoff::new(self.retry);
        loop {
            match Link::open(&self.cfg).await {
                Ok(link) => {
                    let old = std::mem::replace(&mut self.link, link);
                    // The old connection may be half-open; closing it makes
                    // sure the broker requeues what it still holds.
                    tokio::spawn(async move { old.close().await });
                    self.broken = false;
                    info!(
                        attempts = backoff.attempts + 1,
                        "Reconnected to the broker."
                    );
                    if let Some(m) = &self.metrics {
                        m.reconnect("broker");
                        m.set_ready(true);
                    }
                    return Ok(());
                }
                Err(e) if e.is_transient() => {
                    let wait = backoff.next_delay();
                    warn!(error = %crate::metrics::error_chain(&e), retry_in = ?wait, "Reconnecting to the broker failed; retrying.");
                    if let Some(m) = &self.metrics {
                        m.retry("source");
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether a delivery came on a link that has since failed.
    fn stale(&self, delivery: &Delivery) -> bool {
        if delivery.generation != self.generation {
            debug!("Delivery from a closed link; the broker has requeued it.");
            return true;
        }
        false
    }

    /// Notes a delivery as settled: its event is committed or intentionally
    /// dropped. The broker hears of it at the next [`AmqpSource::flush_acks`].
    /// A delivery of a failed link is left alone: the broker has put it
    /// back already.
    ///
    /// # Errors
    ///
    /// Never; the error type is kept for the callers' retry loop.
    pub async fn ack(&mut self, delivery: &Delivery) -> Result<(), AmqpError> {
        if !self.stale(delivery) {
            self.acks.settled(delivery.tag);
        }
        Ok(())
    }

    /// Acknowledges, in one frame, every settled delivery that no open
    /// delivery precedes. Settled deliveries behind an open one wait for
    /// it: a later call sends them.
    ///
    /// # Errors
    ///
    /// Never for a lost link (the messages come back); the error type is
    /// kept for the callers' retry loop.
    pub async fn flush_acks(&mut self) -> Result<(), AmqpError> {
        let Some(tag) = self.acks.take_ackable() else {
            return Ok(());
        };
        let multiple = BasicAckOptions { multiple: true };
        if let Err(error) = self.link.consume.basic_ack(tag, multiple).await {
            if !self.broken {
                warn!(%error, "Acknowledging failed; the link is lost and unacknowledged messages will come back.");
            }
            self.broken = true;
        }
        Ok(())
    }

    /// Publishes the original message to the dead-letter exchange with the
    /// reason in its headers, waits for the broker's confirm, then
    /// acknowledges the delivery. `false` when the link was lost instead:
    /// that is not an error, the message comes back and is handled again.
    ///
    /// # Errors
    ///
    /// When the broker could not route or refused the dead letter; the
    /// delivery is then left unacknowledged so it is not lost.
    pub async fn dead_letter(
        &mut self,
        delivery: &Delivery,
        why: &Rejection,
        key: Option<&str>,
    ) -> Result<bool, AmqpError> {
        if self.stale(delivery) {
            return Ok(false);
        }
        let dl = &self.cfg.dead_letter;
        let props = dead_letter_properties(&delivery.properties, &delivery.message, why, key);
        let published = async {
            self.link
                .publish
                .basic_publish(
                    &dl.exchange,
                    &dl.routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &delivery.message.body,
                    props,
                )
                .await?
                .await
        }
        .await;
        let confirm = match published {
            Ok(c) => c,
            Err(error) => {
                warn!(%error, "Publishing a dead letter failed; the link is lost and the message will come back.");
                self.broken = true;
                return Ok(false);
            }
        };
        match confirm {
            Confirmation::Ack(Some(_returned)) => {
                return Err(AmqpError::Unroutable {
                    exchange: dl.exchange.clone(),
                    routing_key: dl.routing_key.clone(),
                })
            }
            Confirmation::Nack(_) => return Err(AmqpError::Nacked(dl.exchange.clone())),
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
        }
        self.ack(delivery).await?;
        self.flush_acks().await?;
        Ok(true)
    }

    /// Stops the consumer, so the broker sends nothing more. Deliveries
    /// already received can still be acknowledged.
    pub async fn stop_consuming(&mut self) {
        self.stopping = true;
        let tag = self.link.consumer.tag();
        let cancel = self
            .link
            .consume
            .basic_cancel(tag.as_str(), BasicCancelOptions::default());
        match tokio::time::timeout(SHUTDOWN_STEP, cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => debug!(%error, "Cancelling the consumer failed."),
            Err(_) => warn!("The broker did not confirm the consumer's cancellation in time."),
        }
    }

    /// Closes channels and connection. Unacknowledged deliveries go back to
    /// the queue.
    pub async fn close(mut self) {
        let _ = self.flush_acks().await;
        self.link.close().await;
        info!("Disconnected from the broker.");
    }
}

/// Declares exchanges, queues and bindings on a channel of its own, so a
/// refusal (which closes the channel) leaves the consuming channel alone.
async fn declare_topology(
    connection: &Connection,
    cfg: &AmqpSourceConfig,
) -> Result<(), AmqpError> {
    let ch = connection
        .create_channel()
        .await
        .map_err(AmqpError::broker("cannot open a channel"))?;
    let dl = &cfg.dead_letter;
    declare_exchange(&ch, &dl.exchange, dl.kind, true).await?;
    declare_queue(&ch, &dl.queue, true, FieldTable::default()).await?;
    bind(&ch, &dl.queue, &dl.exchange, &dl.routing_key).await?;

    declare_queue(&ch, &cfg.queue, cfg.durable, queue_arguments(cfg)).await?;
    for ex in &cfg.exchanges {
        declare_exchange(&ch, &ex.name, ex.kind, ex.durable).await?;
        bind(&ch, &cfg.queue, &ex.name, &ex.binding_key).await?;
        debug!(exchange = %ex.name, binding_key = %ex.binding_key, "Bound queue.");
    }
    let _ = ch.close(200, "topology declared").await;
    Ok(())
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), AmqpError> {
    ch.queue_bind(
        queue,
        exchange,
        key,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(AmqpError::broker(format!(
        "cannot bind queue `{queue}` to `{exchange}`"
    )))
}

/// The arguments weir declares its queue with.
fn queue_arguments(cfg: &AmqpSourceConfig) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(ttl) = cfg.message_ttl {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let value = i32::try_from(ms)
            .map(AMQPValue::LongInt)
            .unwrap_or(AMQPValue::LongLongInt(ms));
        args.insert(ShortString::from("x-message-ttl"), value);
    }
    let dl = &cfg.dead_letter;
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from(dl.exchange.as_str())),
    );
    args.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(LongString::from(dl.routing_key.as_str())),
    );
    if cfg.queue_type == QueueType::Quorum {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        if let Some(limit) = cfg.effective_delivery_limit() {
            args.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongInt(i32::try_from(limit).unwrap_or(i32::MAX)),
            );
        }
    }
    args
}

async fn declare_queue(
    ch: &Channel,
    name: &str,
    durable: bool,
    args: FieldTable,
) -> Result<(), AmqpError> {
    let options = QueueDeclareOptions {
        durable,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(name, options, args)
        .await
        .map(drop)
        .map_err(|e| match precondition_text(&e) {
            Some(detail) => AmqpError::QueueMismatch {
                queue: name.to_string(),
                detail,
            },
            None => AmqpError::broker(format!("cannot declare queue `{name}`"))(e),
        })
}

async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: Kind,
    durable: bool,
) -> Result<(), AmqpError> {
    let kind = match kind {
        Kind::Topic => ExchangeKind::Topic,
        Kind::Direct => ExchangeKind::Direct,
        Kind::Fanout => ExchangeKind::Fanout,
        Kind::Headers => ExchangeKind::Headers,
    };
    let options = ExchangeDeclareOptions {
        durable,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(name, kind, options, FieldTable::default())
        .await
        .map_err(|e| match precondition_text(&e) {
            Some(detail) => AmqpError::ExchangeMismatch {
                exchange: name.to_string(),
                detail,
            },
            None => AmqpError::broker(format!("cannot declare exchange `{name}`"))(e),
        })
}

/// The broker's text for a PRECONDITION_FAILED refusal, which names the
/// argument that differs.
fn precondition_text(e: &lapin::Error) -> Option<String> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406 => {
            Some(amqp.get_message().as_str().to_string())
        }
        _ => None,
    }
}

/// Headers of a dead letter: the original properties and headers, plus the
/// reason and where the message came from.
fn dead_letter_properties(
    original: &AMQPProperties,
    message: &Message,
    why: &Rejection,
    key: Option<&str>,
) -> AMQPProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let mut put = |k: &str, v: &str| {
        headers.insert(
            ShortString::from(k),
            AMQPValue::LongString(LongString::from(v)),
        );
    };
    put("x-weir-reason", &why.reason);
    put("x-weir-reason-class", why.class.as_str());
    put("x-weir-stage", &why.stage);
    put(ORIGINAL_EXCHANGE, &message.exchange);
    put(ORIGINAL_ROUTING_KEY, &message.routing_key);
    if let Some(key) = key {
        put("x-weir-event-key", key);
    }
    original.clone().with_headers(headers).with_delivery_mode(2)
}

/// Which dead letters `weir replay` sends back. Empty fields match all.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Text the `x-weir-reason` header must contain.
    pub reason: Option<String>,
    /// The `x-weir-reason-class` (`schema`, `plugin`, ...), or the broker's
    /// own reason (`expired`, `delivery_limit`) for messages it
    /// dead-lettered itself.
    pub class: Option<String>,
    /// The body's `event_type`.
    pub event_type: Option<String>,
}

/// What `weir replay` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Sent back to the pipeline's queue.
    pub replayed: u64,
    /// Left in the dead-letter queue because they did not match.
    pub kept: u64,
}

/// Sends matching dead letters back into the pipeline's queue (through the
/// default exchange, so no other consumer of the original exchange sees
/// them twice), keeping their original exchange and routing key in headers
/// for the row. Each is published with a confirm before it is removed from
/// the dead-letter queue; the ones that do not match stay, in their order.
/// Those that fail again are dead-lettered again by the running pipeline.
///
/// # Errors
///
/// When the broker cannot be reached or refuses a publish; what was not
/// yet confirmed stays in the dead-letter queue.
pub async fn replay(
    cfg: &AmqpSourceConfig,
    filter: &ReplayFilter,
) -> Result<ReplayReport, AmqpError> {
    let connection = connect(cfg, "-replay").await?;
    let ch = connection
        .create_channel()
        .await
        .map_err(AmqpError::broker("cannot open a channel"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(AmqpError::broker("cannot turn on publisher confirms"))?;
    let dlq = &cfg.dead_letter.queue;
    let waiting = ch
        .queue_declare(
            dlq,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(AmqpError::broker(format!(
            "cannot find dead-letter queue `{dlq}`"
        )))?
        .message_count();

    let mut report = ReplayReport::default();
    for _ in 0..waiting {
        let got = ch
            .basic_get(dlq, lapin::options::BasicGetOptions { no_ack: false })
            .await
            .map_err(AmqpError::broker(format!(
                "cannot read dead-letter queue `{dlq}`"
            )))?;
        let Some(msg) = got else { break };
        let d = msg.delivery;
        if !matches_filter(&d, filter) {
            // Left unacknowledged until the channel closes, so it goes back
            // to the queue and is not handed to us again in this loop.
            report.kept += 1;
            continue;
        }
        let confirm = ch
            .basic_publish(
                "",
                &cfg.queue,
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &d.data,
                replay_properties(&d.properties, &d.exchange, &d.routing_key),
            )
            .await
            .map_err(AmqpError::broker("cannot replay a dead letter"))?
            .await
            .map_err(AmqpError::broker("cannot replay a dead letter"))?;
        match confirm {
            Confirmation::Ack(Some(_)) => {
                return Err(AmqpError::Unroutable {
                    exchange: String::new(),
                    routing_key: cfg.queue.clone(),
                })
            }
            Confirmation::Nack(_) => return Err(AmqpError::Nacked(String::new())),
            _ => {}
        }
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(AmqpError::broker("cannot remove a replayed dead letter"))?;
        report.replayed += 1;
    }
    let _ = ch.close(200, "replay done").await;
    let _ = connection.close(200, "replay done").await;
    Ok(report)
}

fn header_text(h: &FieldTable, name: &str) -> Option<String> {
    match h.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The first `x-death` entry's table: where the broker dead-lettered a
/// message from, and why.
fn first_death(h: &FieldTable) -> Option<&FieldTable> {
    let AMQPValue::FieldArray(deaths) = h.inner().get("x-death")? else {
        return None;
    };
    match deaths.as_slice().first()? {
        AMQPValue::FieldTable(t) => Some(t),
        _ => None,
    }
}

fn matches_filter(d: &lapin::message::Delivery, filter: &ReplayFilter) -> bool {
    let empty = FieldTable::default();
    let h = d.properties.headers().as_ref().unwrap_or(&empty);
    let class = header_text(h, "x-weir-reason-class")
        .or_else(|| first_death(h).and_then(|t| header_text(t, "reason")));
    if let Some(want) = &filter.class {
        if class.as_deref() != Some(want.as_str()) {
            return false;
        }
    }
    if let Some(want) = &filter.reason {
        if !header_text(h, "x-weir-reason").is_some_and(|r| r.contains(want.as_str())) {
            return false;
        }
    }
    if let Some(want) = &filter.event_type {
        let event_type = serde_json::from_slice::<serde_json::Value>(&d.data)
            .ok()
            .and_then(|v| v.get("event_type")?.as_str().map(str::to_string));
        if event_type.as_deref() != Some(want.as_str()) {
            return false;
        }
    }
    true
}

/// Properties of a replayed message: the original ones without weir's
/// reason headers and the broker's `x-death`, with the original exchange
/// and routing key kept and a replay count.
fn replay_properties(
    props: &AMQPProperties,
    dl_exchange: &ShortString,
    dl_routing_key: &ShortString,
) -> AMQPProperties {
    let old = props.headers().clone().unwrap_or_default();
    let death = first_death(&old).cloned();
    let mut headers = FieldTable::default();
    let mut replays = 1i64;
    for (k, v) in old.inner() {
        match k.as_str() {
            "x-weir-reason"
            | "x-weir-reason-class"
            | "x-weir-stage"
            | "x-death"
            | "x-first-death-exchange"
            | "x-first-death-queue"
            | "x-first-death-reason"
            | "x-delivery-count" => {}
            REPLAYED => {
                if let AMQPValue::LongLongInt(n) = v {
                    replays = n.saturating_add(1);
                }
            }
            _ => {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    // A message the broker dead-lettered itself (expired, delivery limit)
    // has no weir headers: its origin is in `x-death`.
    if header_text(&headers, ORIGINAL_EXCHANGE).is_none() {
        let (ex, rk) = match &death {
            Some(t) => (
                header_text(t, "exchange").unwrap_or_default(),
                match t.inner().get("routing-keys") {
                    Some(AMQPValue::FieldArray(keys)) => match keys.as_slice().first() {
                        Some(AMQPValue::LongString(s)) => {
                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                        }
                        _ => String::new(),
                    },
                    _ => String::new(),
                },
            ),
            None => (
                dl_exchange.as_str().to_string(),
                dl_routing_key.as_str().to_string(),
            ),
        };
        headers.insert(
            ShortString::from(ORIGINAL_EXCHANGE),
            AMQPValue::LongString(LongString::from(ex.as_str())),
        );
        headers.insert(
            ShortString::from(ORIGINAL_ROUTING_KEY),
            AMQPValue::LongString(LongString::from(rk.as_str())),
        );
    }
    headers.insert(ShortString::from(REPLAYED), AMQPValue::LongLongInt(replays));
    props.clone().with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiple_ack_waits_for_the_lowest_open_delivery() {
        let mut acks = AckTracker::default();
        for tag in 1..=5 {
            acks.received(tag);
        }
        acks.settled(2);
        acks.settled(3);
        assert_eq!(acks.take_ackable(), None, "tag 1 is still open");
        acks.settled(1);
        acks.settled(5);
        assert_eq!(acks.take_ackable(), Some(3));
        assert_eq!(acks.take_ackable(), None, "tag 4 is still open");
        acks.settled(4);
        assert_eq!(acks.take_ackable(), Some(5));
        assert_eq!(acks.take_ackable(), None);
    }

    #[test]
    fn settling_an_unknown_tag_acknowledges_nothing() {
        let mut acks = AckTracker::default();
        acks.received(7);
        acks.settled(3);
        assert_eq!(acks.take_ackable(), None);
        acks.settled(7);
        assert_eq!(acks.take_ackable(), Some(7));
    }
}
