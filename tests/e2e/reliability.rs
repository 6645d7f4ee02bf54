//! Fault tests: each breaks something for real (weir's own connections,
//! through a proxy the test owns, or weir itself) and checks that every
//! event is still stored once, or dead-lettered with its reason.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::proxy::Proxy;
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(90);

fn sample() -> Result<String> {
    Ok(match shared_sample() {
        Some(t) => t,
        None => own_sample()?,
    })
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

fn host_port(url: &str) -> Result<SocketAddr> {
    let after = url.split("://").nth(1).ok_or("url without scheme")?;
    let hostport = after.rsplit('@').next().unwrap_or(after);
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    Ok(hostport.parse()?)
}

/// Fast retries so a ten-second outage is noticed soon after it ends.
const FAST_RETRY: &str = "\n[retry]\ninitial = \"50ms\"\nmax = \"1s\"\n";

/// A pipeline file whose sink reaches PostgreSQL through a proxy the test
/// can cut, with `sink_extra` in its `[sink]`, a short connect timeout and
/// fast retries.
async fn through_database_proxy(env: &TestEnv, sink_extra: &str) -> Result<(Proxy, PathBuf)> {
    let upstream = host_port(&env.db_url)?;
    let proxy = Proxy::start(upstream).await?;
    let pipeline = env
        .pipeline_text("", &format!("{sink_extra}\nconnect_timeout = \"1s\""), "")
        .replace(&upstream.to_string(), &proxy.addr.to_string())
        + FAST_RETRY;
    let path = env.write_pipeline(&pipeline)?;
    Ok((proxy, path))
}

// The proxy runs on this test's runtime; a second worker keeps it
// forwarding while the test blocks on weir's exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_cut_for_ten_seconds_loses_and_dead_letters_nothing() -> Result {
    let text = sample()?;
    let distinct = distinct_lines(&text) as i64;
    let env = TestEnv::new("db_cut").await?;
    let (proxy, path) = through_database_proxy(&env, "max_events = 20").await?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;

    env.publish_lines(&lines(&text)).await?;
    env.wait_rows(distinct / 4, LIMIT).await?;
    proxy.cut();
    let at_cut = env.rows().await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        env.rows().await? < distinct,
        "the cut should land mid-stream"
    );
    proxy.restore();

    assert_eq!(
        env.wait_rows(distinct, LIMIT).await?,
        distinct,
        "log:\n{}",
        weir.log_text()
    );
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    assert!(
        log.contains("Sink write failed; retrying."),
        "the outage was noticed:\n{log}"
    );
    assert!(at_cut < distinct);
    assert_eq!(env.rows().await?, distinct);
    assert_eq!(
        env.queue_depth(&env.dlq()).await?,
        0,
        "nothing is dead-lettered"
    );
    env.cleanup().await
}

// The proxy runs on this test's runtime; a second worker keeps it
// forwarding while the test blocks on weir's exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_cut_mid_stream_resumes_by_itself() -> Result {
    let text = sample()?;
    let distinct = distinct_lines(&text) as i64;
    let env = TestEnv::new("broker_cut").await?;
    let upstream = host_port(&amqp_url())?;
    let proxy = Proxy::start(upstream).await?;
    let pipeline = env.pipeline_text("", "max_events = 20", "").replacen(
        &upstream.to_string(),
        &proxy.addr.to_string(),
        1,
    ) + FAST_RETRY;
    let weir = env.spawn(&env.write_pipeline(&pipeline)?)?;
    weir.wait_started(Duration::from_secs(30)).await?;

    env.publish_lines(&lines(&text)).await?;
    env.wait_rows(distinct / 4, LIMIT).await?;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = env.rows().await?;
    proxy.restore();
    assert!(during < distinct, "the cut should land mid-stream");

    assert_eq!(
        env.wait_rows(distinct, LIMIT).await?,
        distinct,
        "log:\n{}",
        weir.log_text()
    );
    let log = weir.log_text();
    assert!(log.contains("Reconnected to the broker."), "{log}");
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    assert_eq!(env.rows().await?, distinct);
    assert_eq!(
        env.queue_depth(&env.queue()).await?,
        0,
        "everything was acked"
    );
    assert_eq!(env.queue_depth(&env.dlq()).await?, 0);
    env.cleanup().await
}

