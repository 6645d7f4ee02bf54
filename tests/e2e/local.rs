//! The zero-setup pipeline, `pipelines/local.toml`: the sample file into
//! SQLite, with no RabbitMQ and no PostgreSQL. Each test runs the pipeline
//! file as shipped, byte for byte, from a temporary copy of the repository
//! layout (its own `pipelines/` and `samples/`, links to everything else),
//! so the database and the dead-letter file land in the temporary
//! directory. `AMQP_URL` and `DATABASE_URL` point at closed ports to show
//! that no server is needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::support::*;

const RUN_LIMIT: Duration = Duration::from_secs(120);

/// A temporary directory laid out like the repository, with its own copy
/// of `pipelines/local.toml` and its own `samples/domain-events.ndjson`.
struct LocalRepo {
    dir: tempfile::TempDir,
}

impl LocalRepo {
    fn new(sample: &str) -> Result<LocalRepo> {
        let dir = tempfile::tempdir()?;
        let root = project_root().canonicalize()?;
        for entry in std::fs::read_dir(&root)? {
            let name = entry?.file_name();
            let skip = ["pipelines", "samples", "dead-letters.ndjson"];
            let s = name.to_string_lossy();
            if skip.contains(&s.as_ref()) || s.starts_with("audit.db") {
                continue;
            }
            std::os::unix::fs::symlink(root.join(&name), dir.path().join(&name))?;
        }
        std::fs::create_dir(dir.path().join("pipelines"))?;
        std::fs::copy(
            root.join("pipelines/local.toml"),
            dir.path().join("pipelines/local.toml"),
        )?;
        std::fs::create_dir(dir.path().join("samples"))?;
        std::fs::write(dir.path().join("samples/domain-events.ndjson"), sample)?;
        Ok(LocalRepo { dir })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Runs `weir run pipelines/local.toml` to its end; returns its closing
    /// summary line and its whole standard error.
    fn run(&self) -> Result<(String, String)> {
        let log = self.path(&format!("weir-{}.log", std::process::id()));
        let weir = start_weir(
            &self.path("pipelines/local.toml"),
            log,
            &[],
            &[
                ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
                ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere"),
            ],
        )?;
        let (status, log) = weir.wait_exit(RUN_LIMIT)?;
        assert!(status.success(), "weir exited with {status}; log:\n{log}");
        let summary = log
            .lines()
            .rev()
            .find(|l| l.starts_with("stored "))
            .ok_or_else(|| format!("no summary line; log:\n{log}"))?
            .to_string();
        Ok((summary, log))
    }

    async fn rows(&self) -> Result<i64> {
        let mut db = SqliteConnectOptions::new()
            .filename(self.path("audit.db"))
            .connect()
            .await?;
        let rows = sqlx::query_scalar("SELECT count(*) FROM audit_logs")
            .fetch_one(&mut db)
            .await?;
        db.close().await?;
        Ok(rows)
    }

    fn dead_letters(&self) -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(self.path("dead-letters.ndjson"))?;
        Ok(text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?)
    }
}

#[tokio::test]
async fn local_pipeline_stores_each_sample_event_once_with_no_servers() -> Result {
    let sample = own_sample()?;
    let distinct = distinct_lines(&sample) as i64;
    let repo = LocalRepo::new(&sample)?;

    let (summary, log) = repo.run()?;
    assert_eq!(repo.rows().await?, distinct, "log:\n{log}");
    let lines = sample.lines().filter(|l| !l.trim().is_empty()).count() as i64;
    assert_eq!(
        summary,
        format!(
            "stored {distinct}, duplicates skipped {}, dead-lettered 0, dropped 0",
            lines - distinct
        )
    );
    assert_eq!(repo.dead_letters()?.len(), 0);

    let (summary, log) = repo.run()?;
    assert!(summary.starts_with("stored 0, "), "{summary}");
    assert_eq!(
        summary,
        format!("stored 0, duplicates skipped {lines}, dead-lettered 0, dropped 0")
    );
    assert_eq!(repo.rows().await?, distinct, "log:\n{log}");
    Ok(())
}

#[tokio::test]
async fn bad_lines_go_to_the_dead_letter_file_with_their_line_numbers() -> Result {
    let sample = own_sample()?;
    let good: Vec<&str> = sample.lines().take(5).collect();
    let no_type = r#"{"service": "order-service", "payload": {}}"#;
    let text = [
        good[0],
        "this is not json",
        good[1],
        "",
        "[1, 2, 3]",
        good[2],
        no_type,
        good[3],
        good[4],
    ]
    .join("\n");
    let repo = LocalRepo::new(&text)?;

    let (summary, log) = repo.run()?;
    assert_eq!(
        summary,
        "stored 5, duplicates skipped 0, dead-lettered 3, dropped 0"
    );
    assert_eq!(repo.rows().await?, 5, "log:\n{log}");

    let dead = repo.dead_letters()?;
    let seen: Vec<(u64, &str, &str)> = dead
        .iter()
        .map(|d| {
            (
                d["line"].as_u64().unwrap_or_default(),
                d["body"].as_str().unwrap_or_default(),
                d["reason"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(seen.len(), 3, "{dead:?}");
    assert_eq!(seen[0].0, 2);
    assert_eq!(seen[0].1, "this is not json");
    assert!(seen[0].2.contains("not JSON"), "{dead:?}");
    assert_eq!(seen[1].0, 5);
    assert_eq!(seen[1].1, "[1, 2, 3]");
    assert!(seen[1].2.contains("not an object"), "{dead:?}");
    assert_eq!(seen[2].0, 7);
    assert_eq!(seen[2].1, no_type);
    assert!(seen[2].2.contains("missing `event_type`"), "{dead:?}");
    for d in &dead {
        assert_eq!(d["class"], "decode");
        assert_eq!(d["stage"], "decode");
        assert!(d["source"]
            .as_str()
            .is_some_and(|s| s.ends_with("samples/domain-events.ndjson")));
    }

    // The dead-letter file is appended to, never truncated.
    let (summary, _) = repo.run()?;
    assert_eq!(
        summary,
        "stored 0, duplicates skipped 5, dead-lettered 3, dropped 0"
    );
    assert_eq!(repo.dead_letters()?.len(), 6);
    Ok(())
}

#[test]
fn validate_accepts_the_local_pipeline() -> Result {
    let root = project_root();
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .current_dir(&root)
        .arg("validate")
        .arg(Path::new("pipelines/local.toml"))
        .output()?;
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// local.toml promises the checks of audit.toml: the same transforms and
/// the same idempotency key, only another source and sink.
#[test]
fn local_pipeline_checks_events_as_audit_pipeline_does() -> Result {
    let read = |name: &str| -> Result<toml::Table> {
        let text = std::fs::read_to_string(project_root().join("pipelines").join(name))?;
        Ok(text.parse::<toml::Table>()?)
    };
    let (audit, local) = (read("audit.toml")?, read("local.toml")?);
    for section in ["transforms", "idempotency"] {
        assert_eq!(
            audit.get(section),
            local.get(section),
            "pipelines/local.toml's [{section}] differs from pipelines/audit.toml's"
        );
    }
    Ok(())
}
