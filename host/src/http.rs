//! The operator's HTTP listener: `/metrics`, `/health` and `/ready`.
//!
//! Prometheus scrapes `/metrics` (the text format of [`Metrics::render`]);
//! an orchestrator probes `/health` (200 while the process runs) and
//! `/ready` (200 only while [`Metrics::is_ready`], else 503 naming what is
//! down). The listener starts before the pipeline connects, so `/health`
//! answers during start-up and `/ready` says not yet.
//!
//! Three fixed GET routes do not need an HTTP framework, so this is a small
//! HTTP/1.1 responder on tokio's TCP listener, written to stay up whatever a
//! client sends:
//!
//! - one request per connection, answered with `Connection: close`;
//! - the request head is capped at [`MAX_HEAD_BYTES`] (431 past it) and a
//!   body is never read;
//! - reading the request and writing the answer must finish within
//!   [`EXCHANGE_TIMEOUT`], so a silent or slow client cannot hold a
//!   connection;
//! - at most [`MAX_CONNECTIONS`] connections are served at once; one more
//!   is closed straight away.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::metrics::Metrics;

/// Where the listener binds unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9598";

/// The longest request head (request line and headers) read.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Time allowed to read one request and write its answer.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at the same time.
pub const MAX_CONNECTIONS: usize = 64;

/// The value of `--metrics-addr`: an address to listen on, or nowhere.
///
/// `off` or an empty value turns the listener off; anything else must be an
/// IP address and port, e.g. `127.0.0.1:9598` or `[::1]:9598`. Port 0 picks
/// a free port, which the "Metrics listener started." log line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenAddr {
    Off,
    On(SocketAddr),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("off") {
            return Ok(ListenAddr::Off);
        }
        s.parse().map(ListenAddr::On).map_err(|_| {
            format!("`{s}` is not an IP address and port such as {DEFAULT_ADDR}, nor `off`")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Off => f.write_str("off"),
            ListenAddr::On(addr) => addr.fmt(f),
        }
    }
}

/// The listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error(
        "cannot listen for metrics on {addr}; choose another address with --metrics-addr or \
         WEIR_METRICS_ADDR, or `off` to run without the listener"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A running listener. Dropping it stops accepting connections too.
pub struct MetricsListener {
    addr: SocketAddr,
    /// Tells the accept loop to stop; dropping it does the same.
    stop: watch::Sender<()>,
    task: JoinHandle<()>,
}

impl MetricsListener {
    /// Binds `addr` and serves the endpoints until [`MetricsListener::stop`].
    ///
    /// # Errors
    ///
    /// [`HttpError::Bind`] when the address is taken or not this machine's.
    pub async fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Self, HttpError> {
        let bind_err = |source| HttpError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let (stop, stopped) = watch::channel(());
        let task = tokio::spawn(accept_loop(listener, metrics, stopped));
        info!(%addr, "Metrics listener started.");
        Ok(MetricsListener { addr, stop, task })
    }

    /// The address bound, with the real port when 0 was asked for.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections. Requests being answered finish on
    /// their own, within [`EXCHANGE_TIMEOUT`].
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        debug!(addr = %self.addr, "Metrics listener stopped.");
    }
}

async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>, mut stop: watch::Receiver<()>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or the peer gave up: wait a
                    // moment rather than spin.
                    debug!(%error, "Accepting a metrics connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "Too many metrics connections; closing this one.");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(stream, &metrics)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(%peer, %error, "Metrics request failed."),
                Err(_) => debug!(%peer, "Metrics request timed out."),
            }
        });
    }
}

/// Reads one request, writes its answer and closes.
async fn exchange(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    let response = match read_head(&mut stream).await? {
        Some(head) => route(&head, metrics),
        None => Response::text(
            431,
            "Request Header Fields Too Large",
            "request too large\n",
        ),
    };
    stream.write_all(&response.into_bytes()).await?;
    stream.shutdown().await?;
    // Read what the client still sends (a body, the rest of an oversized
    // head) until it closes, a little while at most: closing a socket with
    // unread input resets it, and the reset can destroy the answer before
    // the client has read it.
    let _ = tokio::time::timeout(LINGER, drain(&mut stream)).await;
    Ok(())
}

