//! The audit pipeline from RabbitMQ to PostgreSQL: every event stored once,
//! bad input dead-lettered with its reason, nothing lost on a crash.

use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

use crate::support::*;

const ROWS_LIMIT: Duration = Duration::from_secs(60);

async fn store_file_twice(text: &str, test: &str) -> Result {
    let env = TestEnv::new(test).await?;
    // The checks of audit.toml are on: every sample event passes them.
    let path = env.write_pipeline(&env.pipeline_text("", "", &audit_transforms()?))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let distinct = distinct_lines(text) as i64;

    env.publish_lines(&lines).await?;
    assert_eq!(env.wait_rows(distinct, ROWS_LIMIT).await?, distinct);
    env.publish_lines(&lines).await?;
    // Give the second round time to land before counting again.
    wait_queue_empty(&env, Duration::from_secs(60)).await?;
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "weir exited with {status}; log:\n{log}");
    assert_eq!(env.rows().await?, distinct, "log:\n{log}");
    // Each event is counted once as stored, every other copy as a
    // duplicate, whether it met its first copy in the same batch, in a
    // batch written at the same time, or already stored.
    let copies = 2 * lines.len() as i64;
    let summary = format!(
        "stored {distinct}, duplicates skipped {}, dead-lettered 0, dropped 0",
        copies - distinct
    );
    assert!(log.contains(&summary), "expected `{summary}`; log:\n{log}");
    assert_eq!(
        env.queue_depth(&env.dlq()).await?,
        0,
        "nothing is dead-lettered"
    );
    env.cleanup().await
}

