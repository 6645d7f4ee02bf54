//! Test plugin: loops forever on an event whose payload has `"loop": true`,
//! so weir's tests can show that fuel stops it and that the next event is
//! served. Keeps every other event unchanged.

use weir_plugin_sdk::{export_plugin, value_at, Map, Meta, Outcome, Plugin, Value};

struct Looper;

impl Plugin for Looper {
    fn new(_config: Value) -> Result<Self, String> {
        Ok(Looper)
    }

    fn process(&mut self, event: &mut Map<String, Value>, _meta: &Meta<'_>) -> Outcome {
        if value_at(event, "payload.loop") == Some(&Value::Bool(true)) {
            let mut n: u64 = 0;
            loop {
                // `black_box` keeps the loop from being folded away.
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Outcome::Keep
    }
}

export_plugin!(Looper);
