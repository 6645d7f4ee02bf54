//! The file source: NDJSON from a file or from standard input, one event per
//! line, so that weir runs with no broker at all.
//!
//! A reader thread of its own reads the input line by line and hands the
//! lines over a bounded channel, which keeps blocking reads off the async
//! runtime and lets weir exit while a read on standard input still waits.
//! Each non-empty line becomes one [`Message`] whose body is the line
//! without its newline (`\n` or `\r\n`); the message has no id, and its
//! exchange and routing key are empty, since no broker routed it. Lines are
//! numbered from 1 as in the file, empty ones included, so a dead letter's
//! line number is the one an editor shows.
//!
//! Without `follow` the source ends at the end of the input and the pipeline
//! writes its last batch and exits. With `follow` it waits for lines
//! appended to the file, like `tail -f` (but from the first line), until
//! the pipeline is stopped.
//!
//! There is nothing to acknowledge: a file keeps its lines. Dead letters go
//! to a file of their own, one JSON object per line, written and flushed
//! before [`FileSource::dead_letter`] returns.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, warn};

use crate::config::FileSourceConfig;
use crate::event::{Message, Rejection};

/// Lines read ahead of the pipeline. Enough to fill a batch while the
/// previous one is written.
const READ_AHEAD: usize = 256;

/// What can go wrong reading the input or writing dead letters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("cannot open the input file {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {input} after line {line}")]
    Read {
        input: String,
        line: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the dead-letter file {}", path.display())]
    OpenDeadLetters {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write a dead letter to {}", path.display())]
    WriteDeadLetter {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    /// Whether waiting may fix this: a dead letter that could not be
    /// written (a full disk) is worth a retry; a failed read is not.
    pub fn is_transient(&self) -> bool {
        matches!(self, FileError::WriteDeadLetter { .. })
    }
}

/// One line handed out and not yet settled.
#[derive(Debug)]
pub struct Delivery {
    /// The line as a message.
    pub message: Message,
    /// The line's 1-based number in the input.
    pub line: u64,
}

/// An open file source.
pub struct FileSource {
    /// The input as shown in logs and dead letters: its path, or `-`.
    input: String,
    lines: mpsc::Receiver<Result<Line, (u64, std::io::Error)>>,
    /// Set by [`FileSource::stop`]; tells a following reader to give up.
    stop: Arc<AtomicBool>,
    dead_letters: DeadLetterFile,
}

impl FileSource {
    /// Opens the input and the dead-letter file and starts reading.
    /// Relative paths are resolved against `base_dir`, the pipeline file's
    /// directory; the path `-` is standard input.
    ///
    /// # Errors
    ///
    /// When the input cannot be opened, or the dead-letter file cannot be
    /// created or opened for appending.
    pub fn open(cfg: &FileSourceConfig, base_dir: &Path) -> Result<FileSource, FileError> {
        let dead_letters = DeadLetterFile::open(&resolve(base_dir, &cfg.dead_letter.path))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, lines) = mpsc::channel(READ_AHEAD);
        let (input, source, follow) = if cfg.path == Path::new("-") {
            // Standard input ends when its writer closes it: nothing to follow.
            ("-".to_string(), Input::Stdin(std::io::stdin()), false)
        } else {
            let path = resolve(base_dir, &cfg.path);
            let file = File::open(&path).map_err(|source| FileError::Open {
                path: path.clone(),
                source,
            })?;
            let shown = path.display().to_string();
            (shown, Input::File(BufReader::new(file)), cfg.follow)
        };
        let reader = Reader {
            input: source,
            tx,
            follow,
            poll: cfg.poll_interval,
            stop: stop.clone(),
            offset: 0,
        };
        // The thread is detached on purpose: a read on standard input
        // cannot be interrupted, and must not keep weir from exiting.
        std::thread::Builder::new()
            .name("weir-file-source".into())
            .spawn(move || reader.run())
            .map_err(|source| FileError::Open {
                path: PathBuf::from(&input),
                source,
            })?;
        info!(input = %input, follow, "Reading events from a file.");
        Ok(FileSource {
            input,
            lines,
            stop,
            dead_letters,
        })
    }

    /// The next non-empty line; `None` at the end of the input (never, when
    /// following a file, until the source is stopped).
    ///
    /// Cancel safe: a line is either handed out or still in the channel.
    ///
    /// # Errors
    ///
    /// When the input cannot be read.
    pub async fn next(&mut self) -> Option<Result<Delivery, FileError>> {
        match self.lines.recv().await? {
            Ok(Line { number, bytes }) => Some(Ok(Delivery {
                message: Message {
                    body: bytes,
                    ..Message::default()
                },
                line: number,
            })),
            Err((line, source)) => Some(Err(FileError::Read {
                input: self.input.clone(),
                line,
                source,
            })),
        }
    }

    /// Appends the line, with the reason and its line number, to the
    /// dead-letter file and flushes it.
    ///
    /// # Errors
    ///
    /// When the dead-letter file cannot be written; the line has then not
    /// been dead-lettered.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        why: &Rejection,
        key: Option<&str>,
    ) -> Result<(), FileError> {
        let body = &delivery.message.body;
        let text = String::from_utf8_lossy(body);
        let record = DeadLetterRecord {
            reason: &why.reason,
            class: why.class.as_str(),
            stage: &why.stage,
            line: delivery.line,
            source: &self.input,
            key,
            body_hex: matches!(text, Cow::Owned(_)).then(|| hex::encode(body)),
            body: text,
        };
        self.dead_letters.append(&record).await
    }

    /// Asks the reader to stop waiting for appended lines.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops reading and closes the dead-letter file.
    pub async fn close(self) {
        self.stop();
        drop(self.lines);
        let mut file = self.dead_letters.file.into_inner();
        if let Err(error) = file.flush().await {
            warn!(%error, "Cannot flush the dead-letter file.");
        }
        debug!(input = %self.input, "File source closed.");
    }
}

