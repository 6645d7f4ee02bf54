//! `weir validate`: offline checks of pipeline files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::ReportFormat;
use crate::config::{ConfigError, Pipeline};

/// One problem found, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

/// Checks the given pipelines (or every `.toml` in `pipelines/`), prints one
/// line per problem and returns a failing exit code if there was any.
pub fn run(paths: &[PathBuf], format: ReportFormat) -> ExitCode {
    let paths = if paths.is_empty() {
        default_pipelines(Path::new("pipelines"))
    } else {
        paths.to_vec()
    };
    let mut problems = Vec::new();
    for path in &paths {
        problems.extend(check_pipeline(path));
    }
    for p in &problems {
        match format {
            ReportFormat::Text => println!("{}:{}: {}", p.file.display(), p.line, p.message),
            ReportFormat::Github => println!(
                "::error file={},line={}::{}",
                p.file.display(),
                p.line,
                p.message
                    .replace('%', "%25")
                    .replace('\r', "%0D")
                    .replace('\n', "%0A")
            ),
        }
    }
    if problems.is_empty() {
        eprintln!("{} pipeline(s) valid", paths.len());
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s) found", problems.len());
        ExitCode::FAILURE
    }
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

/// Every problem of one pipeline file.
pub fn check_pipeline(path: &Path) -> Vec<Problem> {
    match Pipeline::load(path) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid {
            path,
            line,
            message,
        }) => vec![Problem {
            file: path,
            line,
            message,
        }],
        Err(e) => vec![Problem {
            file: path.to_path_buf(),
            line: 1,
            message: format!("{:#}", anyhow::Error::from(e)),
        }],
    }
}
