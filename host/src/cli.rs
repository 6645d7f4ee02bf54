//! The command line: `weir run`, `weir validate`, `weir test`, `weir sample`.
//!
//! Process settings (log format, metrics address) are flags or environment
//! variables; what a pipeline means is in its TOML file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::info;

use crate::config::Pipeline;
use crate::http::{ListenAddr, MetricsListener};
use crate::metrics::Metrics;

/// weir: land every domain event, checked and enriched, in a database an
/// auditor can query.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "WEIR_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Address of the HTTP listener that serves /metrics, /health and
    /// /ready during `weir run`, e.g. 0.0.0.0:9598 to be scraped from other
    /// hosts; `off` or empty for none; port 0 picks a free port.
    #[arg(
        long,
        global = true,
        env = "WEIR_METRICS_ADDR",
        default_value = crate::http::DEFAULT_ADDR
    )]
    pub metrics_addr: ListenAddr,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline until SIGINT or SIGTERM.
    Run {
        /// The pipeline file.
        #[arg(default_value = "pipelines/audit.toml")]
        pipeline: PathBuf,
    },
    /// Check pipeline files and what they refer to, connecting to nothing.
    Validate {
        /// Pipeline files; default: every .toml file in pipelines/.
        pipelines: Vec<PathBuf>,
        /// `text` prints `file:line: message`; `github` prints workflow
        /// annotations.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
    },
    /// Run fixture events through a pipeline's transforms, offline, and
    /// compare each outcome with what the fixture expects.
    Test {
        /// The pipeline file.
        #[arg(default_value = "pipelines/audit.toml")]
        pipeline: PathBuf,
        /// Directory of fixture files (`*.toml`).
        #[arg(long, default_value = "fixtures")]
        fixtures: PathBuf,
    },
    /// Send dead-lettered messages back through a pipeline: all of them, or
    /// those matching every filter given. Those that fail again are
    /// dead-lettered again by the running pipeline.
    Replay {
        /// The pipeline file whose dead-letter queue to read.
        #[arg(default_value = "pipelines/audit.toml")]
        pipeline: PathBuf,
        /// Only messages whose reason contains this text.
        #[arg(long)]
        reason: Option<String>,
        /// Only messages of this reason class (`decode`, `schema`, `plugin`,
        /// `database`, `delivery_limit`, or the broker's `expired`).
        #[arg(long, value_parser = ["decode", "schema", "plugin", "database", "delivery_limit", "expired"])]
        class: Option<String>,
        /// Only messages of this event_type.
        #[arg(long)]
        event_type: Option<String>,
    },
    /// Write generated sample events as NDJSON to standard output.
    Sample {
        /// Number of lines.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Seed; the same seed gives the same bytes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// About one line in this many repeats an earlier line; 0 for none.
        #[arg(long, default_value_t = 40)]
        duplicate_every: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Github,
}

/// Sets up logging. `RUST_LOG` (or `WEIR_LOG`) picks levels; default `info`.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        // Libraries log their own view of failures weir already reports
        // (lapin's IO errors, sqlx's notices and slow statements).
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off,sqlx=error"));
    // Colours only for a person at a terminal, never in files or journals.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Runs the parsed command.
///
/// # Errors
///
/// Start-up failures, with their whole chain of causes.
pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { pipeline } => run(pipeline, cli.metrics_addr).await,
        Command::Validate { pipelines, format } => {
            Ok(crate::validate::run(&pipelines, format).await)
        }
        Command::Test { pipeline, fixtures } => test(&pipeline, &fixtures),
        Command::Replay {
            pipeline,
            reason,
            class,
            event_type,
        } => {
            let filter = crate::sources::amqp::ReplayFilter {
                reason,
                class,
                event_type,
            };
            replay(&pipeline, &filter).await
        }
        Command::Sample {
            count,
            seed,
            duplicate_every,
        } => {
            let spec = crate::sample::SampleSpec {
                count,
                seed,
                duplicate_every,
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let written = crate::sample::write_ndjson(&spec, &mut out)
                .and_then(|()| std::io::Write::flush(&mut out));
            match written {
                // A reader that stopped early (`| head`) is not an error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(anyhow::Error::from(e).context("cannot write sample events"))
                }
                _ => Ok(ExitCode::SUCCESS),
            }
        }
    }
}

async fn run(path: PathBuf, metrics_addr: ListenAddr) -> anyhow::Result<ExitCode> {
    let pipeline = Pipeline::load(&path)?;
    info!(pipeline = %path.display(), "Pipeline loaded.");
    // Event types get their own label once the pipeline has built its
    // schema transforms; until then, and for types without a schema, `other`.
    let metrics = Arc::new(Metrics::new(Default::default()));
    let listener = match metrics_addr {
        ListenAddr::On(addr) => Some(MetricsListener::start(addr, metrics.clone()).await?),
        ListenAddr::Off => None,
    };
    let result = crate::pipeline::run(&pipeline, metrics, shutdown_signal()).await;
    if let Some(listener) = listener {
        listener.stop().await;
    }
    let summary = result.with_context(|| format!("pipeline {} failed", path.display()))?;
    // One line for people, on standard error so standard output stays
    // clean for the console sink.
    eprintln!("{summary}");
    Ok(ExitCode::SUCCESS)
}

fn test(path: &std::path::Path, fixtures: &std::path::Path) -> anyhow::Result<ExitCode> {
    let pipeline = Pipeline::load(path)?;
    let results = crate::fixtures::run(&pipeline, fixtures)
        .with_context(|| format!("cannot run the fixtures of {}", path.display()))?;
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    for r in &results {
        match &r.failure {
            None => println!("ok   {}:{}: {}", r.file.display(), r.line, r.name),
            Some(why) => println!("FAIL {}:{}: {}: {why}", r.file.display(), r.line, r.name),
        }
    }
    println!(
        "weir test: {} passed, {failed} failed",
        results.len() - failed
    );
    Ok(if failed == 0 && !results.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn replay(
    path: &std::path::Path,
    filter: &crate::sources::amqp::ReplayFilter,
) -> anyhow::Result<ExitCode> {
    let pipeline = Pipeline::load(path)?;
    let crate::config::SourceConfig::Amqp(cfg) = &pipeline.config.source else {
        anyhow::bail!(
            "{}: replay reads an AMQP dead-letter queue; this pipeline's source is not AMQP",
            path.display()
        );
    };
    let report = crate::sources::amqp::replay(cfg, filter)
        .await
        .context("cannot replay dead letters")?;
    eprintln!(
        "replayed {}, left {} in {}",
        report.replayed, report.kept, cfg.dead_letter.queue
    );
    Ok(ExitCode::SUCCESS)
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "Cannot listen for SIGTERM; only SIGINT stops weir.");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
