//! Test plugin: panics on an event whose payload has `"trap": true`, which
//! on wasm32 aborts the instance with a trap. On `"sleep": true` it sleeps,
//! which weir must refuse since a transform may not block. Keeps every
//! other event unchanged.

use weir_plugin_sdk::{export_plugin, value_at, Map, Meta, Outcome, Plugin, Value};

struct Trapper;

impl Plugin for Trapper {
    fn new(_config: Value) -> Result<Self, String> {
        Ok(Trapper)
    }

    fn process(&mut self, event: &mut Map<String, Value>, _meta: &Meta<'_>) -> Outcome {
        if value_at(event, "payload.trap") == Some(&Value::Bool(true)) {
            panic!("trap requested by the event");
        }
        if value_at(event, "payload.sleep") == Some(&Value::Bool(true)) {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        Outcome::Keep
    }
}

export_plugin!(Trapper);
