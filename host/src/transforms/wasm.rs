//! WebAssembly plugins: a transform stage whose logic is a component that
//! implements `weir:plugin@1.0.0` (`plugins/wit/plugin.wit`).
//!
//! One [`Engine`] serves every plugin of a pipeline. Each stage compiles its
//! component once in [`WasmTransform::new`], checks that it implements this
//! weir's version of the contract, creates one instance in its own `Store`
//! and calls the plugin's `init` with the stage's `config` table as JSON.
//! The instance then serves every event, one call at a time.
//!
//! Plugins are untrusted. Each call gets the stage's fuel budget, and the
//! instance's linear memory is capped by a [`ResourceLimiter`]; a call that
//! traps, runs out of fuel or memory, or answers with something that is not
//! a JSON object fails only its event, with a reason that names the cause.
//! A trapped instance cannot be entered again, so the stage throws it away
//! and starts a fresh one (running `init` again) for the next event.
//!
//! WASI is linked only so that a guest's standard library can start: no
//! files, network, environment or arguments; stdin is closed, stdout is
//! discarded and the last bytes of stderr are kept to explain a trap (a
//! Rust panic message lands there). The clocks and random numbers are the
//! host's. Waiting on a timer is refused, since a transform must not block.
//!
//! Calls run on wasmtime's async support, driven to completion on the
//! calling thread by a tiny executor. With nothing for a plugin to wait on,
//! a call never suspends; the point is that wasmtime-wasi's async host
//! functions, unlike its blocking ones, never start a Tokio runtime, so a
//! plugin that writes to stderr cannot panic a host that calls
//! [`WasmTransform::apply`] from inside one. Like any CPU-bound call,
//! `apply` holds its thread for the length of the call.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use anyhow::{bail, Context as _};
use serde_json::Value;
use wasmtime::component::{Component, Linker, Resource, ResourceTable};
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::{
    DynPollable, IoView, OutputStream, Pollable, StdoutStream, StreamResult, WasiCtx,
    WasiCtxBuilder, WasiView,
};
use wasmtime_wasi::I32Exit;

use crate::config::WasmTransformConfig;
use crate::event::{json_kind, Event, ReasonClass, Rejection};

use super::Verdict;

/// Bindings generated from the contract.
mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugins/wit",
        world: "transform",
        async: true,
    });
}

use bindings::exports::weir::plugin::transformer::{Event as PluginEvent, Outcome};
use bindings::{Transform as Plugin, TransformPre as PluginPre};

/// The contract this weir speaks, as a plugin author would name it.
pub const CONTRACT: &str = "weir:plugin@1.0.0";

/// The export a plugin must have: the contract's interface.
const EXPORT: &str = "weir:plugin/transformer@1.0.0";

/// The prefix every version of the contract's exports shares.
const EXPORT_FAMILY: &str = "weir:plugin/";

/// The most event text weir accepts back from one call. A plugin's answer
/// is copied out of its memory before weir sees it, so its memory cap
/// bounds that copy; this bounds what weir then parses.
const MAX_OUTPUT_BYTES: usize = 16 << 20;

/// The longest rejection reason taken from a plugin; longer ones are cut.
const MAX_REASON_BYTES: usize = 4 << 10;

/// How much of a plugin's stderr is kept to explain a trap.
const STDERR_TAIL_BYTES: usize = 2 << 10;

/// The most elements a plugin's tables may hold. Function tables of real
/// plugins hold hundreds.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The WASI interface whose timers [`link`] replaces. It must name the
/// version wasmtime-wasi defines, or the replacement would sit beside the
/// original instead of over it; `waiting_on_a_timer_is_refused` fails if an
/// upgrade of wasmtime-wasi changes that version.
const WASI_MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.3";

/// The wasmtime engine every plugin of a process shares: the component
/// model and fuel metering on.
pub type Engine = wasmtime::Engine;

/// Builds the engine every plugin shares.
///
/// # Errors
///
/// If wasmtime cannot build an engine for this host, e.g. on an
/// unsupported CPU.
pub fn engine() -> anyhow::Result<Engine> {
    let mut config = wasmtime::Config::new();
    config
        .wasm_component_model(true)
        .consume_fuel(true)
        .async_support(true);
    Engine::new(&config).context("cannot set up the WebAssembly engine")
}

