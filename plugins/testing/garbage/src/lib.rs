//! Test plugin: answers `keep` with text that is not an event, so weir's
//! tests can show the host refuses it. On an event whose payload has
//! `"garbage": true` it returns `not json`; with `"garbage": "array"` it
//! returns `[1,2]`. Every other event is kept unchanged.
//!
//! It uses the SDK's raw bindings, since the SDK itself never produces such
//! output.

use weir_plugin_sdk::bindings::exports::weir::plugin::transformer::{Event, Guest, Outcome};
use weir_plugin_sdk::{serde_json, value_at, Map, Value};

// Only the wasm32 export uses it.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct Garbage;

impl Guest for Garbage {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn process(event: Event) -> Outcome {
        let body: Map<String, Value> = match serde_json::from_str(&event.body) {
            Ok(body) => body,
            Err(e) => return Outcome::Reject(format!("event body is not a JSON object: {e}")),
        };
        match value_at(&body, "payload.garbage") {
            Some(Value::Bool(true)) => Outcome::Keep("not json".into()),
            Some(Value::String(s)) if s == "array" => Outcome::Keep("[1,2]".into()),
            _ => Outcome::Keep(event.body),
        }
    }
}

// The generated export functions are `unsafe` glue between the component
// ABI and the safe `Guest` impl above; wasm32 only, as their names are not
// valid native symbols.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
const _: () = {
    weir_plugin_sdk::bindings::export!(Garbage with_types_in weir_plugin_sdk::bindings);
};
