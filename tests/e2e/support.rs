//! Shared set-up for the end-to-end tests: a database of the test's own, a
//! pipeline file whose queue and exchange names no other test uses, the
//! `weir` binary as a child process, and helpers to publish and to read
//! what ended up in PostgreSQL and in the dead-letter queue.
//!
//! URLs come from `AMQP_URL` and `DATABASE_URL`, defaulting to the local
//! services on 127.0.0.1. `DATABASE_URL` names an existing database used
//! only to create and drop each test's own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};

pub type Result<T = (), E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn admin_db_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The four exchanges producers publish to, by service.
pub const EXCHANGES: [&str; 4] = [
    "auth_events",
    "catalog_events",
    "inventory_events",
    "order_events",
];

pub fn exchange_for(service: &str) -> &'static str {
    match service {
        "auth-service" => "auth_events",
        "catalog-service" => "catalog_events",
        "inventory-service" => "inventory_events",
        _ => "order_events",
    }
}

/// One test's private world.
pub struct TestEnv {
    /// Prefix of every queue and exchange name, and the database name.
    pub name: String,
    pub db_url: String,
    pub db: PgPool,
    pub dir: tempfile::TempDir,
    amqp: Connection,
    pub channel: Channel,
}

impl TestEnv {
    pub async fn new(test: &str) -> Result<TestEnv> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("weir_{}_{}_{}", test, std::process::id(), n);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_db_url())
            .await?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
            .await?;
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await?;
        admin.close().await;
        let db_url = with_database(&admin_db_url(), &name);
        let db = PgPoolOptions::new()
            .max_connections(2)
            .connect(&db_url)
            .await?;
        let amqp = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
        let channel = amqp.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(TestEnv {
            name,
            db_url,
            db,
            dir: tempfile::tempdir()?,
            amqp,
            channel,
        })
    }

    pub fn queue(&self) -> String {
        format!("{}.audit", self.name)
    }

    pub fn dlq(&self) -> String {
        format!("{}.dlq_queue", self.name)
    }

    pub fn exchange(&self, base: &str) -> String {
        format!("{}.{}", self.name, base)
    }

    /// The audit pipeline with this test's names, `transforms` (TOML text
    /// of `[[transforms]]` tables) and extra `[sink]` keys.
    pub fn pipeline_text(&self, source_extra: &str, sink_extra: &str, transforms: &str) -> String {
        let mut t = format!(
            "[source]\ntype = \"amqp\"\nurl = \"{}\"\nqueue = \"{}\"\nprefetch = 50\nmessage_ttl = \"1h\"\n{source_extra}\n",
            amqp_url(),
            self.queue()
        );
        for ex in EXCHANGES {
            t.push_str(&format!(
                "[[source.exchanges]]\nname = \"{}\"\ntype = \"topic\"\nbinding_key = \"#\"\n\n",
                self.exchange(ex)
            ));
        }
        t.push_str(&format!(
            "[source.dead_letter]\nexchange = \"{}.dlx\"\nqueue = \"{}\"\nrouting_key = \"audit_dlq\"\n\n",
            self.name,
            self.dlq()
        ));
        t.push_str(transforms);
        t.push_str(&format!(
            "\n[sink]\ntype = \"postgres\"\nurl = \"{}\"\n{sink_extra}\n",
            self.db_url
        ));
        t
    }

    /// Writes a pipeline file into the test's directory.
    pub fn write_pipeline(&self, text: &str) -> Result<PathBuf> {
        let path = self.dir.path().join("pipeline.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Starts `weir run` on a pipeline file; its log goes to a file.
    pub fn spawn(&self, pipeline: &Path) -> Result<Weir> {
        self.spawn_with(pipeline, &[])
    }

    /// [`TestEnv::spawn`] with more arguments, e.g. `--log-format json`.
    /// The metrics listener takes a free port; see [`Weir::metrics_addr`].
    pub fn spawn_with(&self, pipeline: &Path, args: &[&str]) -> Result<Weir> {
        let log = self.dir.path().join(format!(
            "weir-{}.log",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        start_weir(pipeline, log, args, &[])
    }

    /// Publishes one body and waits for the broker's confirm.
    pub async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8]) -> Result {
        self.channel
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await?
            .await?;
        Ok(())
    }

    /// Publishes NDJSON lines to this test's exchanges, routed as producers
    /// do, waiting for every confirm.
    pub async fn publish_lines(&self, lines: &[&str]) -> Result {
        let mut confirms = Vec::with_capacity(lines.len());
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let service = v["service"].as_str().unwrap_or_default();
            let event_type = v["event_type"].as_str().unwrap_or_default();
            let exchange = self.exchange(exchange_for(service));
            confirms.push(
                self.channel
                    .basic_publish(
                        &exchange,
                        event_type,
                        BasicPublishOptions::default(),
                        line.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?,
            );
        }
        for c in confirms {
            c.await?;
        }
        Ok(())
    }

    pub async fn rows(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM audit_logs")
            .fetch_one(&self.db)
            .await?)
    }

    /// Waits until the table holds `n` rows, or fails after `limit`.
    pub async fn wait_rows(&self, n: i64, limit: Duration) -> Result<i64> {
        let start = Instant::now();
        loop {
            let rows = self.rows().await.unwrap_or(0);
            if rows >= n || start.elapsed() > limit {
                return Ok(rows);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes up to `n` messages from the dead-letter queue, waiting at most
    /// `limit` for them, and acknowledges them.
    pub async fn take_dead_letters(&self, n: usize, limit: Duration) -> Result<Vec<DeadLetter>> {
        let start = Instant::now();
        let mut out = Vec::new();
        while out.len() < n && start.elapsed() < limit {
            match self
                .channel
                .basic_get(&self.dlq(), BasicGetOptions { no_ack: true })
                .await?
            {
                Some(m) => {
                    let headers = m.delivery.properties.headers().clone().unwrap_or_default();
                    out.push(DeadLetter {
                        body: m.delivery.data.clone(),
                        headers,
                    });
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Ok(out)
    }

    /// Messages waiting in a queue.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        let ch = self.amqp.create_channel().await?;
        let q = ch
            .queue_declare(
                queue,
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = ch.close(200, "").await;
        Ok(q.message_count())
    }

    /// Deletes this test's queues, exchanges and database.
    pub async fn cleanup(self) -> Result {
        let ch = self.amqp.create_channel().await?;
        for q in [self.queue(), self.dlq()] {
            let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
        }
        for ex in EXCHANGES {
            let _ = ch
                .exchange_delete(&self.exchange(ex), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = ch
            .exchange_delete(
                &format!("{}.dlx", self.name),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.amqp.close(200, "").await;
        self.db.close().await;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_db_url())
            .await?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await?;
        Ok(())
    }
}

/// A message read back from the dead-letter queue.
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub headers: FieldTable,
}

impl DeadLetter {
    pub fn header(&self, name: &str) -> Option<String> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            other => Some(format!("{other:?}")),
        }
    }
}

impl DeadLetter {
    /// The `reason` of the broker's first `x-death` entry (`expired`,
    /// `rejected`, ...), when the broker dead-lettered the message itself.
    pub fn death_reason(&self) -> Option<String> {
        let AMQPValue::FieldArray(deaths) = self.headers.inner().get("x-death")? else {
            return None;
        };
        let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
            return None;
        };
        match first.inner().get("reason")? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        }
    }
}

/// Starts `weir ARGS run PIPELINE` with its log at `log`, at log level
/// info, with `env` set on top. The metrics listener takes a free port
/// each: tests run in parallel.
pub fn start_weir(
    pipeline: &Path,
    log: PathBuf,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Weir> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.args(args)
        .arg("run")
        .arg(pipeline)
        .env("WEIR_LOG", "info")
        .env("WEIR_METRICS_ADDR", "127.0.0.1:0");
    for (name, value) in env {
        cmd.env(name, value);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    Ok(Weir { child, log })
}

/// A running `weir` process.
pub struct Weir {
    pub child: Child,
    pub log: PathBuf,
}

impl Weir {
    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> Result<(std::process::ExitStatus, String)> {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        let status = wait_timeout(&mut self.child, Duration::from_secs(30))
            .map_err(|e| format!("{e}; log:\n{}", self.log_text()))?;
        Ok((status, self.log_text()))
    }

    /// Sends SIGKILL.
    pub fn kill(mut self) -> Result<String> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(self.log_text())
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(mut self, limit: Duration) -> Result<(std::process::ExitStatus, String)> {
        let status = wait_timeout(&mut self.child, limit)?;
        Ok((status, self.log_text()))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The metrics listener's address, from its "Metrics listener
    /// started." log line (text or JSON), waiting up to `limit` for it.
    pub async fn metrics_addr(&self, limit: Duration) -> Result<std::net::SocketAddr> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let log = self.log_text();
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("Metrics listener started."))
            {
                let value = line
                    .split_once("addr=")
                    .or_else(|| line.split_once("\"addr\":\""))
                    .map(|(_, rest)| rest)
                    .ok_or_else(|| format!("no addr in {line:?}"))?;
                let end = value
                    .find(|c: char| c.is_whitespace() || c == '"')
                    .unwrap_or(value.len());
                return Ok(value[..end].parse()?);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "no metrics listener within {limit:?}; log:\n{}",
            self.log_text()
        )
        .into())
    }

    /// Waits until the log shows the pipeline consuming.
    pub async fn wait_started(&self, limit: Duration) -> Result {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.log_text().contains("Pipeline started.") {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "weir did not start within {limit:?}; log:\n{}",
            self.log_text()
        )
        .into())
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            return Err(format!("weir did not exit within {limit:?}").into());
        }
        // Blocks the calling thread: a test whose runtime must keep serving
        // something meanwhile (a proxy) runs on two workers.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn with_database(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && i > url.find("://").unwrap_or(0) + 2 => {
            let (base, rest) = url.split_at(i);
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{base}/{db}{query}")
        }
        _ => format!("{url}/{db}"),
    }
}

