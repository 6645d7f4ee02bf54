//! Sources: where events come from.
//!
//! - [`amqp`]: a RabbitMQ queue, with its topology and dead-letter exchange.
//! - [`file`]: NDJSON from a file or standard input, with a dead-letter
//!   file; no broker needed.
//! - [`queue_depth`]: measures the AMQP queues for the queue-depth gauge.
//!
//! A source hands out deliveries, each wrapping a [`Message`], and later
//! hears what became of each: acknowledged (stored, or dropped on purpose)
//! or dead-lettered with a reason. Until then the delivery is the source's
//! to redeliver.

pub mod amqp;
pub mod file;
pub mod queue_depth;

use crate::event::{Message, Rejection};

/// A source error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error(transparent)]
    Amqp(#[from] amqp::AmqpError),
    #[error(transparent)]
    File(#[from] file::FileError),
}

impl SourceError {
    /// Whether waiting and reconnecting may fix this.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Amqp(e) => e.is_transient(),
            SourceError::File(e) => e.is_transient(),
        }
    }
}

/// What the pipeline needs from a source.
#[allow(async_fn_in_trait)]
pub trait Source {
    /// One message handed out and not yet settled.
    type Delivery;

    /// The next delivery, or `None` when the source has no more.
    async fn next(&mut self) -> Option<Result<Self::Delivery, SourceError>>;

    /// The message inside a delivery.
    fn message(d: &Self::Delivery) -> &Message;

    /// Settles deliveries whose events were stored or dropped. A source
    /// may hold the acknowledgement back until [`Source::flush_acks`], to
    /// send several at once.
    async fn ack(&mut self, d: &Self::Delivery) -> Result<(), SourceError>;

    /// Sends the acknowledgements [`Source::ack`] held back. The pipeline
    /// calls it after settling a batch, a dropped event or a dead letter.
    async fn flush_acks(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Sends the original message where dead letters go, with the reason,
    /// then settles the delivery. `false` when it could not, and the
    /// message comes back by itself (a lost broker link).
    async fn dead_letter(
        &mut self,
        d: &Self::Delivery,
        why: &Rejection,
        key: Option<&str>,
    ) -> Result<bool, SourceError>;

    /// How often this delivery was delivered before, where the source
    /// keeps count.
    fn delivery_count(_d: &Self::Delivery) -> Option<u32> {
        None
    }

    /// Whether the source says it handed this message out before.
    fn redelivered(_d: &Self::Delivery) -> bool {
        false
    }

    /// Asks for no more deliveries.
    async fn stop(&mut self);

    /// Closes the source; unsettled deliveries are redelivered later.
    async fn close(self);
}

impl Source for amqp::AmqpSource {
    type Delivery = amqp::Delivery;

    async fn next(&mut self) -> Option<Result<Self::Delivery, SourceError>> {
        Some(
            amqp::AmqpSource::next(self)
                .await?
                .map_err(SourceError::from),
        )
    }

    fn message(d: &Self::Delivery) -> &Message {
        &d.message
    }

    fn delivery_count(d: &Self::Delivery) -> Option<u32> {
        d.delivery_count
    }

    fn redelivered(d: &Self::Delivery) -> bool {
        d.redelivered
    }

    async fn ack(&mut self, d: &Self::Delivery) -> Result<(), SourceError> {
        Ok(amqp::AmqpSource::ack(self, d).await?)
    }

    async fn flush_acks(&mut self) -> Result<(), SourceError> {
        Ok(amqp::AmqpSource::flush_acks(self).await?)
    }

    async fn dead_letter(
        &mut self,
        d: &Self::Delivery,
        why: &Rejection,
        key: Option<&str>,
    ) -> Result<bool, SourceError> {
        Ok(amqp::AmqpSource::dead_letter(self, d, why, key).await?)
    }

    async fn stop(&mut self) {
        self.stop_consuming().await;
    }

    async fn close(self) {
        amqp::AmqpSource::close(self).await;
    }
}

/// A file keeps its lines, so acknowledging is a no-op; a dead letter is a
/// line appended to the dead-letter file, with the line's number.
impl Source for file::FileSource {
    type Delivery = file::Delivery;

    async fn next(&mut self) -> Option<Result<Self::Delivery, SourceError>> {
        Some(
            file::FileSource::next(self)
                .await?
                .map_err(SourceError::from),
        )
    }

    fn message(d: &Self::Delivery) -> &Message {
        &d.message
    }

    async fn ack(&mut self, _d: &Self::Delivery) -> Result<(), SourceError> {
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        d: &Self::Delivery,
        why: &Rejection,
        key: Option<&str>,
    ) -> Result<bool, SourceError> {
        file::FileSource::dead_letter(self, d, why, key).await?;
        Ok(true)
    }

    async fn stop(&mut self) {
        file::FileSource::stop(self);
    }

    async fn close(self) {
        file::FileSource::close(self).await;
    }
}
