//! The AMQP 0-9-1 source: RabbitMQ through lapin.
//!
//! At start it declares the topology the pipeline file describes (the
//! dead-letter exchange and queue, the bound exchanges, the queue with its
//! TTL and dead-letter arguments), sets the prefetch window and consumes
//! with manual acknowledgements. Dead letters are published on a second
//! channel in confirm mode, with `mandatory` set, so that a dead letter the
//! broker could not route is noticed rather than silently lost; only after
//! the broker confirms it is the original delivery acknowledged.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::basic::AMQPProperties;
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use tracing::{debug, info};

use crate::config::{redact_url, AmqpSourceConfig, ExchangeKind as Kind};
use crate::event::{Message, Rejection};

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
    properties: AMQPProperties,
    acker: lapin::acker::Acker,
}

/// A connected, consuming AMQP source.
pub struct AmqpSource {
    cfg: AmqpSourceConfig,
    connection: Connection,
    consume: Channel,
    publish: Channel,
    consumer: Consumer,
}

impl AmqpSource {
    /// Connects, declares the topology and starts consuming.
    ///
    /// # Errors
    ///
    /// [`AmqpError::QueueMismatch`] when the queue exists with other
    /// arguments; [`AmqpError::Broker`] when the broker cannot be reached.
    pub async fn connect(cfg: &AmqpSourceConfig) -> Result<AmqpSource, AmqpError> {
        let props = ConnectionProperties::default()
            .with_connection_name(cfg.connection_name.clone().into());
        let connection = Connection::connect(&cfg.url, props)
            .await
            .map_err(AmqpError::broker(format!(
                "cannot connect to the broker at {}",
                redact_url(&cfg.url)
            )))?;
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
        Ok(AmqpSource {
            cfg: cfg.clone(),
            connection,
            consume,
            publish,
            consumer,
        })
    }

    /// The next delivery; `None` when the consumer was cancelled.
    ///
    /// # Errors
    ///
    /// When the channel or connection fails.
    pub async fn next(&mut self) -> Option<Result<Delivery, AmqpError>> {
        let d = match self.consumer.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(AmqpError::broker("consuming failed")(e))),
        };
        let message = Message {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_string()),
            exchange: d.exchange.as_str().to_string(),
            routing_key: d.routing_key.as_str().to_string(),
            body: d.data,
        };
        Some(Ok(Delivery {
            message,
            redelivered: d.redelivered,
            properties: d.properties,
            acker: d.acker,
        }))
    }

    /// Acknowledges a delivery: its event is committed or intentionally
    /// dropped.
    ///
    /// # Errors
    ///
    /// When the channel is gone; the broker will then redeliver.
    pub async fn ack(&self, delivery: &Delivery) -> Result<(), AmqpError> {
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(drop)
            .map_err(AmqpError::broker("cannot acknowledge a delivery"))
    }

    /// Publishes the original message to the dead-letter exchange with the
    /// reason in its headers, waits for the broker's confirm, then
    /// acknowledges the delivery.
    ///
    /// # Errors
    ///
    /// When the dead letter was not confirmed; the delivery is then left
    /// unacknowledged so it is not lost.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        why: &Rejection,
        key: Option<&str>,
    ) -> Result<(), AmqpError> {
        let dl = &self.cfg.dead_letter;
        let props = dead_letter_properties(&delivery.properties, &delivery.message, why, key);
        let confirm = self
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
            .await
            .map_err(AmqpError::broker("cannot publish a dead letter"))?
            .await
            .map_err(AmqpError::broker("cannot publish a dead letter"))?;
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
        self.ack(delivery).await
    }

    /// Stops the consumer, so the broker sends nothing more. Deliveries
    /// already received can still be acknowledged.
    pub async fn stop_consuming(&self) {
        let tag = self.consumer.tag();
        if let Err(error) = self
            .consume
            .basic_cancel(tag.as_str(), BasicCancelOptions::default())
            .await
        {
            debug!(%error, "Cancelling the consumer failed.");
        }
    }

    /// Closes channels and connection. Unacknowledged deliveries go back to
    /// the queue.
    pub async fn close(self) {
        let _ = self.publish.close(200, "weir shutting down").await;
        let _ = self.consume.close(200, "weir shutting down").await;
        let _ = self.connection.close(200, "weir shutting down").await;
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
    ch.queue_bind(
        &dl.queue,
        &dl.exchange,
        &dl.routing_key,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(AmqpError::broker(format!(
        "cannot bind queue `{}` to `{}`",
        dl.queue, dl.exchange
    )))?;

    declare_queue(&ch, &cfg.queue, cfg.durable, queue_arguments(cfg)).await?;
    for ex in &cfg.exchanges {
        declare_exchange(&ch, &ex.name, ex.kind, ex.durable).await?;
        ch.queue_bind(
            &cfg.queue,
            &ex.name,
            &ex.binding_key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(AmqpError::broker(format!(
            "cannot bind queue `{}` to `{}`",
            cfg.queue, ex.name
        )))?;
        debug!(exchange = %ex.name, binding_key = %ex.binding_key, "Bound queue.");
    }
    let _ = ch.close(200, "topology declared").await;
    Ok(())
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
    put("x-weir-original-exchange", &message.exchange);
    put("x-weir-original-routing-key", &message.routing_key);
    if let Some(key) = key {
        put("x-weir-event-key", key);
    }
    original.clone().with_headers(headers).with_delivery_mode(2)
}
