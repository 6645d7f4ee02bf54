//! Write a weir transform plugin in a few lines of Rust.
//!
//! A plugin is a type that implements [`Plugin`], exported with
//! [`export_plugin!`] from a `cdylib` crate built for `wasm32-wasip2`:
//!
//! ```ignore
//! use weir_plugin_sdk::{export_plugin, Map, Meta, Outcome, Plugin, Value};
//!
//! struct Stamp;
//!
//! impl Plugin for Stamp {
//!     fn new(_config: Value) -> Result<Self, String> {
//!         Ok(Stamp)
//!     }
//!
//!     fn process(&mut self, event: &mut Map<String, Value>, _meta: &Meta) -> Outcome {
//!         event.insert("stamped".into(), Value::Bool(true));
//!         Outcome::Keep
//!     }
//! }
//!
//! export_plugin!(Stamp);
//! ```
//!
//! The SDK meets weir only through `wit/plugin.wit` (`weir:plugin@1.0.0`):
//! it parses the event's JSON once, hands the plugin a mutable object, and
//! serializes the object again only when the plugin keeps the event with
//! [`Outcome::Keep`]; [`Outcome::Unchanged`] hands back the text as it
//! came. The plugin's value lives in an instance-wide slot that `init` fills; weir
//! calls `process` one event at a time, so there is no locking to do.
//!
//! [`bindings`] is the raw generated interface, for a plugin that needs to
//! answer with text the SDK would not produce (weir's own tests do).

use std::cell::RefCell;
use std::thread::LocalKey;

pub use serde_json::{self, Map, Value};

/// The code generated from `wit/plugin.wit`.
///
/// Generated code needs `unsafe` to move values across the component
/// boundary; it is wit-bindgen's, checked by its own tests.
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "transform",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "weir_plugin_sdk::bindings",
    });
}

use bindings::exports::weir::plugin::transformer as wit;

/// What a plugin decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Pass the event on, with whatever changes the plugin made to it.
    Keep,
    /// Pass the event on exactly as it came in, for a plugin that only
    /// looks. Cheaper than `Keep`: the SDK answers with the text it was
    /// given instead of writing the object out again, and weir, getting
    /// back its own text, does not parse it again. Changes made to the
    /// object are discarded.
    Unchanged,
    /// Acknowledge the event and store nothing.
    Drop,
    /// Dead-letter the event with this reason: lowercase, no final period.
    Reject(String),
}

/// What weir knows about an event besides its body. Read-only: the key in
/// particular is fixed when the event is received.
#[derive(Debug, Clone, Copy)]
pub struct Meta<'a> {
    /// The idempotency key.
    pub key: &'a str,
    /// The body's `event_type`, or "" if it has none.
    pub event_type: &'a str,
    /// The exchange the event came by ("" for the default exchange).
    pub exchange: &'a str,
    /// The routing key it was published with.
    pub routing_key: &'a str,
}

/// A transform plugin.
///
/// weir creates the value once per instance with [`Plugin::new`], then calls
/// [`Plugin::process`] for every event. If a call panics, weir rejects that
/// event, throws the instance away and starts a fresh one, calling `new`
/// again; a plugin should therefore keep nothing in its state that it cannot
/// lose.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from the stage's `config` table, as JSON (an
    /// object, empty when the pipeline sets nothing).
    ///
    /// # Errors
    ///
    /// A message for the operator, e.g. "unknown config key `dorp_types`";
    /// weir refuses to start with it.
    fn new(config: Value) -> Result<Self, String>;

    /// Looks at one event and may change it in place.
    fn process(&mut self, event: &mut Map<String, Value>, meta: &Meta<'_>) -> Outcome;
}