/// A `[[transforms]]` table for the project's schemas with the given
/// policies.
pub fn schema_transform(on_missing: &str, on_invalid: &str) -> String {
    format!(
        "[[transforms]]\ntype = \"schema\"\ndir = \"{}\"\non_missing = \"{on_missing}\"\non_invalid = \"{on_invalid}\"\n",
        project_root().join("schemas").display()
    )
}

/// The `[[transforms]]` of pipelines/audit.toml, with their paths made
/// absolute, so a test pipeline runs exactly the audit checks.
pub fn audit_transforms() -> Result<String> {
    let text = std::fs::read_to_string(project_root().join("pipelines/audit.toml"))?;
    let start = text
        .find("[[transforms]]")
        .ok_or("audit.toml has transforms")?;
    let end = text
        .find("[idempotency]")
        .ok_or("audit.toml has [idempotency]")?;
    let root = project_root().canonicalize()?;
    Ok(text[start..end].replace("\"../", &format!("\"{}/", root.display())))
}

/// Runs the `weir` binary to completion with `args`, returning its exit
/// status, standard output and standard error.
pub fn weir_cmd(args: &[&str]) -> Result<(std::process::ExitStatus, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .current_dir(project_root())
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Lines of the project's own sample file.
pub fn own_sample() -> Result<String> {
    Ok(std::fs::read_to_string(
        project_root().join("samples/domain-events.ndjson"),
    )?)
}

/// Lines of `../shared/events/domain-events.ndjson`, when the file is there.
pub fn shared_sample() -> Option<String> {
    std::fs::read_to_string(project_root().join("../shared/events/domain-events.ndjson")).ok()
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Distinct events in NDJSON text: distinct lines, as producers' retries
/// repeat a line byte for byte.
pub fn distinct_lines(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<std::collections::HashSet<_>>()
        .len()
}
