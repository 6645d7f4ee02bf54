//! What an operator runs weir with: the `/metrics`, `/health` and `/ready`
//! endpoints and the lifecycle log. The counters must agree with what
//! PostgreSQL and the dead-letter queue hold, readiness must follow the
//! broker connection, and no producer may create metric series at will.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proxy::Proxy;
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Reconnect and retry quickly, so an outage ends soon after its cause.
const FAST_RETRY: &str = "\n[retry]\ninitial = \"100ms\"\nmax = \"1s\"\n";

/// One HTTP GET; the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("no blank line after the head")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// The samples of one metric in Prometheus text: labels and value.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let labels = labels
            .split("\",")
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        out.push((labels, value.parse().unwrap_or(f64::NAN)));
    }
    out
}

/// The sum of a metric's samples whose labels include `want`.
fn total(text: &str, name: &str, want: &[(&str, &str)]) -> u64 {
    samples(text, name)
        .iter()
        .filter(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v as u64)
        .sum()
}

/// Scrapes `/metrics` until `audit_events_consumed_total` adds up to `n`.
async fn wait_consumed(addr: SocketAddr, n: u64, weir: &Weir) -> Result<String> {
    let start = Instant::now();
    loop {
        let (status, text) = get(addr, "/metrics").await?;
        assert_eq!(status, 200);
        let seen = total(&text, "audit_events_consumed_total", &[]);
        if seen >= n {
            return Ok(text);
        }
        if start.elapsed() > LIMIT {
            return Err(format!("{seen} of {n} events counted; log:\n{}", weir.log_text()).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `/ready` until it answers `want`.
async fn wait_ready_status(addr: SocketAddr, want: u16, limit: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        let (status, body) = get(addr, "/ready").await?;
        if status == want {
            return Ok(body);
        }
        if start.elapsed() > limit {
            return Err(format!("/ready still {status} ({body:?}) after {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn consumed_counters_match_the_table_and_the_dead_letter_queue() -> Result {
    let env = TestEnv::new("ops_counts").await?;
    // The audit pipeline's own checks: the validate plugin, the schemas,
    // the enrich plugin.
    let transforms = audit_transforms()?;
    let path = env.write_pipeline(&env.pipeline_text("", "", &transforms))?;
    let weir = env.spawn(&path)?;
    let addr = weir.metrics_addr(Duration::from_secs(30)).await?;
    weir.wait_started(Duration::from_secs(30)).await?;

    let text = own_sample()?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    env.publish_lines(&lines).await?;
    let ex = env.exchange("order_events");
    let bad: [&[u8]; 5] = [
        b"this is not json",
        b"[1, 2, 3]",
        br#"{"service": "order-service", "payload": {}}"#,
        b"\xff\xfe\x00garbage",
        br#"{"event_type": "order.created", "service": "order-service", "version": "1.0", "payload": {"order_id": 7}, "metadata": {"event_id": "fails-its-schema"}}"#,
    ];
    for body in bad {
        env.publish(&ex, "order.created", body).await?;
    }
    let published = (lines.len() + bad.len()) as u64;

    let metrics = wait_consumed(addr, published, &weir).await?;
    let consumed = |status| {
        total(
            &metrics,
            "audit_events_consumed_total",
            &[("status", status)],
        )
    };
    let (stored, duplicates, dead) = (
        consumed("stored"),
        consumed("duplicate"),
        consumed("dead_lettered"),
    );
    assert_eq!(
        stored + duplicates + dead + consumed("dropped"),
        published,
        "{metrics}"
    );
    assert_eq!(
        stored as i64,
        env.rows().await?,
        "stored events are the table's rows"
    );
    assert_eq!(
        dead,
        u64::from(env.queue_depth(&env.dlq()).await?),
        "dead letters are in the queue"
    );
    assert!(
        dead >= 4,
        "at least the undecodable bodies are dead-lettered: {metrics}"
    );
    assert!(
        stored <= distinct_lines(&text) as u64,
        "a repeated line is stored once"
    );
    assert_eq!(
        total(&metrics, "weir_duplicates_skipped_total", &[]),
        duplicates
    );
    assert_eq!(total(&metrics, "weir_dead_letters_total", &[]), dead);
    assert_eq!(
        total(&metrics, "weir_dead_letters_total", &[("class", "decode")]),
        4
    );
    assert!(
        total(
            &metrics,
            "audit_events_consumed_total",
            &[("event_type", "order.created")]
        ) > 0,
        "types with a schema get their own label"
    );
    assert_eq!(
        total(
            &metrics,
            "weir_stage_events_total",
            &[("stage", "source"), ("outcome", "rejected")]
        ),
        4
    );
    // Every decoded event enters the first transform; each later stage
    // gets what the one before kept.
    let stage = |name, outcome| {
        total(
            &metrics,
            "weir_stage_events_total",
            &[("stage", name), ("outcome", outcome)],
        )
    };
    let entered = |name| total(&metrics, "weir_stage_events_total", &[("stage", name)]);
    assert_eq!(entered("validate"), published - 4);
    assert_eq!(entered("schema"), stage("validate", "ok"));
    assert_eq!(entered("enrich"), stage("schema", "ok"));
    assert_eq!(stage("enrich", "ok"), entered("sink"));
    for plugin in ["validate", "enrich"] {
        let calls = total(
            &metrics,
            "weir_plugin_duration_seconds_count",
            &[("plugin", plugin)],
        );
        assert_eq!(calls, entered(plugin), "one timing per call of {plugin}");
    }
    assert_eq!(stage("sink", "ok"), stored + duplicates);
    assert!(total(&metrics, "weir_batch_size_events_count", &[]) > 0);
    assert_eq!(
        total(&metrics, "weir_batch_size_events_sum", &[]),
        entered("sink")
    );
    assert!(total(&metrics, "weir_commit_duration_seconds_count", &[]) > 0);
    assert_eq!(
        total(&metrics, "audit_processing_duration_seconds_count", &[]),
        published
    );

    // The depth probe sees the dead-letter queue within a few refreshes.
    let start = Instant::now();
    loop {
        let (_, now) = get(addr, "/metrics").await?;
        let depth = total(&now, "weir_queue_depth_messages", &[("queue", &env.dlq())]);
        if depth == dead {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "queue depth {depth}, want {dead}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    env.cleanup().await
}

#[tokio::test]
async fn unknown_event_types_do_not_grow_the_series() -> Result {
    let env = TestEnv::new("ops_cardinality").await?;
    let transforms = schema_transform("store", "dead_letter");
    let path = env.write_pipeline(&env.pipeline_text("", "", &transforms))?;
    let weir = env.spawn(&path)?;
    let addr = weir.metrics_addr(Duration::from_secs(30)).await?;
    weir.wait_started(Duration::from_secs(30)).await?;

    let lines: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"event_type": "made.up.{i}", "service": "order-service", "payload": {{"n": {i}}}, "metadata": {{"event_id": "made-up-{i}"}}}}"#
            )
        })
        .collect();
    env.publish_lines(&lines.iter().map(String::as_str).collect::<Vec<_>>())
        .await?;
    let metrics = wait_consumed(addr, 1000, &weir).await?;

    let series = samples(&metrics, "audit_events_consumed_total");
    let known = std::fs::read_dir(project_root().join("schemas"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('_'))
        .count();
    let statuses = 4;
    assert!(
        series.len() <= known * statuses + statuses,
        "{} series for {known} known types: {series:?}",
        series.len()
    );
    assert!(
        !metrics.contains("made.up"),
        "an unknown type never becomes a label"
    );
    assert_eq!(
        total(
            &metrics,
            "audit_events_consumed_total",
            &[("event_type", "other"), ("status", "stored")]
        ),
        1000
    );
    assert_eq!(total(&metrics, "weir_schema_missing_total", &[]), 1000);
    assert_eq!(env.rows().await?, 1000);
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    env.cleanup().await
}

/// `host:port` of a URL such as `AMQP_URL` or `DATABASE_URL`.
fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host_port = rest.split(['/', '?']).next().unwrap_or(rest);
    if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    }
}

/// A proxy in front of the server of `url`, and `url` pointing at it.
async fn proxied(url: &str, default_port: u16) -> Result<(Proxy, String)> {
    let server = host_port(url, default_port);
    let upstream = tokio::net::lookup_host(&server)
        .await?
        .next()
        .ok_or_else(|| format!("{server} does not resolve"))?;
    let proxy = Proxy::start(upstream).await?;
    let url = url.replacen(&server, &proxy.addr.to_string(), 1);
    Ok((proxy, url))
}

/// The broker's pid of the connection a client named `name`.
fn broker_connection(name: &str) -> Result<Option<String>> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let quoted = format!("\"{name}\"");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&quoted))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string))
}

