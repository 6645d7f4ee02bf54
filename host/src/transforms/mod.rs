//! Transforms: stages that look at each event between source and sink and
//! keep it (possibly changed), drop it, or reject it with a reason.
//!
//! - [`schema`]: JSON Schema per `event_type` and version.
//! - [`wasm`]: WebAssembly plugins under wasmtime's component model.
//!
//! A transform never talks to a broker or a database; the pipeline decides
//! what a verdict means for delivery (ack, dead-letter).

pub mod schema;
pub mod wasm;

use crate::config::{Pipeline, TransformConfig};
use crate::event::{check_envelope, Event, ReasonClass, Rejection};

/// What a transform decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass the (possibly changed) event on.
    Keep,
    /// Acknowledge the event and store nothing.
    Drop,
    /// Dead-letter the event with this reason.
    Reject(Rejection),
}

/// A transform could not be built at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransformError {
    #[error("{}:{line}: transform `{name}`", path.display())]
    Stage {
        path: std::path::PathBuf,
        line: usize,
        name: String,
        #[source]
        source: anyhow::Error,
    },
}

/// One built stage.
pub enum Transform {
    Schema(schema::SchemaTransform),
    Wasm(wasm::WasmTransform),
}

impl Transform {
    /// The stage's name from the pipeline file.
    pub fn name(&self) -> &str {
        match self {
            Transform::Schema(s) => s.name(),
            Transform::Wasm(w) => w.name(),
        }
    }

    /// Runs the stage on one event.
    ///
    /// A plugin's event must still have the envelope every later stage
    /// relies on (`event_type`, `service`, `payload`); one that lost it is
    /// the plugin's fault and fails that event.
    pub fn apply(&mut self, event: &mut Event) -> Verdict {
        self.apply_text(event, &mut None)
    }

    /// [`Transform::apply`] with the body's JSON text carried from stage to
    /// stage (see [`wasm::WasmTransform::apply_text`]), so that a plugin
    /// that keeps an event unchanged costs no parse, and the plugin after
    /// it no serialization. A schema check leaves the body, and its text,
    /// as they are.
    pub fn apply_text(&mut self, event: &mut Event, text: &mut Option<String>) -> Verdict {
        match self {
            Transform::Schema(s) => s.apply(event),
            Transform::Wasm(w) => match w.apply_text(event, text) {
                Verdict::Keep => match check_envelope(&event.body) {
                    Ok(()) => Verdict::Keep,
                    Err(why) => Verdict::Reject(Rejection::new(
                        ReasonClass::Plugin,
                        w.name(),
                        format!(
                            "plugin `{}` returned an event without a valid envelope: {}",
                            w.name(),
                            why.reason
                        ),
                    )),
                },
                other => other,
            },
        }
    }
}

/// The pipeline's transforms, in order.
#[derive(Default)]
pub struct Chain {
    stages: Vec<Transform>,
}

impl Chain {
    /// Builds every transform of a pipeline: compiles schemas and plugins
    /// once, so that a broken one stops start-up.
    ///
    /// # Errors
    ///
    /// The first stage that cannot be built, with its line in the file.
    pub fn build(pipeline: &Pipeline) -> Result<Chain, TransformError> {
        let engine = std::cell::OnceCell::new();
        let mut stages = Vec::with_capacity(pipeline.config.transforms.len());
        for (i, cfg) in pipeline.config.transforms.iter().enumerate() {
            let built = match cfg {
                TransformConfig::Schema(c) => {
                    schema::SchemaTransform::new(c, &pipeline.resolve(&c.dir))
                        .map(Transform::Schema)
                        .map_err(anyhow::Error::from)
                }
                TransformConfig::Wasm(c) => {
                    let engine = match engine.get() {
                        Some(e) => Ok(e),
                        None => wasm::engine().map(|e| engine.get_or_init(|| e)),
                    };
                    engine
                        .and_then(|e| wasm::WasmTransform::new(e, c, &pipeline.resolve(&c.path)))
                        .map(Transform::Wasm)
                }
            };
            stages.push(built.map_err(|source| TransformError::Stage {
                path: pipeline.path.clone(),
                line: pipeline.line_of("transforms", i, None),
                name: cfg.name().to_string(),
                source,
            })?);
        }
        Ok(Chain { stages })
    }

    /// Runs the event through every stage until one does not keep it.
    pub fn apply(&mut self, event: &mut Event) -> Verdict {
        self.apply_observed(event, None, |_, _, _| {})
    }

    /// Like [`Chain::apply`], and tells `observe` how long each stage took
    /// and what it decided, for per-stage metrics. `received` is the body
    /// as it came, when `event.body` is still exactly its parse: plugins
    /// are then handed that text instead of a new serialization.
    pub fn apply_observed(
        &mut self,
        event: &mut Event,
        received: Option<&[u8]>,
        mut observe: impl FnMut(&Transform, std::time::Duration, &Verdict),
    ) -> Verdict {
        // The body's JSON text, while a stage knows it.
        let mut text = received
            .filter(|_| self.has_wasm())
            .and_then(|body| std::str::from_utf8(body).ok())
            .map(str::to_owned);
        for stage in &mut self.stages {
            let started = std::time::Instant::now();
            let verdict = stage.apply_text(event, &mut text);
            observe(stage, started.elapsed(), &verdict);
            if verdict != Verdict::Keep {
                return verdict;
            }
        }
        Verdict::Keep
    }

    /// The event types some schema stage has a schema for.
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.stages
            .iter()
            .filter_map(|s| match s {
                Transform::Schema(t) => Some(t.schemas().event_types()),
                Transform::Wasm(_) => None,
            })
            .flatten()
    }

    /// Whether some stage is a plugin.
    fn has_wasm(&self) -> bool {
        self.stages.iter().any(|s| matches!(s, Transform::Wasm(_)))
    }

    /// The stages, in order.
    pub fn stages(&self) -> &[Transform] {
        &self.stages
    }
}
