//! End-to-end tests: the `weir` binary against the real RabbitMQ and
//! PostgreSQL. Each test has its own database and its own queue and
//! exchange names, so they run in parallel and twice in a row.

mod audit;
mod local;
mod ops;
mod plugins;
mod proxy;
mod reliability;
mod schemas;
mod support;