/// Checks a plugin file without running it, for `weir validate`: it exists,
/// is a component, implements [`CONTRACT`] and imports nothing weir does
/// not provide.
///
/// # Errors
///
/// The first of those that fails, naming the file.
pub fn check_plugin(engine: &Engine, path: &Path) -> anyhow::Result<()> {
    prepare(engine, path).map(drop)
}

/// One plugin stage: its compiled component and its running instance.
pub struct WasmTransform {
    /// The stage name, used in every reason and log line.
    name: String,
    /// Fuel given to each call, `init` included.
    fuel: u64,
    /// The memory cap, in bytes.
    max_memory: u64,
    /// The stage's `config` table as JSON, handed to `init` at every
    /// (re)start.
    config_json: String,
    /// Compiled and linked once; instantiating from it is cheap.
    pre: PluginPre<Host>,
    /// The instance serving events. `None` after a failed call whose
    /// restart failed too; the next event tries again.
    live: Option<Live>,
    /// Restarts that failed in a row; logged at 1, 2, 4, 8... so a plugin
    /// that can no longer start does not log once per event.
    failed_restarts: u64,
}

/// A running instance and the store that owns it.
struct Live {
    store: Store<Host>,
    plugin: Plugin,
}

impl WasmTransform {
    /// Compiles the plugin at `path`, checks its contract version, starts an
    /// instance and runs its `init` with `cfg.config`.
    ///
    /// # Errors
    ///
    /// If the file is missing or not a component, implements another
    /// version of the contract (both versions are named), imports what weir
    /// does not grant, or if `init` refuses the config (with the plugin's
    /// own message) or traps.
    pub fn new(engine: &Engine, cfg: &WasmTransformConfig, path: &Path) -> anyhow::Result<Self> {
        let pre = prepare(engine, path)?;
        let config_json =
            serde_json::to_string(&toml_to_json(&toml::Value::Table(cfg.config.clone())))
                .context("cannot turn the plugin's config into JSON")?;
        let mut transform = WasmTransform {
            name: cfg.name.clone(),
            fuel: cfg.fuel,
            max_memory: cfg.max_memory,
            config_json,
            pre,
            live: None,
            failed_restarts: 0,
        };
        transform.live = Some(transform.start()?);
        tracing::debug!(
            plugin = %transform.name,
            path = %path.display(),
            fuel = transform.fuel,
            max_memory = transform.max_memory,
            "Plugin loaded."
        );
        Ok(transform)
    }

    /// The stage's name from the pipeline file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the plugin on one event. On keep, the plugin's answer replaces
    /// the body; the key never changes.
    pub fn apply(&mut self, event: &mut Event) -> Verdict {
        self.apply_text(event, &mut None)
    }

    /// [`WasmTransform::apply`] for a chain of stages that share the body's
    /// JSON text. `text`, when set, is the JSON text of `event.body` as an
    /// earlier stage wrote it, and is handed to the plugin as is. On return
    /// it holds the body's text if this stage knows it: when the plugin
    /// answered with exactly the text it was given, the body is unchanged,
    /// is not parsed again, and the next plugin gets the same text.
    pub fn apply_text(&mut self, event: &mut Event, text: &mut Option<String>) -> Verdict {
        let started = Instant::now();
        let verdict = self.call(event, text);
        tracing::trace!(
            plugin = %self.name,
            elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            verdict = match &verdict {
                Verdict::Keep => "keep",
                Verdict::Drop => "drop",
                Verdict::Reject(_) => "reject",
            },
            "Plugin call finished."
        );
        verdict
    }

