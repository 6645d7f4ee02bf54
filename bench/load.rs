//! The load generator and stopwatch behind `bench/run.sh`.
//!
//! `run.sh` starts and stops the processes, creates and drops databases and
//! prints the table; this program does the parts that need a broker client,
//! a database client or a precise clock:
//!
//! - `pipeline`: writes a bench variant of `pipelines/audit.toml`, with the
//!   run's own queue and exchange names and database, and with or without
//!   the transforms;
//! - `declare`: declares that pipeline's topology exactly as weir does, by
//!   connecting weir's own AMQP source to the still empty queue;
//! - `publish`: publishes an NDJSON file to the pipeline's exchanges, routed
//!   as producers do, and waits until the queue holds all of it;
//! - `drain`: watches a running weir through `/metrics` until it has
//!   settled a given number of events, and reports the rate and the
//!   process's peak resident memory;
//! - `latency`: publishes at a steady rate and times each event from its
//!   publish to the commit of its row, as seen by a `LISTEN` on a
//!   notification that a trigger sends from the inserting transaction
//!   (PostgreSQL delivers notifications only once a transaction commits);
//! - `cleanup`: deletes the run's queues and exchanges.
//!
//! Every wait is bounded, so a broken run fails instead of hanging.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Parser, Subcommand};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::config::{AmqpSourceConfig, Pipeline, SourceConfig};
use weir::event::{Event, Message};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a bench pipeline file.
    Pipeline {
        /// `blackhole` (no transforms), `postgres` (no transforms) or
        /// `audit` (the transforms of pipelines/audit.toml).
        #[arg(long)]
        variant: String,
        /// Prefix of the queue and exchange names.
        #[arg(long)]
        prefix: String,
        /// The database of the postgres sink.
        #[arg(long, default_value = "")]
        db: String,
        /// `key = value` lines that replace or add keys of `[source]`.
        #[arg(long = "source")]
        source: Vec<String>,
        /// `key = value` lines that replace or add keys of `[sink]`.
        #[arg(long = "sink")]
        sink: Vec<String>,
    },
    /// Declare a pipeline's queues, exchanges and bindings.
    Declare { pipeline: PathBuf },
    /// Publish NDJSON events to a pipeline's exchanges.
    Publish {
        pipeline: PathBuf,
        #[arg(long)]
        events: PathBuf,
    },
    /// Wait until weir settled `expect` events; print the rate.
    Drain {
        /// weir's log, for the metrics address.
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        expect: u64,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Publish at a steady rate and time publish to commit.
    Latency {
        pipeline: PathBuf,
        #[arg(long)]
        events: PathBuf,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        db: String,
        /// weir's log, to wait for the migrations.
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Where to write each event's publish offset and latency, in ms.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
    /// Delete a pipeline's queues and exchanges.
    Cleanup { pipeline: PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Pipeline {
            variant,
            prefix,
            db,
            source,
            sink,
        } => {
            print!("{}", pipeline_text(&variant, &prefix, &db, &source, &sink)?);
            Ok(())
        }
        Cmd::Declare { pipeline } => declare(&pipeline).await,
        Cmd::Publish { pipeline, events } => publish(&pipeline, &events).await,
        Cmd::Drain {
            log,
            pid,
            expect,
            timeout,
        } => drain(&log, pid, expect, Duration::from_secs(timeout)).await,
        Cmd::Latency {
            pipeline,
            events,
            rate,
            db,
            log,
            pid,
            timeout,
            dump,
        } => {
            let limit = Duration::from_secs(timeout);
            let run = Steady {
                rate,
                db,
                log,
                pid,
                limit,
                dump,
            };
            latency(&pipeline, &events, &run).await
        }
        Cmd::Cleanup { pipeline } => cleanup(&pipeline).await,
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// pipelines/audit.toml with the run's names, database and variant.
fn pipeline_text(
    variant: &str,
    prefix: &str,
    db: &str,
    source: &[String],
    sink: &[String],
) -> anyhow::Result<String> {
    let root = root().canonicalize()?;
    let mut text = std::fs::read_to_string(root.join("pipelines/audit.toml"))?;
    for (from, to) in [
        ("\"audit_service_queue\"", format!("\"{prefix}.audit\"")),
        ("\"audit_dlq_queue\"", format!("\"{prefix}.dlq_queue\"")),
        (
            "exchange = \"audit_dlq\"",
            format!("exchange = \"{prefix}.dlx\""),
        ),
        ("\"../", format!("\"{}/", root.display())),
    ] {
        ensure!(text.contains(from), "audit.toml no longer has {from}");
        text = text.replace(from, &to);
    }
    for ex in EXCHANGES {
        text = text.replace(&format!("\"{ex}\""), &format!("\"{prefix}.{ex}\""));
    }
    text = text.replace(
        "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}",
        db,
    );
    if variant != "audit" {
        let start = text.find("[[transforms]]").context("no transforms")?;
        let end = text.find("[idempotency]").context("no [idempotency]")?;
        text.replace_range(start..end, "");
    }
    if variant == "blackhole" {
        let start = text.find("[sink]").context("no [sink]")?;
        text.truncate(start);
        text.push_str("[sink]\ntype = \"blackhole\"\n");
    }
    text = set_keys(&text, "[source]", source);
    text = set_keys(&text, "[sink]", sink);
    Ok(text)
}

/// Replaces (or appends) `key = value` lines in the table that starts at
/// the line `header` and ends at the next header.
fn set_keys(text: &str, header: &str, lines: &[String]) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    let mut pending: Vec<&String> = lines.iter().collect();
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    for line in text.lines() {
        if line.starts_with('[') {
            if inside {
                out.extend(pending.drain(..).map(String::as_str));
            }
            inside = line.trim() == header;
        }
        if inside && line.contains('=') {
            if let Some(i) = pending.iter().position(|p| key(p) == key(line)) {
                out.push(pending.remove(i).as_str());
                continue;
            }
        }
        out.push(line);
    }
    if inside {
        out.extend(pending.drain(..).map(String::as_str));
    }
    out.join("\n") + "\n"
}

const EXCHANGES: [&str; 4] = [
    "auth_events",
    "catalog_events",
    "inventory_events",
    "order_events",
];

fn amqp_cfg(path: &Path) -> anyhow::Result<(Pipeline, AmqpSourceConfig)> {
    let pipeline = Pipeline::load(path)?;
    let SourceConfig::Amqp(cfg) = pipeline.config.source.clone() else {
        bail!("{} has no amqp source", path.display());
    };
    Ok((pipeline, cfg))
}

async fn declare(path: &Path) -> anyhow::Result<()> {
    let (_, cfg) = amqp_cfg(path)?;
    let source = weir::sources::amqp::AmqpSource::connect(&cfg).await?;
    source.close().await;
    Ok(())
}

async fn channel(cfg: &AmqpSourceConfig) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(&cfg.url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// The exchange a line goes to and its routing key, as producers route.
fn route<'a>(cfg: &'a AmqpSourceConfig, line: &str) -> anyhow::Result<(&'a str, String)> {
    let v: serde_json::Value = serde_json::from_str(line)?;
    let service = v["service"].as_str().unwrap_or_default();
    let base = weir::sample::exchange_for_service(service).unwrap_or("order_events");
    let ex = cfg
        .exchanges
        .iter()
        .find(|e| e.name.ends_with(base))
        .context("no exchange for the service")?;
    Ok((
        &ex.name,
        v["event_type"].as_str().unwrap_or_default().to_string(),
    ))
}

async fn queue_depth(ch: &Channel, queue: &str) -> anyhow::Result<u32> {
    let q = ch
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

async fn publish(path: &Path, events: &Path) -> anyhow::Result<()> {
    let (_, cfg) = amqp_cfg(path)?;
    let text = std::fs::read_to_string(events)?;
    let (conn, ch) = channel(&cfg).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    let mut window = VecDeque::new();
    let mut n = 0u32;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (exchange, key) = route(&cfg, line)?;
        let props = BasicProperties::default().with_delivery_mode(2);
        let confirm = ch
            .basic_publish(
                exchange,
                &key,
                BasicPublishOptions::default(),
                line.as_bytes(),
                props,
            )
            .await?;
        window.push_back(confirm);
        if window.len() >= 2000 {
            if let Some(c) = window.pop_front() {
                c.await?;
            }
        }
        n += 1;
    }
    for c in window {
        c.await?;
    }
    let took = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while queue_depth(&ch, &cfg.queue).await? < n {
        ensure!(Instant::now() < deadline, "queue did not fill up in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "published {n} events in {:.1} s ({:.0}/s)",
        took.as_secs_f64(),
        f64::from(n) / took.as_secs_f64()
    );
    let _ = conn.close(200, "").await;
    Ok(())
}

async fn cleanup(path: &Path) -> anyhow::Result<()> {
    let (_, cfg) = amqp_cfg(path)?;
    let (conn, ch) = channel(&cfg).await?;
    for q in [&cfg.queue, &cfg.dead_letter.queue] {
        ch.queue_delete(q, QueueDeleteOptions::default()).await?;
    }
    let exchanges = cfg.exchanges.iter().map(|e| &e.name);
    for ex in exchanges.chain([&cfg.dead_letter.exchange]) {
        ch.exchange_delete(ex, ExchangeDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "").await;
    Ok(())
}

/// The address of weir's metrics listener, from its log.
async fn metrics_addr(log: &Path, pid: u32, limit: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("Metrics listener started."))
        {
            let rest = line.split_once("addr=").context("no addr")?.1;
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            return Ok(rest[..end].to_string());
        }
        alive(pid, log)?;
        ensure!(Instant::now() < deadline, "weir did not start in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn alive(pid: u32, log: &Path) -> anyhow::Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    if status.is_empty() || status.contains("State:\tZ") {
        bail!("weir exited; see {}", log.display());
    }
    Ok(())
}

/// weir's `/metrics` page.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

/// The value of an unlabelled series, e.g. a histogram's `_sum`.
fn series(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of a counter's series in weir's `/metrics`, by label value of
/// `status`.
async fn settled(addr: &str) -> anyhow::Result<HashMap<String, f64>> {
    let body = scrape(addr).await?;
    let mut out = HashMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("audit_events_consumed_total{") else {
            continue;
        };
        let status = rest
            .split("status=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("");
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(status.to_string()).or_insert(0.0) += value;
    }
    Ok(out)
}

/// CPU time a process used so far, in seconds (user and system).
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU time used so far by every process whose command name is `comm`
/// (`postgres`: the server and its backends; `beam.smp`: RabbitMQ), in
/// seconds. Processes that end in between are missed, which only happens
/// to short-lived backends.
fn cpu_of(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .map(process_cpu)
        .sum()
}

/// Busy and total CPU time of the whole machine so far, in seconds.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    ((total - idle) / 100.0, total / 100.0)
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn drain(log: &Path, pid: u32, expect: u64, limit: Duration) -> anyhow::Result<()> {
    let addr = metrics_addr(log, pid, Duration::from_secs(120)).await?;
    let deadline = Instant::now() + limit;
    // When the first event was settled: the time, the count then, the CPU
    // used by weir, PostgreSQL and RabbitMQ, and the machine's busy and
    // total CPU.
    type Start = (Instant, f64, [f64; 3], (f64, f64));
    let mut first: Option<Start> = None;
    let cpus = || [process_cpu(pid), cpu_of("postgres"), cpu_of("beam.smp")];
    loop {
        let counts = settled(&addr).await?;
        let now = Instant::now();
        let total: f64 = counts.values().sum();
        if first.is_none() && total > 0.0 {
            first = Some((now, total, cpus(), machine_cpu()));
        }
        if total >= expect as f64 {
            let (busy, all) = machine_cpu();
            let cpu = cpus();
            let (t0, n0, cpu0, (busy0, all0)) = first.unwrap_or((now, 0.0, cpu, (busy, all)));
            let secs = now.duration_since(t0).as_secs_f64().max(1e-3);
            let mut statuses: Vec<_> = counts.into_iter().collect();
            statuses.sort_by(|a, b| a.0.cmp(&b.0));
            let statuses: Vec<String> = statuses.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            let events = (total - n0).max(1.0);
            let page = scrape(&addr).await?;
            let batches = series(&page, "weir_commit_duration_seconds_count").max(1.0);
            let commit_ms = series(&page, "weir_commit_duration_seconds_sum") * 1e3 / batches;
            let batch = series(&page, "weir_batch_size_events_sum") / batches;
            println!(
                "rate={:.0} seconds={secs:.2} peak_rss_kb={} weir_cpu_us={:.0} \
                 postgres_cpu_us={:.0} broker_cpu_us={:.0} machine_cpu_us={:.0} \
                 machine_busy={:.2} batch={batch:.1} commit_ms={commit_ms:.2} outcomes={}",
                events / secs,
                peak_rss_kb(pid),
                (cpu[0] - cpu0[0]) * 1e6 / events,
                (cpu[1] - cpu0[1]) * 1e6 / events,
                (cpu[2] - cpu0[2]) * 1e6 / events,
                (busy - busy0) * 1e6 / events,
                (busy - busy0) / (all - all0).max(1e-3),
                statuses.join(",")
            );
            return Ok(());
        }
        alive(pid, log)?;
        ensure!(
            now < deadline,
            "weir settled {total} of {expect} events in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Installs the commit notification: every insert statement into
/// `audit_logs` sends its transaction id, which is every new row's `xmin`.
const TRIGGER: &str = "
CREATE OR REPLACE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('weir_bench', (txid_current() % 4294967296)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_notify AFTER INSERT ON audit_logs
    FOR EACH STATEMENT EXECUTE FUNCTION bench_notify();
";

/// A steady run's settings.
struct Steady {
    rate: f64,
    db: String,
    log: PathBuf,
    pid: u32,
    limit: Duration,
    dump: Option<PathBuf>,
}

async fn latency(path: &Path, events: &Path, run: &Steady) -> anyhow::Result<()> {
    let Steady {
        rate,
        ref db,
        ref log,
        pid,
        limit,
        ref dump,
    } = *run;
    let (pipeline, cfg) = amqp_cfg(path)?;
    let deadline = Instant::now() + limit;
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("Pipeline started.")
    {
        alive(pid, log)?;
        ensure!(Instant::now() < deadline, "weir did not start in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pool = PgPoolOptions::new().max_connections(2).connect(db).await?;
    sqlx::raw_sql(TRIGGER).execute(&pool).await?;
    let commits: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen("weir_bench").await?;
    let sink = commits.clone();
    let listening = tokio::spawn(async move {
        while let Ok(n) = listener.recv().await {
            let now = Instant::now();
            let mut map = sink.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(n.payload().to_string()).or_insert(now);
        }
    });

    let text = std::fs::read_to_string(events)?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut keyed = Vec::with_capacity(lines.len());
    for line in &lines {
        let msg = Message {
            body: line.as_bytes().to_vec(),
            ..Message::default()
        };
        let key = Event::decode(&msg, &pipeline.config.idempotency.key)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .key;
        let (exchange, routing_key) = route(&cfg, line)?;
        keyed.push((key, exchange, routing_key));
    }

    let (conn, ch) = channel(&cfg).await?;
    let mut published: HashMap<String, Instant> = HashMap::with_capacity(lines.len());
    let start = Instant::now() + Duration::from_millis(100);
    for (i, (line, (key, exchange, routing_key))) in lines.iter().zip(&keyed).enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let props = BasicProperties::default().with_delivery_mode(2);
        let at = Instant::now();
        ch.basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions::default(),
            line.as_bytes(),
            props,
        )
        .await?;
        published.entry(key.clone()).or_insert(at);
    }
    let sent = start.elapsed().as_secs_f64();

    let expected = published.len() as i64;
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_logs")
            .fetch_one(&pool)
            .await?;
        if rows >= expected {
            break;
        }
        alive(pid, log)?;
        ensure!(
            Instant::now() < deadline,
            "only {rows} of {expected} rows in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    listening.abort();
    if let Some(dump) = dump {
        // weir's own view of the run, to tell a slow commit from a slow
        // delivery when the tail is long.
        let addr = metrics_addr(log, pid, Duration::from_secs(5)).await?;
        std::fs::write(dump.with_extension("metrics"), scrape(&addr).await?)?;
    }

    let rows: Vec<(String, String)> = sqlx::query_as("SELECT event_id, xmin::text FROM audit_logs")
        .fetch_all(&pool)
        .await?;
    let commits = commits.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut ms: Vec<f64> = Vec::with_capacity(rows.len());
    let mut timeline = Vec::with_capacity(rows.len());
    let mut unmatched = 0;
    for (key, xid) in rows {
        match (published.get(&key), commits.get(&xid)) {
            (Some(p), Some(c)) => {
                let took = c.saturating_duration_since(*p).as_secs_f64() * 1e3;
                let at = p.saturating_duration_since(start).as_secs_f64() * 1e3;
                ms.push(took);
                timeline.push((at, took));
            }
            _ => unmatched += 1,
        }
    }
    if let Some(dump) = dump {
        timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
        let text: String = timeline
            .iter()
            .map(|(at, took)| format!("{at:.3} {took:.3}\n"))
            .collect();
        std::fs::write(dump, text)?;
    }
    ensure!(!ms.is_empty(), "no row could be timed");
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    println!(
        "events={} rate={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} unmatched={unmatched} \
         commits={} peak_rss_kb={}",
        ms.len(),
        lines.len() as f64 / sent,
        pct(0.50),
        pct(0.99),
        ms[ms.len() - 1],
        commits.len(),
        peak_rss_kb(pid),
    );
    let _ = conn.close(200, "").await;
    Ok(())
}
