//! Test plugin: allocates without end on an event whose payload has
//! `"hog": true`, so weir's tests can show the memory cap stops it. Keeps
//! every other event unchanged.

use weir_plugin_sdk::{export_plugin, value_at, Map, Meta, Outcome, Plugin, Value};

struct Hog;

impl Plugin for Hog {
    fn new(_config: Value) -> Result<Self, String> {
        Ok(Hog)
    }

    fn process(&mut self, event: &mut Map<String, Value>, _meta: &Meta<'_>) -> Outcome {
        if value_at(event, "payload.hog") == Some(&Value::Bool(true)) {
            loop {
                // Reserve a mebibyte and never give it back. The memory is
                // not written, so the cap is reached in little fuel.
                let chunk: Vec<u8> = Vec::with_capacity(1 << 20);
                std::mem::forget(std::hint::black_box(chunk));
            }
        }
        Outcome::Keep
    }
}

export_plugin!(Hog);
