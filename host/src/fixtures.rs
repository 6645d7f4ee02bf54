//! `weir test`: runs fixture events through a pipeline's transforms offline
//! and compares each outcome with what the fixture expects.
//!
//! A fixture file is TOML with one `[[case]]` per event:
//!
//! ```toml
//! [[case]]
//! name = "order.created 1.1 is stored"
//! event = '{"event_type": "order.created", "service": "order-service", ...}'
//! expect = "stored"                    # or "dead_lettered", "dropped"
//! fields = { "metadata.severity" = "low", "@key" = "5b0f..." }
//! absent = ["payload.email"]           # paths that must not be there
//! excludes = ["@example.com"]          # text found nowhere in the event
//!
//! [[case]]
//! name = "a malformed date-time is dead-lettered"
//! event = '{"event_type": "order.created", "timestamp": "yesterday", ...}'
//! expect = "dead_lettered"
//! class = "schema"                     # the reason class
//! reason = "/timestamp: format"        # text the reason must contain
//! ```
//!
//! `event` is the message body exactly as a producer would send it, so it
//! can be anything, including text that is not JSON. `fields` compares
//! values at dotted paths of the event after the transforms; `@key` is the
//! idempotency key. Optional `message_id`, `exchange` and `routing_key` set
//! the transport properties. Nothing connects to a broker or a database: the
//! sink is not run, so a case says what reaches it.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::config::{self, Pipeline};
use crate::event::{Event, Message};
use crate::transforms::{Chain, Verdict};

/// One fixture file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

/// One event and what should become of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
struct Case {
    name: String,
    event: String,
    expect: Expect,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    exchange: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    fields: toml::Table,
    #[serde(default)]
    absent: Vec<String>,
    #[serde(default)]
    excludes: Vec<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    class: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Expect {
    Stored,
    DeadLettered,
    Dropped,
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    pub file: PathBuf,
    pub line: usize,
    pub name: String,
    /// `None` when the outcome matched; otherwise what differed.
    pub failure: Option<String>,
}

/// Runs every `*.toml` fixture file of `dir` (sorted by name) through the
/// pipeline's transforms.
///
/// # Errors
///
/// When the pipeline, its transforms or a fixture file cannot be loaded.
pub fn run(pipeline: &Pipeline, dir: &Path) -> anyhow::Result<Vec<CaseResult>> {
    let mut chain = Chain::build(pipeline)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read fixture directory {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut results = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| anyhow::anyhow!("cannot read fixture file {}: {e}", file.display()))?;
        let fixtures: FixtureFile = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| config::line_at(&text, s.start))
                .unwrap_or(1);
            anyhow::anyhow!("{}:{line}: {}", file.display(), e.message())
        })?;
        for (i, case) in fixtures.cases.iter().enumerate() {
            results.push(CaseResult {
                file: file.clone(),
                line: config::line_of(&text, "case", i, None),
                name: case.name.clone(),
                failure: run_case(pipeline, &mut chain, case).err(),
            });
        }
    }
    Ok(results)
}

fn run_case(pipeline: &Pipeline, chain: &mut Chain, case: &Case) -> Result<(), String> {
    let msg = Message {
        body: case.event.as_bytes().to_vec(),
        message_id: case.message_id.clone(),
        exchange: case.exchange.clone(),
        routing_key: case.routing_key.clone(),
    };
    let (outcome, event) = match Event::decode(&msg, &pipeline.config.idempotency.key) {
        Err(why) => (Verdict::Reject(why), None),
        Ok(mut event) => (chain.apply(&mut event), Some(event)),
    };
    match (case.expect, outcome) {
        (Expect::Stored, Verdict::Keep) => {
            let event = event.expect("a kept event was decoded");
            check_fields(case, &event)
        }
        (Expect::Dropped, Verdict::Drop) => Ok(()),
        (Expect::DeadLettered, Verdict::Reject(why)) => {
            if let Some(class) = &case.class {
                if why.class.as_str() != class {
                    return Err(format!(
                        "expected class `{class}`, got `{}` ({why})",
                        why.class.as_str()
                    ));
                }
            }
            match &case.reason {
                Some(want) if !why.to_string().contains(want.as_str()) => Err(format!(
                    "expected a reason containing {want:?}, got {:?}",
                    why.to_string()
                )),
                _ => Ok(()),
            }
        }
        (want, got) => Err(format!(
            "expected {}, got {}",
            expect_word(want),
            verdict_word(&got)
        )),
    }
}