/// How long a client may keep sending after its answer was written.
const LINGER: Duration = Duration::from_secs(1);

async fn drain(stream: &mut TcpStream) -> io::Result<()> {
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    while left > 0 {
        match stream.read(&mut sink).await? {
            0 => break,
            n => left = left.saturating_sub(n),
        }
    }
    Ok(())
}

/// The request head, without the blank line that ends it; `None` when it
/// is larger than [`MAX_HEAD_BYTES`].
///
/// # Errors
///
/// When the connection fails or closes before the head is complete.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Ok(None);
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the request was complete",
            ));
        }
        let from = len.saturating_sub(3);
        len += n;
        if let Some(i) = find(&buf[from..len], b"\r\n\r\n") {
            buf.truncate(from + i);
            return Ok(Some(buf));
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The answer to one request head.
fn route(head: &[u8], metrics: &Metrics) -> Response {
    let Some((method, path)) = request_line(head) else {
        return Response::text(400, "Bad Request", "bad request\n");
    };
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Response::text(405, "Method Not Allowed", "only GET and HEAD\n");
            r.allow = true;
            return r;
        }
    };
    let mut response = match path {
        "/metrics" => Response {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            ..Response::text(200, "OK", metrics.render())
        },
        "/health" => Response::text(200, "OK", "ok\n"),
        "/ready" => ready(metrics),
        "/" => Response::text(200, "OK", "weir: /metrics /health /ready\n"),
        _ => Response::text(404, "Not Found", "not found\n"),
    };
    response.head_only = head_only;
    response
}

fn ready(metrics: &Metrics) -> Response {
    let r = metrics.readiness();
    if r.is_ready() {
        return Response::text(200, "OK", "ready\n");
    }
    let mut down = Vec::new();
    if !r.broker {
        down.push("broker");
    }
    if !r.sink {
        down.push("sink");
    }
    let body = format!("not ready: {} down\n", down.join(" and "));
    Response::text(503, "Service Unavailable", body)
}