    fn call(&mut self, event: &mut Event, text: &mut Option<String>) -> Verdict {
        let body = match text.take() {
            Some(body) => Ok(body),
            None => serde_json::to_string(&event.body),
        };
        let input = match body {
            Ok(body) => PluginEvent {
                body,
                key: event.key.clone(),
                event_type: event.event_type().to_string(),
                exchange: event.exchange.clone(),
                routing_key: event.routing_key.clone(),
            },
            Err(e) => {
                return self.reject(format!("cannot serialize the event for the plugin: {e}"))
            }
        };
        let mut live = match self.live.take() {
            Some(live) => live,
            None => match self.start() {
                Ok(live) => {
                    tracing::info!(plugin = %self.name, "Plugin restarted.");
                    live
                }
                Err(error) => {
                    return self.reject(format!(
                        "plugin `{}` is not running and could not be restarted: {error:#}",
                        self.name
                    ))
                }
            },
        };

        live.store.data().stderr.clear();
        let result = match live.store.set_fuel(self.fuel) {
            Ok(()) => block_on(
                live.plugin
                    .weir_plugin_transformer()
                    .call_process(&mut live.store, &input),
            ),
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => {
                self.live = Some(live);
                match outcome {
                    Outcome::Keep(out) if out == input.body => {
                        *text = Some(input.body);
                        Verdict::Keep
                    }
                    Outcome::Keep(out) => self.accept(event, &out),
                    Outcome::Drop => Verdict::Drop,
                    Outcome::Reject(reason) => self.reject(clip(reason, MAX_REASON_BYTES)),
                }
            }
            Err(error) => {
                // A failed call leaves the instance unusable: drop it.
                let stderr = live.store.data().stderr.take();
                drop(live);
                let reason = self.explain(&error, "", &stderr);
                self.restart(&reason);
                self.reject(reason)
            }
        }
    }

    /// Replaces the body with a plugin's answer, if it is a JSON object.
    fn accept(&self, event: &mut Event, text: &str) -> Verdict {
        if text.len() > MAX_OUTPUT_BYTES {
            return self.reject(format!(
                "plugin `{}` returned {} bytes, more than the {MAX_OUTPUT_BYTES} weir accepts",
                self.name,
                text.len()
            ));
        }
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(body)) => {
                event.body = body;
                Verdict::Keep
            }
            Ok(other) => self.reject(format!(
                "plugin `{}` returned output that is not a JSON object: found {}",
                self.name,
                json_kind(&other)
            )),
            Err(e) => self.reject(format!(
                "plugin `{}` returned output that is not a JSON object: {e}",
                self.name
            )),
        }
    }

    /// Why a call failed, in words an operator can act on. `during` is
    /// appended to the cause, e.g. " in init"; the end of the plugin's
    /// stderr follows, if it wrote any.
    fn explain(&self, error: &anyhow::Error, during: &str, stderr: &str) -> String {
        let name = &self.name;
        let reason = if let Some(m) = error.downcast_ref::<MemoryLimitExceeded>() {
            format!(
                "plugin `{name}` ran out of memory (limit {} bytes)",
                m.limit
            )
        } else if let Some(Trap::OutOfFuel) = error.downcast_ref::<Trap>() {
            format!("plugin `{name}` ran out of fuel (limit {})", self.fuel)
        } else if let Some(trap) = error.downcast_ref::<Trap>() {
            let trap = trap.to_string();
            let trap = trap.strip_prefix("wasm trap: ").unwrap_or(&trap);
            format!("plugin `{name}` trapped: {trap}")
        } else if let Some(exit) = error.downcast_ref::<I32Exit>() {
            format!("plugin `{name}` exited with status {}", exit.0)
        } else if error.downcast_ref::<TimerRefused>().is_some() {
            format!("plugin `{name}` {TimerRefused}")
        } else {
            format!("plugin `{name}` failed: {}", error.root_cause())
        };
        // Rust's hint about RUST_BACKTRACE says nothing about the event.
        let tail: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
            .flat_map(str::split_whitespace)
            .collect();
        if tail.is_empty() {
            format!("{reason}{during}")
        } else {
            format!("{reason}{during} (stderr: {})", tail.join(" "))
        }
    }

    /// Replaces the instance after a failed call. A failed restart leaves
    /// none; the next event tries again.
    fn restart(&mut self, why: &str) {
        self.live = None;
        match self.start() {
            Ok(live) => {
                tracing::debug!(
                    plugin = %self.name,
                    reason = %why,
                    "Plugin restarted after a failed call."
                );
                self.live = Some(live);
                self.failed_restarts = 0;
            }
            Err(error) => {
                self.failed_restarts += 1;
                if self.failed_restarts.is_power_of_two() {
                    tracing::warn!(
                        plugin = %self.name,
                        %error,
                        failed_restarts = self.failed_restarts,
                        "Plugin could not be restarted."
                    );
                }
            }
        }
    }

    /// Creates an instance in a fresh store and runs `init`.
    fn start(&self) -> anyhow::Result<Live> {
        let engine = self.pre.engine();
        let stderr = StderrTail::default();
        let mut wasi = WasiCtxBuilder::new();
        // Stdin closed, stdout discarded, no env, args or preopened
        // directories, and every socket address refused are the builder's
        // defaults; sockets are switched off on top of that.
        wasi.stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let host = Host {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: MemoryCap::new(self.max_memory),
            stderr,
            started: Instant::now(),
        };
        let mut store = Store::new(engine, host);
        store.limiter(|host| &mut host.limits);
        store.set_fuel(self.fuel)?;

        let name = &self.name;
        let plugin = block_on(self.pre.instantiate_async(&mut store))
            .map_err(|e| self.failure(&e, &store, " while starting"))?;
        let init = block_on(
            plugin
                .weir_plugin_transformer()
                .call_init(&mut store, &self.config_json),
        )
        .map_err(|e| self.failure(&e, &store, " in init"))?;
        if let Err(message) = init {
            bail!("plugin `{name}` refused its config: {message}");
        }
        Ok(Live { store, plugin })
    }

    fn failure(&self, error: &anyhow::Error, store: &Store<Host>, during: &str) -> anyhow::Error {
        anyhow::anyhow!(self.explain(error, during, &store.data().stderr.take()))
    }

    fn reject(&self, reason: String) -> Verdict {
        Verdict::Reject(Rejection::new(ReasonClass::Plugin, &self.name, reason))
    }
}

