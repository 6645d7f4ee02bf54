#!/usr/bin/env bash
# The whole test suite, as CI runs it: services up, plugins built, then
# every unit and end-to-end test of the workspace against the real
# RabbitMQ and PostgreSQL on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
plugins/build.sh
cargo test --workspace --locked "$@"