async fn wait_queue_empty(env: &TestEnv, limit: Duration) -> Result {
    let start = Instant::now();
    while start.elapsed() < limit {
        if env.queue_depth(&env.queue()).await? == 0 {
            // Deliveries in flight are unacked, not in the count: wait a
            // little past the last batch's max_wait for them to commit.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("queue did not drain".into())
}

#[tokio::test]
async fn own_sample_is_stored_once_even_when_published_twice() -> Result {
    let text = own_sample()?;
    store_file_twice(&text, "own_sample").await
}

/// The platform's sample: 1,000 lines, 976 distinct events.
#[tokio::test]
async fn shared_sample_leaves_976_rows_even_when_published_twice() -> Result {
    let Some(text) = shared_sample() else {
        eprintln!("../shared/events is not here; this extra check does not apply");
        return Ok(());
    };
    assert_eq!(distinct_lines(&text), 976);
    store_file_twice(&text, "shared_sample").await
}

#[tokio::test]
async fn bad_bodies_are_dead_lettered_with_a_reason_and_consumption_goes_on() -> Result {
    let env = TestEnv::new("bad_bodies").await?;
    let path = env.write_pipeline(&env.pipeline_text("", "", ""))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let ex = env.exchange("order_events");
    let bad: [(&[u8], &str); 4] = [
        (b"this is not json", "not JSON"),
        (b"[1, 2, 3]", "not an object"),
        (
            br#"{"service": "order-service", "payload": {}}"#,
            "missing `event_type`",
        ),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
    ];
    for (body, _) in &bad {
        env.publish(&ex, "order.created", body).await?;
    }
    let good = r#"{"event_type": "order.created", "service": "order-service", "payload": {"order_id": "o-1"}, "metadata": {"event_id": "after-the-bad-ones"}}"#;
    env.publish(&ex, "order.created", good.as_bytes()).await?;

    assert_eq!(
        env.wait_rows(1, ROWS_LIMIT).await?,
        1,
        "the good event after the bad ones is stored"
    );
    let dead = env
        .take_dead_letters(bad.len(), Duration::from_secs(30))
        .await?;
    assert_eq!(dead.len(), bad.len(), "log:\n{}", weir.log_text());
    for (body, want) in &bad {
        let d = dead
            .iter()
            .find(|d| d.body == *body)
            .expect("each bad body is dead-lettered as sent");
        let reason = d.header("x-weir-reason").expect("reason header");
        assert!(
            reason.contains(want),
            "reason {reason:?} should say {want:?}"
        );
        assert_eq!(d.header("x-weir-reason-class").as_deref(), Some("decode"));
        assert_eq!(
            d.header("x-weir-original-exchange").as_deref(),
            Some(ex.as_str())
        );
    }
    let stored: String = sqlx::query_scalar("SELECT event_id FROM audit_logs")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(stored, "after-the-bad-ones");
    // Dead-lettered once, never requeued: nothing more arrives.
    assert!(env
        .take_dead_letters(1, Duration::from_secs(1))
        .await?
        .is_empty());
    assert_eq!(env.queue_depth(&env.queue()).await?, 0);
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    env.cleanup().await
}

#[tokio::test]
async fn a_lone_event_is_stored_by_the_timer_within_max_wait() -> Result {
    let env = TestEnv::new("lone_event").await?;
    let path =
        env.write_pipeline(&env.pipeline_text("", "max_events = 50\nmax_wait = \"1s\"", ""))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let body = r#"{"event_type": "user.logged_in", "service": "auth-service", "payload": {"user_id": "u"}, "metadata": {}}"#;
    let sent = Instant::now();
    env.publish(
        &env.exchange("auth_events"),
        "user.logged_in",
        body.as_bytes(),
    )
    .await?;
    // Not flushed at once: the batch is open for max_wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.rows().await?, 0, "a batch of one waits for max_wait");
    assert_eq!(env.wait_rows(1, Duration::from_secs(3)).await?, 1);
    let took = sent.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "stored after {took:?}, max_wait is 1s"
    );
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    env.cleanup().await
}

#[tokio::test]
async fn three_events_sharing_a_correlation_id_are_three_rows() -> Result {
    let env = TestEnv::new("correlation").await?;
    let path = env.write_pipeline(&env.pipeline_text("", "", ""))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let lines: Vec<String> = ["order.created", "order.paid", "stock.reserved"]
        .iter()
        .map(|t| {
            let service = if t.starts_with("stock") { "inventory-service" } else { "order-service" };
            format!(
                r#"{{"event_type": "{t}", "service": "{service}", "payload": {{"order_id": "o-9"}}, "metadata": {{"correlation_id": "11111111-2222-4333-8444-555555555555"}}}}"#
            )
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    env.publish_lines(&refs).await?;
    assert_eq!(env.wait_rows(3, ROWS_LIMIT).await?, 3);
    let ids: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT event_id) FROM audit_logs WHERE correlation_id = '11111111-2222-4333-8444-555555555555'",
    )
    .fetch_one(&env.db)
    .await?;
    assert_eq!(ids, 3);
    weir.terminate()?;
    env.cleanup().await
}

#[tokio::test]
async fn sigkill_halfway_then_restart_stores_every_event_once() -> Result {
    let text = match shared_sample() {
        Some(t) => t,
        None => own_sample()?,
    };
    let distinct = distinct_lines(&text) as i64;
    let env = TestEnv::new("sigkill").await?;
    // Small batches and a slow timer keep work in flight when the kill lands.
    let path =
        env.write_pipeline(&env.pipeline_text("", "max_events = 20\nmax_wait = \"50ms\"", ""))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    env.publish_lines(&lines).await?;
    let start = Instant::now();
    while env.rows().await? < distinct / 2 && start.elapsed() < ROWS_LIMIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let log = weir.kill()?;
    let at_kill = env.rows().await?;
    assert!(
        at_kill < distinct,
        "the kill should land mid-stream (had {at_kill}); log:\n{log}"
    );

    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    assert_eq!(env.wait_rows(distinct, ROWS_LIMIT).await?, distinct);
    wait_queue_empty(&env, Duration::from_secs(30)).await?;
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    assert_eq!(env.rows().await?, distinct);
    env.cleanup().await
}

#[tokio::test]
async fn refuses_a_queue_that_exists_with_other_arguments_and_leaves_it_alone() -> Result {
    let env = TestEnv::new("mismatch").await?;
    // The queue exists already, with a TTL of ten minutes and a message.
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(600_000));
    env.channel
        .queue_declare(
            &env.queue(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    env.publish("", &env.queue(), b"{\"kept\": true}").await?;

    let path = env.write_pipeline(&env.pipeline_text("", "", ""))?;
    let weir = env.spawn(&path)?;
    let (status, log) = weir.wait_exit(Duration::from_secs(30))?;
    assert!(!status.success(), "weir must refuse to start; log:\n{log}");
    assert!(
        log.contains(&env.queue()),
        "the error names the queue:\n{log}"
    );
    assert!(
        log.contains("x-message-ttl"),
        "the error names the argument:\n{log}"
    );
    assert_eq!(
        env.queue_depth(&env.queue()).await?,
        1,
        "the queue keeps its message"
    );
    env.cleanup().await
}

#[tokio::test]
async fn sigterm_commits_the_open_batch_and_exits_zero() -> Result {
    let env = TestEnv::new("sigterm").await?;
    let path =
        env.write_pipeline(&env.pipeline_text("", "max_events = 50\nmax_wait = \"1h\"", ""))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let lines: Vec<String> = (0..7)
        .map(|i| format!(r#"{{"event_type": "stock.adjusted", "service": "inventory-service", "payload": {{"n": {i}}}, "metadata": {{}}}}"#))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    env.publish_lines(&refs).await?;
    // The batch cannot fill and its timer is an hour: only shutdown flushes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.rows().await?, 0);
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    assert_eq!(env.rows().await?, 7, "{log}");
    assert_eq!(env.queue_depth(&env.queue()).await?, 0, "all acked");
    env.cleanup().await
}

/// PostgreSQL refuses an index entry over about 8 kB (SQLSTATE 54000):
/// that row is set aside, the rest of its batch is stored, and nothing
/// stalls.
#[tokio::test]
async fn a_row_past_postgres_limits_is_dead_lettered_and_its_batch_stored() -> Result {
    let env = TestEnv::new("past_limits").await?;
    // The audit checks are on: an unknown type passes them and is stored.
    let path = env.write_pipeline(&env.pipeline_text("", "", &audit_transforms()?))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let ex = env.exchange("order_events");
    // Random text: PostgreSQL compresses a repetitive one below the limit.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let long: String = (0..9000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    let event = |id: u32, event_type: &str| {
        format!(
            r#"{{"event_type":"{event_type}","service":"s","version":"1.0","timestamp":"2026-11-29T10:00:00Z","payload":{{"x":1}},"metadata":{{"event_id":"22222222-0000-4000-8000-{id:012}"}}}}"#
        )
    };
    env.publish(&ex, "x", event(1, &format!("nv.{long}")).as_bytes())
        .await?;
    for id in 2..=4 {
        env.publish(&ex, "x", event(id, "audit.probe").as_bytes())
            .await?;
    }
    let dead = env.take_dead_letters(1, ROWS_LIMIT).await?;
    assert_eq!(dead.len(), 1, "log:\n{}", weir.log_text());
    assert_eq!(
        dead[0].header("x-weir-reason-class").as_deref(),
        Some("database"),
        "log:\n{}",
        weir.log_text()
    );
    let reason = dead[0].header("x-weir-reason").unwrap_or_default();
    assert!(reason.contains("54000"), "{reason}");
    assert_eq!(env.wait_rows(3, ROWS_LIMIT).await?, 3);
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    assert!(
        log.contains("stored 3, duplicates skipped 0, dead-lettered 1, dropped 0"),
        "{log}"
    );
    env.cleanup().await
}

#[tokio::test]
async fn values_postgres_refuses_are_stored_by_the_documented_rules() -> Result {
    let env = TestEnv::new("refused_values").await?;
    let path = env.write_pipeline(&env.pipeline_text("", "", ""))?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let ex = env.exchange("auth_events");
    let nul = r#"{"event_type": "user.registered", "service": "auth-service", "timestamp": "2026-11-29T10:00:00Z", "payload": {"display_name": "a\u0000b", "k\u0000": 1}, "metadata": {"event_id": "nul-1", "user_agent": "x\u0000y"}}"#;
    let ts = r#"{"event_type": "user.registered", "service": "auth-service", "timestamp": "yesterday at noon", "payload": {}, "metadata": {"event_id": "ts-1"}}"#;
    let ip = r#"{"event_type": "user.registered", "service": "auth-service", "timestamp": "2026-11-29T10:00:00Z", "payload": {}, "metadata": {"event_id": "ip-1", "ip_address": "999.1.2.3"}}"#;
    for body in [nul, ts, ip] {
        env.publish(&ex, "user.registered", body.as_bytes()).await?;
    }
    assert_eq!(
        env.wait_rows(3, ROWS_LIMIT).await?,
        3,
        "log:\n{}",
        weir.log_text()
    );

    let (name, agent, anomalies, raw): (String, String, String, Vec<u8>) = sqlx::query_as(
        "SELECT payload->>'display_name', user_agent, anomalies, raw_body FROM audit_logs WHERE event_id = 'nul-1'",
    )
    .fetch_one(&env.db)
    .await?;
    assert_eq!(name, "a\u{FFFD}b");
    assert_eq!(agent, "x\u{FFFD}y");
    assert_eq!(anomalies, "nul_replaced");
    let raw: serde_json::Value = serde_json::from_slice(&raw)?;
    assert_eq!(
        raw["payload"]["display_name"], "a\u{0}b",
        "the raw body keeps the NUL"
    );

    let (at, anomalies): (Option<chrono::DateTime<chrono::Utc>>, String) =
        sqlx::query_as("SELECT occurred_at, anomalies FROM audit_logs WHERE event_id = 'ts-1'")
            .fetch_one(&env.db)
            .await?;
    assert!(at.is_none());
    assert_eq!(anomalies, "timestamp_unparseable");

    let (addr, raw_ip, anomalies): (Option<String>, String, String) = sqlx::query_as(
        "SELECT host(ip_address), metadata->>'ip_address', anomalies FROM audit_logs WHERE event_id = 'ip-1'",
    )
    .fetch_one(&env.db)
    .await?;
    assert!(addr.is_none());
    assert_eq!(raw_ip, "999.1.2.3");
    assert_eq!(anomalies, "ip_address_invalid");
    assert!(env
        .take_dead_letters(1, Duration::from_millis(500))
        .await?
        .is_empty());
    weir.terminate()?;
    env.cleanup().await
}

#[tokio::test]
async fn expired_messages_reach_the_dead_letter_queue() -> Result {
    let env = TestEnv::new("expired").await?;
    let path = env.write_pipeline(
        &env.pipeline_text("", "", "")
            .replace("message_ttl = \"1h\"", "message_ttl = \"200ms\""),
    )?;
    // Run once to declare the topology, then stop so nothing consumes.
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    env.publish(
        &env.exchange("order_events"),
        "order.created",
        b"{\"late\": true}",
    )
    .await?;
    let dead = env.take_dead_letters(1, Duration::from_secs(10)).await?;
    assert_eq!(
        dead.len(),
        1,
        "the expired message reaches the dead-letter queue"
    );
    assert_eq!(dead[0].body, b"{\"late\": true}");
    assert_eq!(dead[0].death_reason().as_deref(), Some("expired"));
    env.cleanup().await
}