/// Reads, compiles, version-checks and links a plugin.
fn prepare(engine: &Engine, path: &Path) -> anyhow::Result<PluginPre<Host>> {
    let shown = path.display();
    let bytes = std::fs::read(path).with_context(|| {
        if path.exists() {
            format!("cannot read plugin {shown}")
        } else {
            format!(
                "cannot read plugin {shown} (the shipped plugins are built by plugins/build.sh)"
            )
        }
    })?;
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => {}
        Some([0, b'a', b's', b'm', _, _, 0, 0]) => bail!(
            "plugin {shown} is a core WebAssembly module, not a component; build it for \
             wasm32-wasip2 (see plugins/README.md)"
        ),
        _ => bail!("plugin {shown} is not a WebAssembly component"),
    }
    let component =
        Component::new(engine, &bytes).with_context(|| format!("cannot compile plugin {shown}"))?;
    check_contract(engine, &component, path)?;

    let linker = link(engine)?;
    let pre = linker
        .instantiate_pre(&component)
        .with_context(|| format!("plugin {shown} imports something weir does not provide"))?;
    PluginPre::new(pre).with_context(|| format!("plugin {shown} does not match {CONTRACT}"))
}

/// Refuses a component that does not export this weir's contract, naming
/// the version it implements instead when it implements one.
fn check_contract(engine: &Engine, component: &Component, path: &Path) -> anyhow::Result<()> {
    let ty = component.component_type();
    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    if exports.iter().any(|e| e == EXPORT) {
        return Ok(());
    }
    let shown = path.display();
    let other = exports.iter().find_map(|e| e.strip_prefix(EXPORT_FAMILY));
    match other.map(|rest| rest.split_once('@').map_or("(no version)", |(_, v)| v)) {
        Some(version) => {
            bail!("plugin {shown} implements weir:plugin@{version} but this weir needs {CONTRACT}")
        }
        None if exports.is_empty() => {
            bail!("plugin {shown} does not implement {CONTRACT}: it exports nothing")
        }
        None => bail!(
            "plugin {shown} does not implement {CONTRACT}: it exports {}",
            exports.join(", ")
        ),
    }
}

