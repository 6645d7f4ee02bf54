//! The `weir` binary: parse arguments, set up logging, hand off to the CLI.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = weir::cli::Cli::parse();
    weir::cli::init_tracing(cli.log_format);
    match weir::cli::dispatch(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
