//! `weir validate`: offline checks for CI.
//!
//! For each pipeline file: the file itself (keys, types, values), every
//! schema directory a schema transform names (each file must be JSON and
//! compile, with every `$ref` it makes), every plugin a wasm transform
//! names (a component implementing this weir's contract version) and the
//! migrations of its sink. Nothing connects to a broker or a database. Each
//! problem is one line, `file:line: message`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::ReportFormat;
use crate::config::{ConfigError, Pipeline, SinkConfig, TransformConfig};
use crate::transforms::schema::SchemaSet;
use crate::transforms::wasm;

/// One problem found, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl Problem {
    fn new(file: &Path, line: usize, message: impl Into<String>) -> Problem {
        Problem {
            file: file.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

/// Checks the given pipelines (or every `.toml` in `pipelines/`), prints one
/// line per problem on standard output and returns a failing exit code if
/// there was any.
pub async fn run(paths: &[PathBuf], format: ReportFormat) -> ExitCode {
    let paths = if paths.is_empty() {
        default_pipelines(Path::new("pipelines"))
    } else {
        paths.to_vec()
    };
    if paths.is_empty() {
        eprintln!("no pipeline files given and none found in pipelines/");
        return ExitCode::FAILURE;
    }
    let mut problems = BTreeSet::new();
    for path in &paths {
        problems.extend(check_pipeline(path).await);
    }
    for p in &problems {
        println!("{}", render(p, format));
    }
    if problems.is_empty() {
        eprintln!("{} pipeline file(s) valid", paths.len());
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s) found", problems.len());
        ExitCode::FAILURE
    }
}

/// A problem as a line of the chosen format.
pub fn render(p: &Problem, format: ReportFormat) -> String {
    match format {
        ReportFormat::Text => format!("{}:{}: {}", p.file.display(), p.line, p.message),
        ReportFormat::Github => format!(
            "::error file={},line={}::{}",
            escape_property(&p.file.display().to_string()),
            p.line,
            escape_data(&p.message)
        ),
    }
}

/// Workflow-command escaping of a message.
fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Workflow-command escaping of a property value.
fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

fn default_pipelines(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

/// Every problem of one pipeline file and what it refers to.
pub async fn check_pipeline(path: &Path) -> Vec<Problem> {
    let pipeline = match Pipeline::load(path) {
        Ok(p) => p,
        Err(ConfigError::Invalid {
            path,
            line,
            message,
        }) => return vec![Problem::new(&path, line, message)],
        Err(e) => {
            return vec![Problem::new(
                path,
                1,
                format!("{:#}", anyhow::Error::from(e)),
            )]
        }
    };
    let mut problems = Vec::new();
    let mut engine = None;
    for (i, t) in pipeline.config.transforms.iter().enumerate() {
        let line = pipeline.line_of("transforms", i, None);
        match t {
            TransformConfig::Schema(c) => {
                let dir = pipeline.resolve(&c.dir);
                let (_, errors) = SchemaSet::load_all(&dir);
                problems.extend(
                    errors
                        .into_iter()
                        .map(|e| Problem::new(&e.file, e.line, e.message)),
                );
            }
            TransformConfig::Wasm(c) => {
                if engine.is_none() {
                    engine = Some(wasm::engine());
                }
                let checked = match engine.as_ref() {
                    // Starting the plugin runs its `init` with the stage's
                    // config, so settings it refuses are found here too.
                    Some(Ok(engine)) => wasm::check_plugin(engine, &pipeline.resolve(&c.path))
                        .and_then(|()| {
                            wasm::WasmTransform::new(engine, c, &pipeline.resolve(&c.path))
                        })
                        .map(drop),
                    Some(Err(e)) => Err(anyhow::anyhow!("cannot start the wasm engine: {e:#}")),
                    None => unreachable!("engine was just set"),
                };
                if let Err(e) = checked {
                    problems.push(Problem::new(
                        path,
                        pipeline.line_of("transforms", i, Some("path")).max(line),
                        format!("transform `{}`: {e:#}", c.name),
                    ));
                }
            }
        }
    }
    problems.extend(check_migrations(&pipeline).await);
    problems
}

/// Compares the sink's migrations on disk, when the repository is at hand,
/// with the ones built into this binary: a migration edited after release
/// would be refused by the database's checksum on the next start.
async fn check_migrations(pipeline: &Pipeline) -> Vec<Problem> {
    let (kind, embedded) = match &pipeline.config.sink {
        SinkConfig::Postgres(p) if p.migrate => ("postgres", crate::sinks::postgres::migrator()),
        SinkConfig::Sqlite(_) => ("sqlite", crate::sinks::sqlite::migrator()),
        _ => return Vec::new(),
    };
    let candidates = [
        pipeline.base_dir.join("../migrations").join(kind),
        PathBuf::from("migrations").join(kind),
    ];
    let Some(dir) = candidates.iter().find(|d| d.is_dir()) else {
        return Vec::new();
    };
    let on_disk = match sqlx::migrate::Migrator::new(dir.as_path()).await {
        Ok(m) => m,
        Err(e) => return vec![Problem::new(dir, 1, format!("cannot read migrations: {e}"))],
    };
    let mut problems = Vec::new();
    for m in embedded.iter() {
        match on_disk.iter().find(|d| d.version == m.version) {
            None => problems.push(Problem::new(
                dir,
                1,
                format!(
                    "migration {} ({}) is missing from this directory",
                    m.version, m.description
                ),
            )),
            Some(d) if d.checksum != m.checksum => problems.push(Problem::new(
                dir,
                1,
                format!(
                    "migration {} ({}) differs from the one this weir was built with; a released \
                     migration must never change: add a new migration instead",
                    m.version, m.description
                ),
            )),
            Some(_) => {}
        }
    }
    for d in on_disk.iter() {
        if !embedded.iter().any(|m| m.version == d.version) {
            problems.push(Problem::new(
                dir,
                1,
                format!(
                    "migration {} ({}) is not built into this weir; rebuild it",
                    d.version, d.description
                ),
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_format_escapes_newlines_and_names_file_and_line() {
        let p = Problem::new(Path::new("pipelines/a.toml"), 7, "bad\nthing 100%");
        assert_eq!(
            render(&p, ReportFormat::Github),
            "::error file=pipelines/a.toml,line=7::bad%0Athing 100%25"
        );
        assert_eq!(
            render(&p, ReportFormat::Text),
            "pipelines/a.toml:7: bad\nthing 100%"
        );
    }
}