/// The imports a plugin may use: WASI as its standard library needs it,
/// with timers replaced by ones that refuse to wait.
fn link(engine: &Engine) -> anyhow::Result<Linker<Host>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;

    // Waiting would hold the pipeline's thread and cost no fuel. The clock
    // is redefined whole, since shadowing replaces the entire interface.
    linker.allow_shadowing(true);
    let mut clock = linker.instance(WASI_MONOTONIC_CLOCK)?;
    clock.func_wrap("now", |store, ()| {
        let host: &Host = store.data();
        Ok((u64::try_from(host.started.elapsed().as_nanos()).unwrap_or(u64::MAX),))
    })?;
    clock.func_wrap("resolution", |_, ()| Ok((1u64,)))?;
    clock.func_wrap(
        "subscribe-instant",
        |_, (_,): (u64,)| -> anyhow::Result<(Resource<DynPollable>,)> { Err(TimerRefused.into()) },
    )?;
    clock.func_wrap(
        "subscribe-duration",
        |_, (_,): (u64,)| -> anyhow::Result<(Resource<DynPollable>,)> { Err(TimerRefused.into()) },
    )?;
    linker.allow_shadowing(false);
    Ok(linker)
}

/// What a plugin's store holds.
struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MemoryCap,
    /// Shared with the WASI context, which writes to it.
    stderr: StderrTail,
    /// Zero of the plugin's monotonic clock.
    started: Instant,
}

impl IoView for Host {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> &mut WasiCtx {
        &mut self.wasi
    }
}

/// A plugin asked for more memory than its stage allows.
#[derive(Debug, thiserror::Error)]
#[error("plugin asked for {desired} bytes of memory, more than its limit of {limit}")]
struct MemoryLimitExceeded {
    limit: u64,
    desired: u64,
}

/// A plugin tried to wait on a timer.
#[derive(Debug, thiserror::Error)]
#[error("tried to wait on a timer, which a transform may not do")]
struct TimerRefused;

/// Caps the total linear memory of one instance. Growing past the cap traps
/// with [`MemoryLimitExceeded`] rather than failing the allocation, so the
/// reason names the cause instead of a guest's allocation-failure abort.
struct MemoryCap {
    limit: u64,
    /// Bytes granted so far, over all of the instance's memories.
    granted: u64,
}