fn check_fields(case: &Case, event: &Event) -> Result<(), String> {
    let mut problems = Vec::new();
    for (path, want) in &case.fields {
        let want = serde_json::to_value(want).map_err(|e| e.to_string())?;
        let got = if path == "@key" {
            Some(Value::String(event.key.clone()))
        } else {
            lookup(&event.body, path).cloned()
        };
        match got {
            Some(got) if got == want => {}
            Some(got) => problems.push(format!("`{path}` is {got}, expected {want}")),
            None => problems.push(format!("`{path}` is missing, expected {want}")),
        }
    }
    let text = serde_json::to_string(&event.body).unwrap_or_default();
    for needle in &case.excludes {
        if text.contains(needle.as_str()) {
            problems.push(format!("the event still contains {needle:?}"));
        }
    }
    for path in &case.absent {
        if let Some(got) = lookup(&event.body, path) {
            problems.push(format!("`{path}` should be absent, is {got}"));
        }
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(problems.join("; ")),
    }
}

fn lookup<'a>(body: &'a serde_json::Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = body.get(parts.next()?)?;
    for p in parts {
        v = match v {
            Value::Array(items) => items.get(p.parse::<usize>().ok()?)?,
            other => other.get(p)?,
        };
    }
    Some(v)
}

fn expect_word(e: Expect) -> &'static str {
    match e {
        Expect::Stored => "stored",
        Expect::DeadLettered => "dead_lettered",
        Expect::Dropped => "dropped",
    }
}

fn verdict_word(v: &Verdict) -> String {
    match v {
        Verdict::Keep => "stored".into(),
        Verdict::Drop => "dropped".into(),
        Verdict::Reject(why) => format!("dead_lettered ({why})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline() -> Pipeline {
        let text = "[source]\ntype = \"amqp\"\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n\
                    [source.dead_letter]\nexchange = \"d\"\nqueue = \"dq\"\n[sink]\ntype = \"blackhole\"\n";
        Pipeline::parse(Path::new("p.toml"), text, |_| None).expect("valid pipeline")
    }

    fn case(toml_text: &str) -> Case {
        let f: FixtureFile = toml::from_str(toml_text).expect("valid fixture");
        f.cases.into_iter().next().expect("one case")
    }

    #[test]
    fn a_matching_case_passes_and_a_changed_expectation_fails() {
        let p = pipeline();
        let mut chain = Chain::build(&p).expect("no transforms");
        let good = case(
            "[[case]]\nname = \"x\"\nevent = '{\"event_type\": \"a\", \"service\": \"s\", \"payload\": {}, \"metadata\": {\"event_id\": \"k\"}}'\nexpect = \"stored\"\nfields = { \"@key\" = \"k\", \"event_type\" = \"a\" }\n",
        );
        assert_eq!(run_case(&p, &mut chain, &good), Ok(()));
        let changed = case(
            "[[case]]\nname = \"x\"\nevent = '{\"event_type\": \"a\", \"service\": \"s\", \"payload\": {}}'\nexpect = \"stored\"\nfields = { \"event_type\" = \"b\" }\n",
        );
        let err = run_case(&p, &mut chain, &changed).expect_err("must fail");
        assert!(
            err.contains("`event_type` is \"a\", expected \"b\""),
            "{err}"
        );
        let wrong_outcome = case("[[case]]\nname = \"x\"\nevent = 'nope'\nexpect = \"stored\"\n");
        let err = run_case(&p, &mut chain, &wrong_outcome).expect_err("must fail");
        assert!(
            err.starts_with("expected stored, got dead_lettered"),
            "{err}"
        );
    }
}
