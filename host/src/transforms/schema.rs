//! The schema transform: checks each event against the JSON Schema (draft
//! 2020-12) of its `event_type` and `version`.
//!
//! Layout of the schema directory: `<event_type>/<version>.json`, e.g.
//! `order.created/1.1.json`; directories whose name starts with `_` hold
//! shared parts that schemas reference with `$ref` and are not event types.
//! Lookup: an event's `version` selects its file exactly; if that file is
//! missing, the highest version with the same major number below it is used;
//! an event without `version` is treated as `1.0`. No match means the type
//! has no schema, and the `on_missing` policy applies.
//!
//! Every schema compiles once, at start, with `format` asserted (date-time,
//! uuid, ipv4, ipv6, email). `$ref`s to `https://weir.invalid/schemas/...`
//! (the `$id` base of the shipped schemas) and relative refs resolve to files
//! in the directory; nothing is fetched from the network.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use jsonschema::{Draft, Validator};
use serde_json::Value;

use crate::config::{SchemaPolicy, SchemaTransformConfig};
use crate::event::{Event, ReasonClass, Rejection};

use super::Verdict;

/// The `$id` prefix that maps to the schema directory.
pub const ID_BASE: &str = "https://weir.invalid/schemas/";

/// The most failing locations listed in one dead-letter reason.
const MAX_LISTED: usize = 20;

/// A schema file that cannot be used, with where it is.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct SchemaError {
    pub file: PathBuf,
    /// 1-based; 1 when the problem is the file as a whole.
    pub line: usize,
    pub message: String,
}

impl SchemaError {
    fn new(file: &Path, line: usize, message: impl Into<String>) -> Self {
        SchemaError {
            file: file.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

/// A version number such as `1.1`, compared numerically part by part.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(Vec<u64>);

impl Version {
    /// Parses `1`, `1.1`, `2.0.3`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Version> {
        let parts: Option<Vec<u64>> = s.split('.').map(|p| p.parse().ok()).collect();
        parts.filter(|p| !p.is_empty()).map(Version)
    }

    fn major(&self) -> u64 {
        self.0[0]
    }
}

/// One compiled schema and the file it came from.
struct Entry {
    file: PathBuf,
    validator: Validator,
}

/// Compiled schemas of one directory, by event type and version.
pub struct SchemaSet {
    by_type: HashMap<String, BTreeMap<Version, Entry>>,
}

/// How an event fared against the schema set.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// It matches the schema of its type and version.
    Valid,
    /// Its type (or version line) has no schema.
    Missing,
    /// It fails; the text lists every failing location.
    Invalid(String),
}

impl SchemaSet {
    /// Loads and compiles every schema under `dir`.
    ///
    /// # Errors
    ///
    /// The first file that is not JSON, does not compile, or refers to a
    /// missing file, with its path.
    pub fn load(dir: &Path) -> Result<SchemaSet, SchemaError> {
        let (set, mut problems) = SchemaSet::load_all(dir);
        match problems.is_empty() {
            true => Ok(set),
            false => Err(problems.swap_remove(0)),
        }
    }

    /// Loads every schema that compiles and lists every problem, for
    /// `weir validate`.
    pub fn load_all(dir: &Path) -> (SchemaSet, Vec<SchemaError>) {
        let mut by_type: HashMap<String, BTreeMap<Version, Entry>> = HashMap::new();
        let mut problems = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                problems.push(SchemaError::new(
                    dir,
                    1,
                    format!("cannot read schema directory: {e}"),
                ));
                return (SchemaSet { by_type }, problems);
            }
        };
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for path in dirs {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !path.is_dir() || name.starts_with('_') || name.starts_with('.') {
                continue;
            }
            for found in versions_in(&path) {
                match found.and_then(|(version, file)| {
                    compile(dir, &file).map(|validator| (version, Entry { file, validator }))
                }) {
                    Ok((version, entry)) => {
                        by_type
                            .entry(name.clone())
                            .or_default()
                            .insert(version, entry);
                    }
                    Err(e) => problems.push(e),
                }
            }
        }
        (SchemaSet { by_type }, problems)
    }

    /// The event types that have at least one schema.
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.by_type.keys().map(String::as_str)
    }

    /// Every schema file, for reports.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.by_type
            .values()
            .flat_map(|v| v.values().map(|e| e.file.as_path()))
    }

    fn lookup(&self, event_type: &str, version: Option<&str>) -> Option<&Entry> {
        let versions = self.by_type.get(event_type)?;
        let wanted = Version::parse(version.unwrap_or("1.0"))?;
        if let Some(e) = versions.get(&wanted) {
            return Some(e);
        }
        versions
            .range(..wanted.clone())
            .rev()
            .find(|(v, _)| v.major() == wanted.major())
            .map(|(_, e)| e)
    }

    /// Checks one event body.
    pub fn check(&self, body: &Value) -> Check {
        let event_type = body.get("event_type").and_then(Value::as_str).unwrap_or("");
        let version = body.get("version").and_then(Value::as_str);
        let Some(entry) = self.lookup(event_type, version) else {
            return Check::Missing;
        };
        if entry.validator.is_valid(body) {
            return Check::Valid;
        }
        let mut listed = Vec::new();
        let mut total = 0;
        for err in entry.validator.iter_errors(body) {
            total += 1;
            if listed.len() < MAX_LISTED {
                let at = err.instance_path().as_str();
                let at = if at.is_empty() { "/" } else { at };
                listed.push(format!("{at}: {} ({})", err.kind().keyword(), err));
            }
        }
        let file = entry
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut reason = format!(
            "event does not match schema {event_type}/{file}: {}",
            listed.join("; ")
        );
        if total > listed.len() {
            reason.push_str(&format!("; and {} more", total - listed.len()));
        }
        Check::Invalid(reason)
    }
}