impl MemoryCap {
    fn new(limit: u64) -> Self {
        MemoryCap { limit, granted: 0 }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        let delta = desired.saturating_sub(current) as u64;
        let total = self.granted.saturating_add(delta);
        if total > self.limit {
            return Err(MemoryLimitExceeded {
                limit: self.limit,
                desired: total,
            }
            .into());
        }
        self.granted = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The last [`STDERR_TAIL_BYTES`] a plugin wrote to stderr. Writing never
/// fails or blocks, so a chatty plugin is never stopped by it.
#[derive(Clone, Default)]
struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

impl StderrTail {
    fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The kept bytes as text, emptying the buffer.
    fn take(&self) -> String {
        let bytes: Vec<u8> = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl StdoutStream for StderrTail {
    fn stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn isatty(&self) -> bool {
        false
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for StderrTail {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        let mut buf = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let keep = &bytes[bytes.len().saturating_sub(STDERR_TAIL_BYTES)..];
        let overflow = (buf.len() + keep.len()).saturating_sub(STDERR_TAIL_BYTES);
        let n = overflow.min(buf.len());
        buf.drain(..n);
        buf.extend(keep);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(usize::MAX)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

/// Runs a future to completion on this thread, parking while it waits.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => return output,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// A TOML value as JSON. Dates become their RFC 3339 text; a float JSON
/// cannot hold (NaN, infinity) becomes null.
fn toml_to_json(value: &toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
        }
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(
            table
                .iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;

    /// A plugin built by `plugins/build.sh`. Missing files fail the test:
    /// CI builds the plugins first, so a skip would hide a broken build.
    fn plugin(name: &str) -> anyhow::Result<PathBuf> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../plugins/target/wasm32-wasip2/release")
            .join(format!("{name}.wasm"));
        anyhow::ensure!(
            path.exists(),
            "{} is missing; run plugins/build.sh to build the test plugins",
            path.display()
        );
        Ok(path)
    }

    fn config(name: &str, plugin_config: Value) -> anyhow::Result<WasmTransformConfig> {
        let toml::Value::Table(table) = toml::Value::try_from(plugin_config)? else {
            bail!("plugin config must be a table");
        };
        Ok(WasmTransformConfig {
            name: name.into(),
            path: PathBuf::from(format!("{name}.wasm")),
            fuel: 50_000_000,
            max_memory: 32 << 20,
            config: table,
        })
    }

    fn load(name: &str, plugin_config: Value) -> anyhow::Result<WasmTransform> {
        WasmTransform::new(&engine()?, &config(name, plugin_config)?, &plugin(name)?)
    }

    fn event(body: Value) -> Event {
        let Value::Object(body) = body else {
            panic!("test event must be an object");
        };
        Event {
            key: "key-1".into(),
            body,
            exchange: "auth_events".into(),
            routing_key: "user.login_failed".into(),
        }
    }

    fn normal() -> Event {
        event(json!({
            "event_type": "user.logged_in",
            "service": "auth-service",
            "timestamp": "2020-01-01T00:00:00Z",
            "payload": { "n": 1 },
            "metadata": {},
        }))
    }

    fn with_payload(payload: Value) -> Event {
        let mut e = normal();
        e.body.insert("payload".into(), payload);
        e
    }

    fn rejection(verdict: Verdict) -> anyhow::Result<Rejection> {
        match verdict {
            Verdict::Reject(r) => Ok(r),
            other => bail!("expected a rejection, got {other:?}"),
        }
    }

    /// The event after `verdict` must be kept, and the same transform must
    /// keep the next normal event unchanged.
    fn serves_next(t: &mut WasmTransform) -> anyhow::Result<()> {
        let mut e = normal();
        let before = e.body.clone();
        assert_eq!(t.apply(&mut e), Verdict::Keep);
        assert_eq!(e.body, before);
        Ok(())
    }

    #[test]
    fn enrich_keeps_the_event_changed_redacted_and_with_severity() -> anyhow::Result<()> {
        let mut t = load(
            "enrich",
            json!({
                "redact": ["email"],
                "redact_key": "test-key",
                "severity": { "user.login_failed": "high" },
            }),
        )?;
        let mut e = event(json!({
            "event_type": "user.login_failed",
            "service": "auth-service",
            "payload": { "email": "ann@example.com", "reason": "bad_password",
                         "note": "locked out, mailed ann.other@example.org" },
            "metadata": {
                "user_id": "0b6f4e2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b",
                "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
            },
        }));
        assert_eq!(t.apply(&mut e), Verdict::Keep);

        let text = serde_json::to_string(&e.body)?;
        assert!(!text.contains('@'), "{text}");
        assert_eq!(e.key, "key-1");
        let meta = &e.body["metadata"];
        assert_eq!(meta["severity"], "high");
        assert_eq!(meta["actor"], "0b6f4e2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(
            meta["user_agent_info"],
            json!({ "browser": "Firefox", "os": "Linux", "bot": false })
        );
        let email = e.body["payload"]["email"].as_str().unwrap_or_default();
        assert!(email.starts_with("hmac-sha256:"), "{email}");

        let mut other = normal();
        assert_eq!(t.apply(&mut other), Verdict::Keep);
        assert_eq!(other.body["metadata"]["severity"], "low");
        Ok(())
    }

    #[test]
    fn plugin_init_error_refuses_start_with_its_message() -> anyhow::Result<()> {
        let err = load("enrich", json!({ "redact": ["email"] }))
            .err()
            .map(|e| format!("{e:#}"));
        let err = err.unwrap_or_default();
        assert!(
            err.contains("plugin `enrich` refused its config: redact_key is required"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn looper_runs_out_of_fuel_and_the_next_event_is_served() -> anyhow::Result<()> {
        let mut t = load("looper", json!({}))?;
        let r = rejection(t.apply(&mut with_payload(json!({ "loop": true }))))?;
        assert_eq!(r.class, ReasonClass::Plugin);
        assert_eq!(r.stage, "looper");
        assert_eq!(r.reason, "plugin `looper` ran out of fuel (limit 50000000)");
        serves_next(&mut t)
    }

    #[test]
    fn trapper_traps_with_its_panic_message_and_the_next_event_is_served() -> anyhow::Result<()> {
        let mut t = load("trapper", json!({}))?;
        let r = rejection(t.apply(&mut with_payload(json!({ "trap": true }))))?;
        assert!(
            r.reason.starts_with("plugin `trapper` trapped: "),
            "{}",
            r.reason
        );
        assert!(
            r.reason.contains("trap requested by the event"),
            "{}",
            r.reason
        );
        assert!(!r.reason.contains("RUST_BACKTRACE"), "{}", r.reason);
        serves_next(&mut t)?;
        // A second trap on the restarted instance is handled the same way.
        rejection(t.apply(&mut with_payload(json!({ "trap": true }))))?;
        serves_next(&mut t)
    }

    /// The pipeline calls `apply` from inside a Tokio task. A panic message
    /// written to stderr there must not make wasmtime-wasi start a runtime
    /// within the runtime.
    #[tokio::test]
    async fn trap_with_stderr_inside_a_tokio_task_does_not_panic_the_host() -> anyhow::Result<()> {
        let mut t = load("trapper", json!({}))?;
        let r = rejection(t.apply(&mut with_payload(json!({ "trap": true }))))?;
        assert!(
            r.reason.contains("trap requested by the event"),
            "{}",
            r.reason
        );
        serves_next(&mut t)
    }

    #[test]
    fn waiting_on_a_timer_is_refused() -> anyhow::Result<()> {
        let mut t = load("trapper", json!({}))?;
        let r = rejection(t.apply(&mut with_payload(json!({ "sleep": true }))))?;
        assert_eq!(
            r.reason,
            "plugin `trapper` tried to wait on a timer, which a transform may not do"
        );
        serves_next(&mut t)
    }

    #[test]
    fn hog_hits_the_memory_cap_and_the_next_event_is_served() -> anyhow::Result<()> {
        let mut cfg = config("hog", json!({}))?;
        cfg.max_memory = 8 << 20;
        let mut t = WasmTransform::new(&engine()?, &cfg, &plugin("hog")?)?;
        let r = rejection(t.apply(&mut with_payload(json!({ "hog": true }))))?;
        assert_eq!(
            r.reason,
            "plugin `hog` ran out of memory (limit 8388608 bytes)"
        );
        serves_next(&mut t)
    }

    #[test]
    fn garbage_output_is_rejected_and_the_next_event_is_served() -> anyhow::Result<()> {
        let mut t = load("garbage", json!({}))?;
        let r = rejection(t.apply(&mut with_payload(json!({ "garbage": true }))))?;
        assert!(
            r.reason
                .starts_with("plugin `garbage` returned output that is not a JSON object: "),
            "{}",
            r.reason
        );
        serves_next(&mut t)?;
        let r = rejection(t.apply(&mut with_payload(json!({ "garbage": "array" }))))?;
        assert_eq!(
            r.reason,
            "plugin `garbage` returned output that is not a JSON object: found an array"
        );
        serves_next(&mut t)
    }

    #[test]
    fn plugin_built_for_another_contract_version_is_refused_by_name() -> anyhow::Result<()> {
        let path = plugin("oldabi")?;
        let err = WasmTransform::new(&engine()?, &config("oldabi", json!({}))?, &path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            err,
            format!(
                "plugin {} implements weir:plugin@0.9.0 but this weir needs weir:plugin@1.0.0",
                path.display()
            )
        );
        assert!(check_plugin(&engine()?, &path).is_err());
        Ok(())
    }

    #[test]
    fn unchanged_answer_keeps_the_text_for_the_next_plugin() -> anyhow::Result<()> {
        let mut validate = load("validate", json!({ "max_future_skew": "5m" }))?;
        let mut filter = load("filter", json!({ "drop_types": ["other.type"] }))?;
        let mut e = normal();
        let before = e.body.clone();
        let mut text = None;
        assert_eq!(validate.apply_text(&mut e, &mut text), Verdict::Keep);
        assert_eq!(text, Some(serde_json::to_string(&before)?));
        assert_eq!(filter.apply_text(&mut e, &mut text), Verdict::Keep);
        assert!(text.is_some());
        assert_eq!(e.body, before);

        // A plugin that changes the event leaves no text behind.
        let mut enrich = load("enrich", json!({ "redact_key": "k" }))?;
        assert_eq!(enrich.apply_text(&mut e, &mut text), Verdict::Keep);
        assert_eq!(text, None);
        assert_eq!(e.body["metadata"]["severity"], "low");
        Ok(())
    }

    #[test]
    fn filter_drops_listed_types() -> anyhow::Result<()> {
        let mut t = load("filter", json!({ "drop_types": ["user.logged_in"] }))?;
        assert_eq!(t.apply(&mut normal()), Verdict::Drop);
        let mut other = normal();
        other
            .body
            .insert("event_type".into(), json!("user.registered"));
        assert_eq!(t.apply(&mut other), Verdict::Keep);
        Ok(())
    }

    #[test]
    fn validate_rejects_future_timestamps_and_bad_ids_and_passes_old_events() -> anyhow::Result<()>
    {
        let mut t = load("validate", json!({ "max_future_skew": "5m" }))?;
        // A normal event is from 2020: old events pass.
        serves_next(&mut t)?;

        let mut future = normal();
        future
            .body
            .insert("timestamp".into(), json!("2999-01-01T00:00:00Z"));
        let r = rejection(t.apply(&mut future))?;
        assert!(
            r.reason.starts_with("timestamp 2999-01-01T00:00:00Z is "),
            "{}",
            r.reason
        );
        assert!(
            r.reason.ends_with(" years in the future (allowed skew 5m)"),
            "{}",
            r.reason
        );

        let mut bad_id = normal();
        bad_id
            .body
            .insert("metadata".into(), json!({ "user_id": "1234" }));
        let r = rejection(t.apply(&mut bad_id))?;
        assert_eq!(
            r.reason,
            "metadata.user_id `1234` is not a uuid (expected 8-4-4-4-12 hex digits)"
        );
        Ok(())
    }

    #[test]
    fn check_plugin_accepts_a_good_plugin_and_explains_bad_files() -> anyhow::Result<()> {
        let engine = engine()?;
        check_plugin(&engine, &plugin("enrich")?)?;

        let dir = tempfile::tempdir()?;
        let missing = dir.path().join("missing.wasm");
        let err = format!(
            "{:#}",
            check_plugin(&engine, &missing)
                .err()
                .unwrap_or_else(|| anyhow::anyhow!(""))
        );
        assert!(
            err.starts_with(&format!("cannot read plugin {}", missing.display())),
            "{err}"
        );

        let core = dir.path().join("core.wasm");
        std::fs::write(&core, b"\0asm\x01\0\0\0")?;
        let err = check_plugin(&engine, &core)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("is a core WebAssembly module, not a component"),
            "{err}"
        );

        let text = dir.path().join("text.wasm");
        std::fs::write(&text, b"hello")?;
        let err = check_plugin(&engine, &text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.ends_with("is not a WebAssembly component"), "{err}");
        Ok(())
    }

    #[test]
    fn toml_config_becomes_json() -> anyhow::Result<()> {
        let table: toml::Table =
            toml::from_str("a = 1\nb = [\"x\"]\nc = { d = true }\ne = 1979-05-27")?;
        assert_eq!(
            toml_to_json(&toml::Value::Table(table)),
            json!({ "a": 1, "b": ["x"], "c": { "d": true }, "e": "1979-05-27" })
        );
        Ok(())
    }

    #[test]
    fn stderr_tail_keeps_the_last_bytes() -> anyhow::Result<()> {
        let mut tail = StderrTail::default();
        for _ in 0..3 {
            tail.write(bytes::Bytes::from(vec![b'a'; STDERR_TAIL_BYTES]))?;
        }
        tail.write(bytes::Bytes::from_static(b"end"))?;
        let text = tail.take();
        assert_eq!(text.len(), STDERR_TAIL_BYTES);
        assert!(text.ends_with("aend"));
        assert!(tail.take().is_empty());
        Ok(())
    }

    #[test]
    fn transform_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<WasmTransform>();
    }
}
