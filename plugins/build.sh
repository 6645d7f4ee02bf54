#!/usr/bin/env bash
# Builds every plugin in this workspace as a WebAssembly component:
#   target/wasm32-wasip2/release/<name>.wasm
# Safe to run again: cargo rebuilds only what changed. CI runs it before the
# host's tests, which load the test plugins from there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

target=wasm32-wasip2
if ! rustup target list --installed | grep -qx "$target"; then
    echo "build.sh: adding the $target target with rustup" >&2
    rustup target add "$target"
fi

# The pipelines load plugins from plugins/target, so build there whatever
# CARGO_TARGET_DIR says.
export CARGO_TARGET_DIR="$PWD/target"
cargo build --release --target "$target" --locked "$@"

for wasm in target/"$target"/release/*.wasm; do
    echo "built $wasm ($(wc -c < "$wasm") bytes)"
done