// Multi-threaded: the proxy runs in this test's runtime and must keep
// relaying while `terminate` blocks the test's thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_broker_connection() -> Result {
    let env = TestEnv::new("ops_ready").await?;
    let (proxy, url) = proxied(&amqp_url(), 5672).await?;
    let connection_name = format!("weir-{}", env.name);
    let source_extra = format!("connection_name = \"{connection_name}\"");
    let text = env
        .pipeline_text(&source_extra, "", "")
        .replacen(&amqp_url(), &url, 1)
        + FAST_RETRY;
    let path = env.write_pipeline(&text)?;
    let weir = env.spawn(&path)?;
    let addr = weir.metrics_addr(Duration::from_secs(30)).await?;
    assert_eq!(get(addr, "/health").await?.0, 200);
    wait_ready_status(addr, 200, Duration::from_secs(30)).await?;

    // The broker closes weir's own connection, and the proxy keeps the
    // broker out of reach (a reconnection that slipped through is cut too).
    let pid = broker_connection(&connection_name)?
        .ok_or_else(|| format!("no broker connection named {connection_name}"))?;
    let closed = Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &pid, "weir ops test"])
        .status()?;
    assert!(closed.success());
    proxy.cut();
    let body = wait_ready_status(addr, 503, Duration::from_secs(10)).await?;
    assert!(body.contains("broker"), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        get(addr, "/ready").await?.0,
        503,
        "not ready while the broker is away"
    );
    assert_eq!(get(addr, "/health").await?.0, 200, "alive all the same");

    proxy.restore();
    wait_ready_status(addr, 200, Duration::from_secs(30))
        .await
        .map_err(|e| format!("{e}; log:\n{}", weir.log_text()))?;
    let body = r#"{"event_type": "order.created", "service": "order-service", "payload": {"order_id": "o-1"}, "metadata": {"event_id": "after-the-cut"}}"#;
    env.publish(
        &env.exchange("order_events"),
        "order.created",
        body.as_bytes(),
    )
    .await?;
    assert_eq!(env.wait_rows(1, LIMIT).await?, 1, "consuming again");
    let (_, metrics) = get(addr, "/metrics").await?;
    assert!(
        total(&metrics, "weir_reconnects_total", &[("target", "broker")]) >= 1,
        "{metrics}"
    );
    assert_eq!(total(&metrics, "weir_ready", &[]), 1);

    let log_path = weir.log.clone();
    let (status, log) = weir.terminate().map_err(|e| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        format!("{e}; log:\n{log}")
    })?;
    assert!(status.success(), "{log}");
    env.cleanup().await
}