/// Exports a [`Plugin`] type as a weir plugin. Use it once, at the root of
/// a `cdylib` crate.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        // The generated export functions are `unsafe` glue between the
        // component ABI and the safe `Guest` impl below. Only a wasm32 build
        // exports them: their names are not valid native symbols, and native
        // builds exist only to run the plugin's unit tests.
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        const _: () = {
            ::std::thread_local! {
                static WEIR_PLUGIN: ::std::cell::RefCell<::std::option::Option<$plugin>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            struct WeirPluginExport;

            impl $crate::bindings::exports::weir::plugin::transformer::Guest for WeirPluginExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$plugin>(&WEIR_PLUGIN, &config)
                }

                fn process(
                    event: $crate::bindings::exports::weir::plugin::transformer::Event,
                ) -> $crate::bindings::exports::weir::plugin::transformer::Outcome {
                    $crate::__private::process::<$plugin>(&WEIR_PLUGIN, event)
                }
            }

    $crate::bindings::export!(WeirPluginExport with_types_in $crate::bindings);
        };

        // Elsewhere, name the type anyway so that a native build of the
        // plugin (for its unit tests) does not call it unused.
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn($crate::Value) -> ::std::result::Result<$plugin, ::std::string::String> =
            <$plugin as $crate::Plugin>::new;
    };
}

/// What [`export_plugin!`] expands to. Not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    pub type Slot<P> = LocalKey<RefCell<Option<P>>>;

    pub fn init<P: Plugin>(slot: &'static Slot<P>, config: &str) -> Result<(), String> {
        let config: Value = match config {
            "" => Value::Object(Map::new()),
            text => serde_json::from_str(text).map_err(|e| format!("config is not JSON: {e}"))?,
        };
        let plugin = P::new(config)?;
        slot.with(|s| *s.borrow_mut() = Some(plugin));
        Ok(())
    }

    pub fn process<P: Plugin>(slot: &'static Slot<P>, event: wit::Event) -> wit::Outcome {
        let mut body = match serde_json::from_str::<Value>(&event.body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return wit::Outcome::Reject("event body is not a JSON object".into()),
            Err(e) => return wit::Outcome::Reject(format!("event body is not JSON: {e}")),
        };
        let meta = Meta {
            key: &event.key,
            event_type: &event.event_type,
            exchange: &event.exchange,
            routing_key: &event.routing_key,
        };

        let outcome = slot.with(|s| match s.borrow_mut().as_mut() {
            Some(plugin) => plugin.process(&mut body, &meta),
            None => Outcome::Reject("plugin was called before init".into()),
        });

        match outcome {
            Outcome::Unchanged => wit::Outcome::Keep(event.body),
            Outcome::Keep => match serde_json::to_string(&body) {
                Ok(text) => wit::Outcome::Keep(text),
                Err(e) => wit::Outcome::Reject(format!("cannot serialize the event: {e}")),
            },
            Outcome::Drop => wit::Outcome::Drop,
            Outcome::Reject(reason) => wit::Outcome::Reject(reason),
        }
    }
}

/// Reads the string at a dotted path such as `metadata.user_id`.
pub fn str_at<'a>(event: &'a Map<String, Value>, path: &str) -> Option<&'a str> {
    value_at(event, path)?.as_str()
}

/// Reads the value at a dotted path such as `payload.organization_id`.
pub fn value_at<'a>(event: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = event.get(parts.next()?)?;
    for part in parts {
        v = v.as_object()?.get(part)?;
    }
    Some(v)
}

/// The object at `name` in `event`, created (or replacing a `null`) if it
/// is missing. `None` if something else than an object or null is there.
pub fn object_mut<'a>(
    event: &'a mut Map<String, Value>,
    name: &str,
) -> Option<&'a mut Map<String, Value>> {
    let slot = event.entry(name).or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str) -> Map<String, Value> {
        match serde_json::from_str(text) {
            Ok(Value::Object(m)) => m,
            other => panic!("test event must be an object, got {other:?}"),
        }
    }

    #[test]
    fn dotted_paths_reach_nested_strings() {
        let e = event(r#"{"metadata":{"user_id":"u"},"payload":{"n":1}}"#);
        assert_eq!(str_at(&e, "metadata.user_id"), Some("u"));
        assert_eq!(str_at(&e, "payload.n"), None);
        assert_eq!(value_at(&e, "payload.n"), Some(&Value::from(1)));
        assert_eq!(value_at(&e, "payload.n.deeper"), None);
        assert_eq!(value_at(&e, "missing"), None);
    }

    #[test]
    fn object_mut_creates_or_replaces_null_only() {
        let mut e = event(r#"{"a":null,"b":1}"#);
        assert!(object_mut(&mut e, "a").is_some());
        assert!(object_mut(&mut e, "c").is_some());
        assert!(object_mut(&mut e, "b").is_none());
        assert_eq!(e["a"], Value::Object(Map::new()));
    }
}
