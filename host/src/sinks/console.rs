//! The console sink: each event, after the transforms, as one line of JSON
//! on standard output, for piping into `jq` or another program.
//!
//! Everything is acknowledged as stored once its batch is written and
//! flushed. Logs and the closing summary go to standard error, so standard
//! output carries events only. Writing blocks while the reader of the pipe
//! is slow, which is the back-pressure a pipe gives.

use std::io::Write;

use super::row::RowOutcome;
use crate::event::Event;

/// Standard output could not take a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// The reader went away (a closed pipe) or the write failed.
    #[error("cannot write events to standard output")]
    Write(#[source] std::io::Error),
}

impl ConsoleError {
    /// Never: a closed pipe stays closed.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// Writes a batch as NDJSON to standard output, in one write.
///
/// # Errors
///
/// When standard output is closed or cannot be written.
pub fn write(events: &[Event]) -> Result<Vec<RowOutcome>, ConsoleError> {
    let out = std::io::stdout();
    write_to(&mut out.lock(), events)
}

fn write_to(out: &mut impl Write, events: &[Event]) -> Result<Vec<RowOutcome>, ConsoleError> {
    let mut buf = Vec::with_capacity(events.len() * 512);
    for event in events {
        serde_json::to_writer(&mut buf, &event.body).map_err(|e| ConsoleError::Write(e.into()))?;
        buf.push(b'\n');
    }
    out.write_all(&buf)
        .and_then(|()| out.flush())
        .map_err(ConsoleError::Write)?;
    Ok(vec![RowOutcome::Stored; events.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Message;

    #[test]
    fn one_json_line_per_event() -> Result<(), ConsoleError> {
        let key = crate::config::IdempotencyConfig::default().key;
        let events: Vec<Event> = [
            r#"{"event_type":"a","service":"s","payload":{"n":1}}"#,
            r#"{ "event_type": "b", "service": "s", "payload": {"t": "ü"} }"#,
        ]
        .iter()
        .map(|b| {
            let m = Message {
                body: b.as_bytes().to_vec(),
                ..Message::default()
            };
            Event::decode(&m, &key).expect("decodes")
        })
        .collect();
        let mut out = Vec::new();
        let outcomes = write_to(&mut out, &events)?;
        assert_eq!(outcomes, [RowOutcome::Stored, RowOutcome::Stored]);
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let second: serde_json::Value = serde_json::from_str(lines[1]).expect("json");
        assert_eq!(second["payload"]["t"], "ü");
        Ok(())
    }
}