#[tokio::test]
async fn json_log_has_one_line_per_lifecycle_step_and_none_per_event() -> Result {
    let env = TestEnv::new("ops_log").await?;
    let path =
        env.write_pipeline(&env.pipeline_text("", "max_events = 50\nmax_wait = \"5s\"", ""))?;
    let weir = env.spawn_with(&path, &["--log-format", "json"])?;
    weir.metrics_addr(Duration::from_secs(30)).await?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let text = own_sample()?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(230)
        .collect();
    env.publish_lines(&lines).await?;
    // 230 events in batches of 50: the last 30 wait in the open batch for
    // max_wait, so stopping now flushes them.
    let start = Instant::now();
    while env.queue_depth(&env.queue()).await? > 0 {
        assert!(start.elapsed() < LIMIT, "queue did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");

    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            // The closing summary line is for people, not for the log.
            assert!(line.starts_with("stored "), "not JSON: {line}");
            continue;
        };
        let level = v["level"].as_str().unwrap_or_default().to_string();
        let message = v["message"].as_str().unwrap_or_default().to_string();
        assert!(v["timestamp"].is_string(), "{line}");
        if message == "Open batch flushed." {
            assert!(
                v["events"].as_u64() > Some(0),
                "the open batch was not empty: {line}"
            );
        }
        messages.push((level, message));
    }
    let info: Vec<&str> = messages
        .iter()
        .filter(|(l, _)| l == "INFO")
        .map(|(_, m)| m.as_str())
        .collect();
    for step in [
        "Metrics listener started.",
        "Pipeline loaded.",
        "Connected to the broker.",
        "Connected to PostgreSQL.",
        "Migrations applied.",
        "Consuming.",
        "Pipeline started.",
        "Shutdown requested; flushing the open batch.",
        "Open batch flushed.",
        "Disconnected from the broker.",
        "Disconnected from PostgreSQL.",
        "Pipeline stopped.",
    ] {
        assert_eq!(
            info.iter().filter(|m| **m == step).count(),
            1,
            "one {step:?} line; info lines: {info:#?}"
        );
    }
    assert!(
        info.len() < 20,
        "{} info lines for {} events: {info:#?}",
        info.len(),
        lines.len()
    );
    assert_eq!(env.rows().await?, distinct_lines(&lines.join("\n")) as i64);
    env.cleanup().await
}

