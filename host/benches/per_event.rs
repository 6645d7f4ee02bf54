//! What one event costs in each CPU-bound step of the audit pipeline, in
//! isolation: decoding and keying, the schema check, each shipped plugin,
//! and building the row. Criterion's time per iteration is the time per
//! event; the events cycle through `samples/domain-events.ndjson`.
//!
//! `audit_transforms` runs the whole chain of pipelines/audit.toml
//! (validate, schema, enrich) as the pipeline does.
//! `host_json_round_trip` is what a wasm stage costs the host besides the
//! call: the body written as JSON text for the plugin and the answer parsed
//! back.
//!
//! Run with `cargo bench -p weir --bench per_event` after
//! `plugins/build.sh`; `WEIR_BENCH_PLUGINS` names another directory of
//! `.wasm` files to compare builds. `bench/run.sh` measures the pipeline as
//! a whole.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use serde_json::Value;
use weir::config::{IdempotencyConfig, Pipeline, TransformConfig, WasmTransformConfig};
use weir::event::{Event, Message};
use weir::sinks::postgres::Row;
use weir::transforms::schema::SchemaSet;
use weir::transforms::wasm::{engine, WasmTransform};
use weir::transforms::{Chain, Verdict};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn messages() -> Vec<Message> {
    let text = std::fs::read_to_string(root().join("samples/domain-events.ndjson"))
        .expect("samples/domain-events.ndjson is readable");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Message {
            body: l.as_bytes().to_vec(),
            exchange: "auth_events".into(),
            routing_key: "user.logged_in".into(),
            ..Message::default()
        })
        .collect()
}

fn events(msgs: &[Message]) -> Vec<Event> {
    let key = IdempotencyConfig::default().key;
    msgs.iter()
        .map(|m| Event::decode(m, &key).expect("sample events decode"))
        .collect()
}

/// Hands out the items of `items` in turn.
fn cycle<'a, T>(items: &'a [T]) -> impl FnMut() -> &'a T {
    let i = Cell::new(0);
    move || {
        let n = i.get();
        i.set((n + 1) % items.len());
        &items[n]
    }
}

/// The wasm stages of pipelines/audit.toml, by name, and a filter stage
/// that keeps everything.
fn wasm_configs() -> Vec<(WasmTransformConfig, PathBuf)> {
    let pipeline = Pipeline::load(&root().join("pipelines/audit.toml")).expect("audit.toml loads");
    let mut out: Vec<_> = pipeline
        .config
        .transforms
        .iter()
        .filter_map(|t| match t {
            TransformConfig::Wasm(c) => Some((c.clone(), pipeline.resolve(&c.path))),
            TransformConfig::Schema(_) => None,
        })
        .collect();
    let (validate, path) = out.first().cloned().expect("audit.toml has a wasm stage");
    let mut filter = validate;
    filter.name = "filter".into();
    filter.config = toml::from_str("drop_types = [\"no.such_type\"]").expect("toml");
    out.push((filter, path.with_file_name("filter.wasm")));
    if let Some(dir) = std::env::var_os("WEIR_BENCH_PLUGINS") {
        for (cfg, path) in &mut out {
            *path = Path::new(&dir).join(format!("{}.wasm", cfg.name));
        }
    }
    out
}

fn per_event(c: &mut Criterion) {
    let msgs = messages();
    let decoded = events(&msgs);
    let key = IdempotencyConfig::default().key;

    let mut next = cycle(&msgs);
    c.bench_function("decode_and_key", |b| {
        b.iter(|| Event::decode(next(), &key).expect("decodes"))
    });

    let schemas = SchemaSet::load(&root().join("schemas")).expect("schemas load");
    let bodies: Vec<Value> = decoded
        .iter()
        .map(|e| Value::Object(e.body.clone()))
        .collect();
    let mut next = cycle(&bodies);
    c.bench_function("schema_check", |b| b.iter(|| schemas.check(next())));

    let mut next = cycle(&decoded);
    c.bench_function("host_json_round_trip", |b| {
        b.iter(|| {
            let text = serde_json::to_string(&next().body).expect("serializes");
            serde_json::from_str::<Value>(&text).expect("parses")
        })
    });

    let engine = engine().expect("wasm engine");
    for (cfg, path) in wasm_configs() {
        let mut stage = WasmTransform::new(&engine, &cfg, &path).unwrap_or_else(|e| {
            panic!(
                "{} does not load ({e:#}); run plugins/build.sh",
                path.display()
            )
        });
        let mut next = cycle(&decoded);
        c.bench_function(&format!("plugin_{}", cfg.name), |b| {
            b.iter_batched_ref(
                || next().clone(),
                |e| assert_ne!(stage.apply(e), Verdict::Drop),
                BatchSize::SmallInput,
            )
        });
    }

    let pipeline = Pipeline::load(&root().join("pipelines/audit.toml")).expect("audit.toml loads");
    let mut chain = Chain::build(&pipeline).expect("the audit transforms build");
    let pairs: Vec<(&Message, &Event)> = msgs.iter().zip(&decoded).collect();
    let mut next = cycle(&pairs);
    c.bench_function("audit_transforms", |b| {
        b.iter_batched_ref(
            || {
                let (m, e) = next();
                (m.body.as_slice(), (*e).clone())
            },
            |(body, e)| {
                let verdict = chain.apply_observed(e, Some(body), |_, _, _| {});
                assert_eq!(verdict, Verdict::Keep);
            },
            BatchSize::SmallInput,
        )
    });

    let mut next = cycle(&decoded);
    c.bench_function("row_from_event", |b| {
        b.iter(|| Row::from_event(next()).occurred_at)
    });
}

criterion_group!(benches, per_event);
criterion_main!(benches);
