#!/usr/bin/env bash
# CI for the CUDA side, on a machine without a GPU:
#   1. scripts/setup-cuda.sh (CUDA 13.0 nvcc from PyPI, stub libcuda),
#   2. the attn-kernels crate with its `cuda` feature (every kernel compiled to PTX),
#   3. the whole workspace with `--features cuda --all-targets` type-checked (launch code, CUDA
#      tests, benches; `cargo check`: building every test binary for CUDA took 18 of CI's ~55
#      minutes, and step 4 builds and links attn-op's CUDA code into a binary anyway),
#   4. candle-transformers 0.11.1 with its `flash-attn` feature against compat/candle-flash-attn
#      (scripts/ci-flash-attn-swap.sh: README's `[patch.crates-io]` swap, built and run on the CPU),
#   5. ptxas -v for sm_75, sm_80 and sm_90 on every kernel: fails if a main configuration spills
#      registers (flash forward/backward, efficient forward/backward; the deterministic dQ pass
#      and helpers are reported only).
# Prints the time of each step. CUDA builds go to $CARGO_TARGET_DIR (default target/cuda), so they
# never mix with the CPU build's artifacts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$SECONDS
step() { echo "ci-cuda: [$((SECONDS - T0)) s] $*"; }

step "setup-cuda"
scripts/setup-cuda.sh >/dev/null
# shellcheck disable=SC1091
source .cuda/env.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"

step "attn-kernels --features cuda (kernels to PTX)"
cargo build --release -p attn-kernels --features cuda

step "workspace --features cuda --all-targets (cargo check)"
cargo check --release --workspace --features cuda --all-targets

step "candle-transformers --features flash-attn with candle-flash-attn patched to compat/"
scripts/ci-flash-attn-swap.sh

step "ptxas -v sm_75 / sm_80 / sm_90"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# Configurations that must not spill: the kernels a user's training step runs.
MAIN='^(flash_fwd_|flash_bwd_|eff_fwd_f32_|eff_tc_fwd_|eff_bwd_)'
# sm_75 (T4): the efficient kernels must build there too (flash compiles to a stub the dispatcher
# never launches below sm80). One nvcc + ptxas job per (architecture, file), as many at once as
# there are cores; results are read in a fixed order afterwards.
ptxas_job() {
    local arch="$1" cu="$2" name
    name="$(basename "$cu" .cu)"
    local out="$WORK/$name.sm$arch"
    if nvcc --ptx -arch="sm_$arch" -std=c++17 -O3 --expt-relaxed-constexpr -Ikernels/src "$cu" -o "$out.ptx" \
        && ptxas -v -arch="sm_$arch" "$out.ptx" -o "$out.cubin" 2>"$out.log"; then
        echo 0 >"$out.rc"
    else
        echo 1 >"$out.rc"
    fi
    rm -f "$out.ptx" "$out.cubin"
}
jobs_max="$(nproc 2>/dev/null || echo 2)"
for arch in 75 80 90; do
    for cu in kernels/src/*.cu; do
        while (($(jobs -rp | wc -l) >= jobs_max)); do wait -n || true; done
        ptxas_job "$arch" "$cu" &
    done
done
wait
fail=0
for arch in 75 80 90; do
    for cu in kernels/src/*.cu; do
        name="$(basename "$cu" .cu)"
        if [[ "$(cat "$WORK/$name.sm$arch.rc")" != 0 ]]; then
            echo "ci-cuda: FAIL: nvcc or ptxas failed on $cu for sm_$arch"
            cat "$WORK/$name.sm$arch.log" 2>/dev/null || true
            fail=1
            continue
        fi
        # One line per kernel: name, registers, spill bytes.
        awk -v arch="$arch" '
            /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); k = substr($0, RSTART + 1, RLENGTH - 2) }
            /spill stores/ { s = $5 + $9 }
            /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15); printf "sm_%s %-24s %4s registers %4d bytes spilled\n", arch, k, r, s }
        ' "$WORK/$name.sm$arch.log" | sort >"$WORK/$name.sm$arch.txt"
        cat "$WORK/$name.sm$arch.txt"
        while read -r _ kernel _ _ spill _; do
            if [[ "$spill" != 0 ]]; then
                if [[ "$kernel" =~ $MAIN ]]; then
                    echo "ci-cuda: FAIL: $kernel spills $spill bytes on sm_$arch"
                    fail=1
                else
                    echo "ci-cuda: note: $kernel spills $spill bytes on sm_$arch (not a main configuration)"
                fi
            fi
        done <"$WORK/$name.sm$arch.txt"
    done
done
step "done"
exit $fail
