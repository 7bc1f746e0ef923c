#!/usr/bin/env bash
# README's `[patch.crates-io]` swap, checked as a Candle project would use it: builds
# candle-transformers 0.11.1 with its `flash-attn` feature with candle-flash-attn patched to
# compat/candle-flash-attn (the project in scripts/flash-attn-swap), fails unless cargo took that
# crate rather than the crates.io one, and runs candle-transformers' llama with `use_flash_attn`
# against llama's own attention on the CPU. Needs scripts/setup-cuda.sh's toolkit (the
# `flash-attn` feature builds Candle for CUDA), no GPU. Builds into $CARGO_TARGET_DIR (default
# target/cuda, as scripts/ci-cuda.sh, whose build-script outputs such as Candle's CUDA kernels it
# can then reuse).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$SECONDS
step() { echo "flash-attn-swap: [$((SECONDS - T0)) s] $*"; }

scripts/setup-cuda.sh >/dev/null
# shellcheck disable=SC1091
source .cuda/env.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"
PROJ="$ROOT/scripts/flash-attn-swap"
# Start from the workspace's lock, so the crates both use resolve to the versions already built.
cp Cargo.lock "$PROJ/Cargo.lock"

step "cargo tree: which candle-flash-attn candle-transformers gets"
used="$(cargo tree --manifest-path "$PROJ/Cargo.toml" -e normal -i candle-flash-attn --depth 0)"
echo "$used"
if [[ "$used" != "candle-flash-attn v0.11.1 ($ROOT/compat/candle-flash-attn)" ]]; then
    echo "flash-attn-swap: FAIL: candle-transformers does not use compat/candle-flash-attn"
    exit 1
fi

step "build candle-transformers --features flash-attn, run llama through it on the CPU"
cargo run --release --manifest-path "$PROJ/Cargo.toml"
step "done"