fn resolve(base_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// A line read from the input, without its newline.
#[derive(Debug)]
struct Line {
    number: u64,
    bytes: Vec<u8>,
}

enum Input {
    Stdin(std::io::Stdin),
    File(BufReader<File>),
}

impl Input {
    fn read_until_newline(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        match self {
            Input::Stdin(r) => r.lock().read_until(b'\n', buf),
            Input::File(r) => r.read_until(b'\n', buf),
        }
    }
}

/// The reader thread's state.
struct Reader {
    input: Input,
    tx: mpsc::Sender<Result<Line, (u64, std::io::Error)>>,
    follow: bool,
    poll: Duration,
    stop: Arc<AtomicBool>,
    /// Bytes read from the file so far, to notice it was truncated.
    offset: u64,
}

impl Reader {
    /// Reads lines until the end of the input (or, when following, until
    /// stopped) and sends them. A line still missing its newline at the
    /// end of a followed file is kept until the rest of it arrives.
    fn run(mut self) {
        let mut buf = Vec::new();
        let mut number = 0u64;
        loop {
            let n = match self.input.read_until_newline(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = self.tx.blocking_send(Err((number, e)));
                    return;
                }
            };
            self.offset += n as u64;
            if buf.last() != Some(&b'\n') {
                if self.follow {
                    if self.stop.load(Ordering::Relaxed) || self.tx.is_closed() {
                        return;
                    }
                    if self.truncated() {
                        buf.clear();
                        number = 0;
                    }
                    // This is the reader's own thread, not a tokio worker.
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(self.poll);
                    continue;
                }
                if buf.is_empty() {
                    return;
                }
            }
            number += 1;
            let bytes = without_newline(std::mem::take(&mut buf));
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if self.tx.blocking_send(Ok(Line { number, bytes })).is_err() {
                return;
            }
        }
    }

    /// Whether the followed file is now shorter than what was read, in
    /// which case reading starts again from its beginning, as `tail -f`
    /// does.
    fn truncated(&mut self) -> bool {
        let Input::File(f) = &mut self.input else {
            return false;
        };
        let len = match f.get_ref().metadata() {
            Ok(m) => m.len(),
            Err(_) => return false,
        };
        if len >= self.offset {
            return false;
        }
        warn!(
            len,
            read = self.offset,
            "Input file was truncated; reading it from its start."
        );
        self.offset = 0;
        f.seek(SeekFrom::Start(0)).is_ok()
    }
}

fn without_newline(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    line
}

/// One line of the dead-letter file.
#[derive(Debug, Serialize)]
struct DeadLetterRecord<'a> {
    reason: &'a str,
    class: &'a str,
    stage: &'a str,
    line: u64,
    source: &'a str,
    key: Option<&'a str>,
    /// The line as text; bytes that are not UTF-8 show as U+FFFD.
    body: Cow<'a, str>,
    /// The line's exact bytes in hex, only when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    body_hex: Option<String>,
}