/// The method and the path (query string removed) of a request head, when
/// its first line is `METHOD SP target SP HTTP/1.x`.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    // The absolute form (`GET http://host/metrics`) names the same path.
    let target = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    if !target.starts_with('/') {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some((method, path))
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// Answer a HEAD request: headers only.
    head_only: bool,
    /// Add `Allow: GET, HEAD` (405 answers).
    allow: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            head_only: false,
            allow: false,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

    async fn listener() -> Result<(MetricsListener, Arc<Metrics>)> {
        let metrics = Arc::new(Metrics::new(HashSet::new()));
        let addr = "127.0.0.1:0".parse()?;
        Ok((
            MetricsListener::start(addr, metrics.clone()).await?,
            metrics,
        ))
    }

    /// Sends raw bytes and returns everything the server answers.
    async fn send(addr: SocketAddr, request: &[u8]) -> Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(request).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(String::from_utf8(out)?)
    }

    async fn get(addr: SocketAddr, path: &str) -> Result<String> {
        send(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await
    }

    #[tokio::test]
    async fn serves_metrics_in_prometheus_text_format() -> Result {
        let (l, _metrics) = listener().await?;
        let answer = get(l.local_addr(), "/metrics?x=1").await?;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(
            answer.contains("# TYPE weir_ready gauge\nweir_ready 0\n"),
            "{answer}"
        );
        let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        l.stop().await;
        Ok(())
    }

    #[tokio::test]
    async fn health_is_ok_and_ready_follows_the_metrics() -> Result {
        let (l, metrics) = listener().await?;
        let addr = l.local_addr();
        assert!(get(addr, "/health").await?.starts_with("HTTP/1.1 200 OK"));
        let answer = get(addr, "/ready").await?;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.ends_with("not ready: broker down\n"), "{answer}");
        metrics.set_ready(true);
        assert!(get(addr, "/ready").await?.ends_with("\r\n\r\nready\n"));
        metrics.set_sink_ready(false);
        assert!(get(addr, "/ready")
            .await?
            .ends_with("not ready: sink down\n"));
        l.stop().await;
        Ok(())
    }

    #[tokio::test]
    async fn head_gets_headers_only() -> Result {
        let (l, _metrics) = listener().await?;
        let answer = send(l.local_addr(), b"HEAD /health HTTP/1.0\r\n\r\n").await?;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("Content-Length: 3\r\n"));
        assert!(answer.ends_with("\r\n\r\n"), "{answer}");
        Ok(())
    }

    #[tokio::test]
    async fn refuses_what_it_does_not_serve() -> Result {
        let (l, _metrics) = listener().await?;
        let addr = l.local_addr();
        assert!(get(addr, "/nope").await?.starts_with("HTTP/1.1 404 "));
        let post = send(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await?;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET, HEAD\r\n"));
        for bad in [
            &b"garbage\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"\xff\xfe HTTP/1.1\r\n\r\n",
        ] {
            let answer = send(addr, bad).await?;
            assert!(answer.starts_with("HTTP/1.1 400 "), "{bad:?}: {answer}");
        }
        let absolute = get(addr, "http://127.0.0.1/health").await?;
        assert!(absolute.starts_with("HTTP/1.1 200 "), "{absolute}");
        Ok(())
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused() -> Result {
        let (l, _metrics) = listener().await?;
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Fill: ".to_vec();
        request.resize(MAX_HEAD_BYTES + 10, b'a');
        let mut s = TcpStream::connect(l.local_addr()).await?;
        s.write_all(&request).await?;
        let mut out = vec![0u8; 64];
        let n = s.read(&mut out).await?;
        let answer = String::from_utf8_lossy(&out[..n]);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_disconnected_after_the_timeout() -> Result {
        let (l, _metrics) = listener().await?;
        let mut s = TcpStream::connect(l.local_addr()).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await?;
        let started = tokio::time::Instant::now();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        assert!(out.is_empty(), "no answer to an unfinished request");
        assert!(started.elapsed() >= EXCHANGE_TIMEOUT);
        // The listener still serves others.
        assert!(get(l.local_addr(), "/health").await?.contains("200 OK"));
        Ok(())
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_at_once() -> Result {
        let (l, _metrics) = listener().await?;
        let addr = l.local_addr();
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"G").await?;
            idle.push(s);
        }
        // Wait until the listener has taken every idle connection.
        let mut extra = TcpStream::connect(addr).await?;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await??;
        assert_eq!(
            n, 0,
            "the connection past the limit is closed without an answer"
        );
        drop(idle);
        // Permits come back once the idle connections are gone.
        let mut answered = false;
        for _ in 0..50 {
            if let Ok(answer) = get(addr, "/health").await {
                if answer.contains("200 OK") {
                    answered = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered);
        Ok(())
    }

    #[tokio::test]
    async fn stop_closes_the_port() -> Result {
        let (l, _metrics) = listener().await?;
        let addr = l.local_addr();
        l.stop().await;
        assert!(TcpStream::connect(addr).await.is_err());
        Ok(())
    }

    #[test]
    fn listen_addr_parses_off_empty_and_addresses() {
        assert_eq!("off".parse(), Ok(ListenAddr::Off));
        assert_eq!("OFF".parse(), Ok(ListenAddr::Off));
        assert_eq!("".parse(), Ok(ListenAddr::Off));
        assert_eq!(
            "127.0.0.1:0".parse(),
            Ok(ListenAddr::On("127.0.0.1:0".parse().expect("address")))
        );
        assert!("[::1]:9598".parse::<ListenAddr>().is_ok());
        assert!("localhost:9598".parse::<ListenAddr>().is_err());
        assert!("9598".parse::<ListenAddr>().is_err());
        assert_eq!(
            DEFAULT_ADDR.parse::<ListenAddr>().map(|a| a.to_string()),
            Ok(DEFAULT_ADDR.into())
        );
    }
}