#[tokio::test]
async fn one_row_the_database_refuses_in_a_batch_of_100_is_dead_lettered_alone() -> Result {
    let env = TestEnv::new("refused_row").await?;
    let pipeline = env
        .pipeline_text("", "max_events = 100\nmax_wait = \"5s\"", "")
        .replace("prefetch = 50", "prefetch = 100");
    let weir = env.spawn(&env.write_pipeline(&pipeline)?)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    // A rule of the database's own, other than the idempotency key.
    sqlx::query("ALTER TABLE audit_logs ADD CONSTRAINT no_forbidden CHECK (event_type <> 'forbidden.event')")
        .execute(&env.db)
        .await?;

    let bodies: Vec<String> = (0..100)
        .map(|i| {
            let t = if i == 42 { "forbidden.event" } else { "stock.adjusted" };
            format!(r#"{{"event_type": "{t}", "service": "inventory-service", "payload": {{"n": {i}}}, "metadata": {{}}}}"#)
        })
        .collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    env.publish_lines(&refs).await?;

    assert_eq!(env.wait_rows(99, LIMIT).await?, 99);
    let dead = env.take_dead_letters(1, Duration::from_secs(10)).await?;
    assert_eq!(dead.len(), 1, "log:\n{}", weir.log_text());
    assert_eq!(dead[0].body, bodies[42].as_bytes());
    assert_eq!(
        dead[0].header("x-weir-reason-class").as_deref(),
        Some("database")
    );
    let reason = dead[0].header("x-weir-reason").unwrap_or_default();
    assert!(
        reason.contains("no_forbidden") && reason.contains("23514"),
        "{reason}"
    );
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    assert_eq!(env.rows().await?, 99);
    env.cleanup().await
}

#[tokio::test]
async fn two_weir_processes_on_one_queue_store_each_event_once() -> Result {
    let text = sample()?;
    let distinct = distinct_lines(&text) as i64;
    let env = TestEnv::new("two_procs").await?;
    let path = env.write_pipeline(&env.pipeline_text("", "max_events = 20", ""))?;
    let a = env.spawn(&path)?;
    let b = env.spawn(&path)?;
    a.wait_started(Duration::from_secs(30)).await?;
    b.wait_started(Duration::from_secs(30)).await?;

    // Published twice: redeliveries and duplicates reach both processes.
    env.publish_lines(&lines(&text)).await?;
    env.publish_lines(&lines(&text)).await?;
    assert_eq!(env.wait_rows(distinct, LIMIT).await?, distinct);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sa, la) = a.terminate()?;
    let (sb, lb) = b.terminate()?;
    assert!(sa.success() && sb.success(), "{la}\n{lb}");
    assert_eq!(env.rows().await?, distinct);
    assert_eq!(env.queue_depth(&env.queue()).await?, 0);
    env.cleanup().await
}

#[tokio::test]
async fn a_message_delivered_past_the_limit_is_dead_lettered_from_a_quorum_queue() -> Result {
    // A quorum queue counts deliveries itself.
    poison_message("poison_quorum", "queue_type = \"quorum\"").await
}

#[tokio::test]
async fn a_message_delivered_past_the_limit_is_dead_lettered_from_a_classic_queue() -> Result {
    // A classic queue keeps no count: weir keeps it in the database.
    poison_message("poison_classic", "queue_type = \"classic\"").await
}

async fn poison_message(test: &str, queue_type: &str) -> Result {
    let env = TestEnv::new(test).await?;
    // The batch never fills and its timer is an hour, so each weir dies
    // holding the message unacknowledged.
    let pipeline = env.pipeline_text(
        &format!("{queue_type}\ndelivery_limit = 2"),
        "max_wait = \"1h\"",
        "",
    );
    let path = env.write_pipeline(&pipeline)?;
    let body = r#"{"event_type": "order.paid", "service": "order-service", "payload": {}, "metadata": {}}"#;
    let mut published = false;
    for round in 0..2 {
        let weir = env.spawn(&path)?;
        weir.wait_started(Duration::from_secs(30)).await?;
        if !published {
            env.publish(&env.exchange("order_events"), "order.paid", body.as_bytes())
                .await?;
            published = true;
        }
        let start = Instant::now();
        while env.queue_depth(&env.queue()).await? > 0 && start.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = weir.kill()?;
        assert_eq!(
            env.rows().await?,
            0,
            "round {round}: nothing stored yet\n{log}"
        );
    }
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let dead = env.take_dead_letters(1, Duration::from_secs(15)).await?;
    assert_eq!(dead.len(), 1, "log:\n{}", weir.log_text());
    assert_eq!(dead[0].body, body.as_bytes());
    assert_eq!(
        dead[0].header("x-weir-reason-class").as_deref(),
        Some("delivery_limit")
    );
    let reason = dead[0].header("x-weir-reason").unwrap_or_default();
    assert!(reason.contains("delivered 3 times"), "{reason}");
    weir.terminate()?;
    assert_eq!(env.rows().await?, 0);
    env.cleanup().await
}

