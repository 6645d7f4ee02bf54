//! Test plugin: a pass-through built against `weir:plugin@0.9.0`, an older
//! copy of the contract kept in this crate's `wit/`. weir must refuse to
//! load it and name both versions.

#[allow(unsafe_code, clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        world: "transform",
        path: "wit",
    });
}

use bindings::exports::weir::plugin::transformer::{Event, Guest, Outcome};

// Only the wasm32 export uses it.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct OldAbi;

impl Guest for OldAbi {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn process(event: Event) -> Outcome {
        Outcome::Keep(event.body)
    }
}

// The generated export functions are `unsafe` glue between the component
// ABI and the safe `Guest` impl above; wasm32 only, as their names are not
// valid native symbols.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
const _: () = {
    bindings::export!(OldAbi with_types_in bindings);
};
