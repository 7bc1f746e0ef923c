#!/usr/bin/env bash
# The project's test command (README): every crate's unit, integration and doc tests, optimised
# (the numeric tests and Candle are slow unoptimised).
# NANOGPT_INPUT points the nanogpt tests at a local tiny Shakespeare; by default the copy beside
# the checkout in ../shared, when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
default_input="$(cd .. && pwd)/shared/data/tinyshakespeare/input.txt"
if [[ -z "${NANOGPT_INPUT:-}" && -f "$default_input" ]]; then
    export NANOGPT_INPUT="$default_input"
fi
# `--no-default-features` is for candle-flash-attn (compat/), whose default `cuda` feature needs
# nvcc; no other member has default features. (Testing it in a cargo call of its own would
# resolve Candle's features differently and build Candle a second time.)
cargo test --release --workspace --no-default-features "$@"
# The numeric tests once more on the portable (non-AVX-512) matrix kernel (same package set and
# features as above, so nothing is rebuilt).
ATTN_OP_PORTABLE=1 cargo test --release --workspace --no-default-features \
    --test forward --test backward --test api --test flash_variants "$@"
# On a CPU with AVX512_BF16, bf16 inputs multiply bf16 pairs by default on AMD and are widened
# to f32 elsewhere (attn-op's cpu/bf16_pairs.rs says why): both ways, forced, on any such CPU.
for pairs in 1 0; do
    ATTN_OP_BF16_PRODUCTS=$pairs cargo test --release --workspace --no-default-features \
        --test forward --test backward --test flash_variants "$@"
done
# The CUDA kernels' own code run on the CPU by attn-kernels' emulator (a C++17 compiler is all it
# needs) and checked against the CPU implementation: the tests a GPU session runs, on fewer lengths.
cargo test --release -p attn-op --features cuda-emu --lib --test cuda_kernels --test cuda_deterministic --test cuda_efficient_tc "$@"
cargo test --release -p attn-op --features cuda-emu --doc emu "$@"
# nanogpt's model on those kernels: the layouts and dtypes a GPU run hands them.
cargo test --release -p nanogpt --features cuda-emu --test cuda_emu "$@"
cargo test --release -p attn-kernels --features emu "$@"