/// The dead-letter file, opened for appending.
struct DeadLetterFile {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
}

impl DeadLetterFile {
    fn open(path: &Path) -> Result<DeadLetterFile, FileError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| FileError::OpenDeadLetters {
                path: path.to_path_buf(),
                source,
            })?;
        debug!(path = %path.display(), "Dead-letter file open.");
        Ok(DeadLetterFile {
            path: path.to_path_buf(),
            file: Mutex::new(tokio::fs::File::from_std(file)),
        })
    }

    async fn append(&self, record: &DeadLetterRecord<'_>) -> Result<(), FileError> {
        let write_err = |source| FileError::WriteDeadLetter {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(record).map_err(|e| write_err(e.into()))?;
        line.push(b'\n');
        let mut file = self.file.lock().await;
        file.write_all(&line).await.map_err(write_err)?;
        file.flush().await.map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileDeadLetterConfig;
    use crate::event::ReasonClass;

    type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

    fn config(input: &str, follow: bool) -> FileSourceConfig {
        FileSourceConfig {
            path: PathBuf::from(input),
            follow,
            poll_interval: Duration::from_millis(10),
            dead_letter: FileDeadLetterConfig {
                path: PathBuf::from("dead.ndjson"),
            },
        }
    }

    async fn take(source: &mut FileSource) -> Result<(u64, String)> {
        let d = source.next().await.ok_or("source ended early")??;
        Ok((d.line, String::from_utf8(d.message.body)?))
    }

    #[tokio::test]
    async fn lines_are_numbered_as_in_the_file_and_empty_ones_skipped() -> Result {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("in.ndjson"), "a\r\n\n  \nb\nc")?;
        let mut source = FileSource::open(&config("in.ndjson", false), dir.path())?;
        assert_eq!(take(&mut source).await?, (1, "a".into()));
        assert_eq!(take(&mut source).await?, (4, "b".into()));
        assert_eq!(take(&mut source).await?, (5, "c".into()));
        assert!(source.next().await.is_none());
        let d = source.next().await;
        assert!(d.is_none(), "stays ended");
        source.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn dead_letter_is_one_json_line_with_the_line_number() -> Result {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("in.ndjson"), b"ok\n\xffbad\n")?;
        let mut source = FileSource::open(&config("in.ndjson", false), dir.path())?;
        let _ = source.next().await;
        let d = source.next().await.ok_or("no second line")??;
        let why = Rejection::new(ReasonClass::Decode, "decode", "body is not UTF-8");
        source.dead_letter(&d, &why, None).await?;
        let text = std::fs::read_to_string(dir.path().join("dead.ndjson"))?;
        let v: serde_json::Value = serde_json::from_str(text.trim_end())?;
        assert_eq!(v["line"], 2);
        assert_eq!(v["class"], "decode");
        assert_eq!(v["stage"], "decode");
        assert_eq!(v["reason"], "body is not UTF-8");
        assert_eq!(v["key"], serde_json::Value::Null);
        assert_eq!(v["body"], "\u{FFFD}bad");
        assert_eq!(v["body_hex"], "ff626164");
        assert!(v["source"]
            .as_str()
            .is_some_and(|s| s.ends_with("in.ndjson")));
        source.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn follow_waits_for_appended_and_completed_lines() -> Result {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("in.ndjson");
        std::fs::write(&path, "one\ntw")?;
        let mut source = FileSource::open(&config("in.ndjson", true), dir.path())?;
        assert_eq!(take(&mut source).await?, (1, "one".into()));
        let pending = tokio::time::timeout(Duration::from_millis(100), source.next()).await;
        assert!(
            pending.is_err(),
            "a line without its newline is not handed out yet"
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
        std::io::Write::write_all(&mut f, b"o\nthree\n")?;
        assert_eq!(take(&mut source).await?, (2, "two".into()));
        assert_eq!(take(&mut source).await?, (3, "three".into()));
        source.stop();
        source.close().await;
        Ok(())
    }

    #[test]
    fn missing_input_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = FileSource::open(&config("nope.ndjson", false), dir.path())
            .err()
            .expect("a missing file must be refused")
            .to_string();
        assert!(err.contains("nope.ndjson"), "{err}");
    }
}
