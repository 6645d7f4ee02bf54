//! Drops events by type: an event whose `event_type` is listed in
//! `drop_types` is acknowledged and not stored. Every other event passes
//! unchanged ([`Outcome::Unchanged`]).
//!
//! ```toml
//! [[transforms]]
//! type = "wasm"
//! name = "filter"
//! path = "../plugins/target/wasm32-wasip2/release/filter.wasm"
//! config = { drop_types = ["user.logged_out"] }
//! ```
//!
//! Dropping is not rejecting: a dropped event is not dead-lettered.

use std::collections::BTreeSet;

use serde::Deserialize;
use weir_plugin_sdk::{export_plugin, serde_json, Map, Meta, Outcome, Plugin, Value};

/// The plugin's `config` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Event types to drop, compared exactly. Default: none.
    #[serde(default)]
    drop_types: BTreeSet<String>,
}

/// The built plugin.
pub struct Filter {
    drop_types: BTreeSet<String>,
}

impl Plugin for Filter {
    fn new(config: Value) -> Result<Self, String> {
        let config: Config =
            serde_json::from_value(config).map_err(|e| format!("invalid filter config: {e}"))?;
        Ok(Filter {
            drop_types: config.drop_types,
        })
    }

    fn process(&mut self, _event: &mut Map<String, Value>, meta: &Meta<'_>) -> Outcome {
        if self.drop_types.contains(meta.event_type) {
            Outcome::Drop
        } else {
            Outcome::Unchanged
        }
    }
}

export_plugin!(Filter);

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(event_type: &str) -> Meta<'_> {
        Meta {
            key: "k",
            event_type,
            exchange: "",
            routing_key: "",
        }
    }

    #[test]
    fn drops_listed_types_and_keeps_others() -> Result<(), String> {
        let mut f = Filter::new(serde_json::json!({ "drop_types": ["a.b"] }))?;
        let mut e = Map::new();
        assert_eq!(f.process(&mut e, &meta("a.b")), Outcome::Drop);
        assert_eq!(f.process(&mut e, &meta("a.c")), Outcome::Unchanged);
        Ok(())
    }

    #[test]
    fn refuses_unknown_config_keys() {
        let err = Filter::new(serde_json::json!({ "dorp_types": [] }))
            .err()
            .unwrap_or_default();
        assert!(err.contains("dorp_types"), "{err}");
    }
}