// Multi-threaded for the proxy, as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_database_even_when_idle() -> Result {
    let env = TestEnv::new("ops_ready_db").await?;
    let (proxy, url) = proxied(&env.db_url, 5432).await?;
    let text = env
        .pipeline_text("", "connect_timeout = \"1s\"", "")
        .replacen(&env.db_url, &url, 1)
        + FAST_RETRY;
    let weir = env.spawn(&env.write_pipeline(&text)?)?;
    let addr = weir.metrics_addr(Duration::from_secs(30)).await?;
    wait_ready_status(addr, 200, Duration::from_secs(30)).await?;

    // No event is written: only the probe can notice.
    proxy.cut();
    let body = wait_ready_status(addr, 503, Duration::from_secs(20)).await?;
    assert!(body.contains("sink"), "{body}");
    assert_eq!(get(addr, "/health").await?.0, 200);
    let (_, metrics) = get(addr, "/metrics").await?;
    assert_eq!(total(&metrics, "weir_up", &[("target", "sink")]), 0);
    assert_eq!(total(&metrics, "weir_up", &[("target", "broker")]), 1);

    proxy.restore();
    wait_ready_status(addr, 200, Duration::from_secs(30)).await?;
    let body = r#"{"event_type": "order.created", "service": "order-service", "payload": {"order_id": "o-1"}, "metadata": {"event_id": "after-the-outage"}}"#;
    env.publish(
        &env.exchange("order_events"),
        "order.created",
        body.as_bytes(),
    )
    .await?;
    assert_eq!(
        env.wait_rows(1, LIMIT).await?,
        1,
        "log:\n{}",
        weir.log_text()
    );
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    let log_lines = |m: &str| log.lines().filter(|l| l.contains(m)).count();
    assert_eq!(
        log_lines("The database does not answer; not ready."),
        1,
        "{log}"
    );
    assert_eq!(log_lines("The database answers again."), 1, "{log}");
    env.cleanup().await
}
