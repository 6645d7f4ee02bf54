//! weir: a stream processor that lands domain events, checked and enriched,
//! in a database an auditor can query.
//!
//! A pipeline file (TOML) chains one source, any number of transforms and one
//! sink. The binary in `main.rs` only parses arguments and hands off to
//! [`cli`]; everything else lives here so tests and benchmarks can drive it.
//!
//! Layout:
//!
//! - [`config`]: the pipeline file, its defaults and its checks.
//! - [`event`]: what flows between stages, and the idempotency key.
//! - [`sources`], [`transforms`], [`sinks`]: one module per stage kind. A
//!   stage never imports another stage.
//! - [`pipeline`]: the only module that knows the order of the stages, and
//!   the delivery rules (ack after commit, dead-letter with a reason).
//! - [`metrics`]: what an operator can scrape.
//! - [`http`]: the listener serving `/metrics`, `/health` and `/ready`.

pub mod cli;
pub mod config;
pub mod event;
pub mod fixtures;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod retry;
pub mod sample;
pub mod sinks;
pub mod sources;
pub mod transforms;
pub mod validate;