/// `(version, file)` for every `<version>.json` in one type's directory.
fn versions_in(dir: &Path) -> Vec<Result<(Version, PathBuf), SchemaError>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return vec![Err(SchemaError::new(
                dir,
                1,
                format!("cannot read directory: {e}"),
            ))]
        }
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match Version::parse(&stem) {
                Some(v) => Ok((v, path)),
                None => Err(SchemaError::new(
                    &path,
                    1,
                    "schema file name must be a version such as 1.0.json",
                )),
            }
        })
        .collect()
}

fn compile(dir: &Path, file: &Path) -> Result<Validator, SchemaError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| SchemaError::new(file, 1, format!("cannot read schema: {e}")))?;
    let schema: Value = serde_json::from_str(&text)
        .map_err(|e| SchemaError::new(file, e.line().max(1), format!("schema is not JSON: {e}")))?;
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .with_retriever(DirRetriever {
            dir: dir.to_path_buf(),
        })
        .build(&schema)
        .map_err(|e| SchemaError::new(file, 1, format!("schema does not compile: {e}")))
}

/// Serves `$ref`s from the schema directory and nowhere else.
struct DirRetriever {
    dir: PathBuf,
}

impl jsonschema::Retrieve for DirRetriever {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let s = uri.as_str();
        let rel = s
            .strip_prefix(ID_BASE)
            .or_else(|| {
                s.strip_prefix("file://")
                    .and_then(|p| Path::new(p).strip_prefix(&self.dir).ok()?.to_str())
            })
            .ok_or_else(|| {
                format!("reference {s} is outside the schema directory and is not fetched")
            })?;
        let rel = rel.split('#').next().unwrap_or(rel);
        if rel.split('/').any(|part| part == "..") {
            return Err(format!("reference {s} leaves the schema directory").into());
        }
        let path = self.dir.join(rel);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "referenced schema file {} is missing or unreadable: {e}",
                path.display()
            )
        })?;
        Ok(
            serde_json::from_str(&text)
                .map_err(|e| format!("{}: not JSON: {e}", path.display()))?,
        )
    }
}

/// The pipeline stage around a [`SchemaSet`].
pub struct SchemaTransform {
    name: String,
    set: SchemaSet,
    on_missing: SchemaPolicy,
    on_invalid: SchemaPolicy,
    /// Whether the last event had no schema, whatever the policy did.
    missed_last: bool,
}

impl SchemaTransform {
    /// Compiles every schema in `dir`.
    ///
    /// # Errors
    ///
    /// As [`SchemaSet::load`].
    pub fn new(cfg: &SchemaTransformConfig, dir: &Path) -> Result<Self, SchemaError> {
        Ok(SchemaTransform {
            name: cfg.name.clone(),
            set: SchemaSet::load(dir)?,
            on_missing: cfg.on_missing,
            on_invalid: cfg.on_invalid,
            missed_last: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the event last applied had no schema for its type and
    /// version (counted in `weir_schema_missing_total`).
    pub fn missed_last(&self) -> bool {
        self.missed_last
    }

    /// The compiled schemas.
    pub fn schemas(&self) -> &SchemaSet {
        &self.set
    }

    /// Checks one event and applies the configured policy.
    pub fn apply(&mut self, event: &mut Event) -> Verdict {
        let body = Value::Object(std::mem::take(&mut event.body));
        let check = self.set.check(&body);
        self.missed_last = check == Check::Missing;
        if let Value::Object(map) = body {
            event.body = map;
        }
        let (policy, reason) = match check {
            Check::Valid => return Verdict::Keep,
            Check::Missing => (
                self.on_missing,
                format!("no schema for event_type `{}`", event.event_type()),
            ),
            Check::Invalid(reason) => (self.on_invalid, reason),
        };
        match policy {
            SchemaPolicy::Store => Verdict::Keep,
            SchemaPolicy::Drop => Verdict::Drop,
            SchemaPolicy::DeadLetter => Verdict::Reject(Rejection::new(
                ReasonClass::Schema,
                self.name.clone(),
                reason,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_without_a_schema_is_missed_and_stored() {
        let cfg = SchemaTransformConfig {
            name: "schema".into(),
            dir: "schemas".into(),
            on_missing: SchemaPolicy::Store,
            on_invalid: SchemaPolicy::DeadLetter,
        };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        let mut stage = SchemaTransform::new(&cfg, &dir).expect("shipped schemas load");
        let order = |version: &str, total: &str| {
            crate::event::test_event(&format!(
                r#"{{"event_type":"order.created","service":"order-service","version":"{version}",
                    "timestamp":"2026-11-29T10:00:00Z","payload":{{"total":{total}}}}}"#
            ))
        };
        assert_eq!(stage.apply(&mut order("9.9", "\"x\"")), Verdict::Keep);
        assert!(stage.missed_last(), "no schema for order.created 9.9");
        let mut unknown =
            crate::event::test_event(r#"{"event_type":"made.up","service":"s","payload":{}}"#);
        assert_eq!(stage.apply(&mut unknown), Verdict::Keep);
        assert!(stage.missed_last(), "no schema for made.up");
        assert!(matches!(
            stage.apply(&mut order("1.0", "\"x\"")),
            Verdict::Reject(_)
        ));
        assert!(!stage.missed_last(), "order.created 1.0 has a schema");
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(Version::parse("1.10") > Version::parse("1.9"));
        assert_eq!(Version::parse("x"), None);
    }
}