#[tokio::test]
async fn dead_letters_replayed_after_their_schema_is_fixed_are_stored() -> Result {
    let env = TestEnv::new("replay").await?;
    // A schema directory of the test's own, first with a wrong rule: an
    // order's total must be over a million.
    let schemas = env.dir.path().join("schemas");
    copy_dir(&project_root().join("schemas"), &schemas)?;
    let good = std::fs::read_to_string(schemas.join("order.paid/1.0.json"))?;
    let mut schema: serde_json::Value = serde_json::from_str(&good)?;
    assert!(
        set_minimum(&mut schema, "total", 1_000_000),
        "the schema has a total to constrain"
    );
    let broken = serde_json::to_string_pretty(&schema)?;
    std::fs::write(schemas.join("order.paid/1.0.json"), &broken)?;
    let transform = format!(
        "[[transforms]]\ntype = \"schema\"\ndir = \"{}\"\n",
        schemas.display()
    );
    let path = env.write_pipeline(&env.pipeline_text("", "", &transform))?;

    let text = own_sample()?;
    let paid: Vec<&str> = lines(&text)
        .into_iter()
        .filter(|l| l.contains("\"order.paid\"") && l.contains("\"version\": \"1.0\""))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(paid.len() >= 3);
    let other = lines(&text)
        .into_iter()
        .find(|l| l.contains("\"user.logged_in\""))
        .ok_or("sample")?;
    let mut publish: Vec<&str> = paid.clone();
    publish.push(other);

    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    env.publish_lines(&publish).await?;
    assert_eq!(env.wait_rows(1, LIMIT).await?, 1);
    let start = Instant::now();
    while env.queue_depth(&env.dlq()).await? < paid.len() as u32 && start.elapsed() < LIMIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.queue_depth(&env.dlq()).await?, paid.len() as u32);
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");

    // Replaying before the fix sends them back to the dead-letter queue.
    std::fs::write(schemas.join("order.paid/1.0.json"), &good)?;
    let (status, _, err) = weir_cmd(&[
        "replay",
        path.to_str().unwrap_or_default(),
        "--class",
        "decode",
    ])?;
    assert!(status.success(), "{err}");
    assert!(
        err.contains(&format!("replayed 0, left {}", paid.len())),
        "{err}"
    );

    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    let (status, _, err) = weir_cmd(&[
        "replay",
        path.to_str().unwrap_or_default(),
        "--class",
        "schema",
        "--event-type",
        "order.paid",
    ])?;
    assert!(status.success(), "{err}");
    assert!(
        err.contains(&format!("replayed {}, left 0", paid.len())),
        "{err}"
    );
    let want = 1 + paid.len() as i64;
    assert_eq!(
        env.wait_rows(want, LIMIT).await?,
        want,
        "log:\n{}",
        weir.log_text()
    );
    let exchanges: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT exchange FROM audit_logs WHERE event_type = 'order.paid'",
    )
    .fetch_all(&env.db)
    .await?;
    assert_eq!(
        exchanges,
        vec![env.exchange("order_events")],
        "replayed rows keep their original exchange"
    );
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    assert_eq!(env.queue_depth(&env.dlq()).await?, 0);
    env.cleanup().await
}

/// Sets `minimum` on every property schema named `name`.
fn set_minimum(schema: &mut serde_json::Value, name: &str, min: u64) -> bool {
    let mut found = false;
    match schema {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == name && v.get("type").is_some_and(|t| t == "number") {
                    v["minimum"] = min.into();
                    found = true;
                } else {
                    found |= set_minimum(v, name, min);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                found |= set_minimum(v, name, min);
            }
        }
        _ => {}
    }
    found
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_database_outage_exits_and_loses_nothing() -> Result {
    let env = TestEnv::new("term_outage").await?;
    let (proxy, path) = through_database_proxy(&env, "").await?;
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    proxy.cut();
    let bodies: Vec<String> = (0..10)
        .map(|i| format!(r#"{{"event_type": "order.paid", "service": "order-service", "payload": {{"n": {i}}}}}"#))
        .collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    env.publish_lines(&refs).await?;
    let start = Instant::now();
    while !weir.log_text().contains("Sink write failed; retrying.") && start.elapsed() < LIMIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Stopping cannot wait for the database: weir exits, acking nothing.
    let (status, log) = weir.terminate()?;
    assert!(
        !status.success(),
        "an unwritten batch is an unclean stop:\n{log}"
    );
    assert!(log.contains("leaving the open batch unwritten"), "{log}");
    assert_eq!(
        env.queue_depth(&env.queue()).await?,
        10,
        "every message is back in the queue"
    );

    proxy.restore();
    let weir = env.spawn(&path)?;
    weir.wait_started(Duration::from_secs(30)).await?;
    assert_eq!(env.wait_rows(10, LIMIT).await?, 10);
    let (status, log) = weir.terminate()?;
    assert!(status.success(), "{log}");
    env.cleanup().await
}
