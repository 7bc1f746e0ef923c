#!/usr/bin/env bash
# attn-op's CPU attention beside PyTorch's CPU SDPA, shape by shape, alternately, in one run:
#   scripts/vs-pytorch-sdpa.sh [PAIRS] [FILTER]     (defaults: 3 pairs, every shape)
# For each shape: PAIRS times `nanogpt bench sdpa --backends default` (attn-op's default dispatch)
# then scripts/sdpa_torch.py (F.scaled_dot_product_attention, default dispatch), both with 2
# threads and the same blocked timer; the table gives the medians over the pairs, the ratio
# (attn-op / PyTorch: below 1 is faster) and attn-op's GFLOP/s with its share of this CPU's peak.
# FILTER (an extended regex) keeps the shapes whose label matches, e.g. 'bf16' or 'decode'.
# Installs torch and numpy from PyPI into .venv-torch the first time, as scripts/vs-pytorch.sh.
#
# FLOPs: 4·B·H·Lq·Lk·E forward (a causal mask counts only the visible query/key pairs), 3.5x that
# for forward + backward (FlashAttention's count). Peak: measured by attn-op's `fma_peak` example
# (every core running independent chains of its widest FMA at the clock it holds under that
# load); the nominal figure (cores x the MHz /proc/cpuinfo reports x f32 FLOPs per cycle: 64 with
# two 512-bit FMA units, 32 with AVX2 or on AMD Zen 4, which runs AVX-512 on 256-bit pipes) is
# printed beside it, but misses turbo clocks.
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-3}
filter=${2:-.}
min_ms=${MIN_TIME_MS:-1000}
if [ ! -x .venv-torch/bin/python ]; then
    python3 -m venv .venv-torch
    .venv-torch/bin/pip install --quiet torch numpy
fi
cargo build --release -q -p nanogpt
export RAYON_NUM_THREADS=2

# label | B H Lq Lk E | dtype | flags
shapes=(
    "tutorial|32 32 1024 1024 32|f32|"
    "tutorial|32 32 1024 1024 32|f16|"
    "tutorial|32 32 1024 1024 32|bf16|"
    "mid|4 8 1024 1024 64|f32|"
    "mid|4 8 1024 1024 64|f32|--causal"
    "long|1 8 4096 4096 64|f32|"
    "mid|4 8 1024 1024 64|bf16|"
    "mid train|4 8 1024 1024 64|f32|--causal --backward"
    "mid train|4 8 1024 1024 64|bf16|--causal --backward"
    "nanogpt train|12 4 64 64 32|f32|--causal --backward"
    "small train|8 8 256 256 64|f32|--causal --backward"
    "decode|8 32 1 4096 128|f32|"
    "decode|8 32 1 4096 128|bf16|"
)

cores=$(nproc)
mhz=$(awk -F: '/^cpu MHz/ {print $2; exit}' /proc/cpuinfo)
family=$(awk -F: '/^cpu family/ {print $2 + 0; exit}' /proc/cpuinfo)
if grep -qw avx512f /proc/cpuinfo && ! { grep -q AuthenticAMD /proc/cpuinfo && [ "$family" -eq 25 ]; }; then
    per_cycle=64
else
    # AVX2 only, or AMD Zen 4 (family 25), whose two 256-bit FMA pipes run a 512-bit FMA as one.
    per_cycle=32
fi
model=$(awk -F: '/^model name/ {print $2; exit}' /proc/cpuinfo)
peak=$(cargo run --release -q -p attn-op --example fma_peak | sed -n 's/^peak_gflops \([0-9.]*\).*/\1/p')
echo "machine:${model}, ${cores} cores at ${mhz} MHz (nominal peak ${cores} x ${mhz} MHz x ${per_cycle} = $(python3 -c "print(f'{$cores * $mhz * $per_cycle / 1000:.0f}')") GFLOP/s f32); measured peak ${peak} GFLOP/s f32 (fma_peak); $(date -u '+%Y-%m-%d %H:%M UTC'); ${pairs} pairs, min time ${min_ms} ms"
echo
echo "| shape (B, H, Lq, Lk, E) | dtype | pass | attn-op | PyTorch | attn-op / PyTorch | attn-op GFLOP/s | % of peak |"
echo "|---|---|---|---:|---:|---:|---:|---:|"
for entry in "${shapes[@]}"; do
    IFS='|' read -r label dims dtype flags <<<"$entry"
    if ! grep -Eq -- "$filter" <<<"$label $dtype $flags"; then continue; fi
    read -r b h lq lk e <<<"$dims"
    args=(--batch "$b" --heads "$h" --seq "$lq" --kv-seq "$lk" --head-dim "$e" --dtype "$dtype" --min-time-ms "$min_ms")
    # shellcheck disable=SC2206
    args+=($flags)
    ours=()
    theirs=()
    for _ in $(seq "$pairs"); do
        ours+=("$(./target/release/nanogpt bench sdpa --device cpu --backends default "${args[@]}" 2>/dev/null |
            sed -n 's/^| default ([a-z]*) | \([0-9.]*\) |.*/\1/p')")
        theirs+=("$(.venv-torch/bin/python scripts/sdpa_torch.py "${args[@]}" | sed -n 's/^median_us //p')")
    done
    python3 - "$label" "$dims" "$dtype" "$flags" "$peak" "${ours[*]}" "${theirs[*]}" <<'EOF'
import statistics, sys
label, dims, dtype, flags, peak, ours, theirs = sys.argv[1:]
b, h, lq, lk, e = map(int, dims.split())
causal, backward = "--causal" in flags, "--backward" in flags
pairs = sum(min(i + 1, lk) for i in range(lq)) if causal else lq * lk
flops = 4 * b * h * pairs * e * (3.5 if backward else 1.0)
ours = statistics.median(float(x) for x in ours.split())
theirs = statistics.median(float(x) for x in theirs.split())
gflops = flops / ours / 1e3
peak = float(peak)
fmt = lambda us: f"{us / 1e6:.3f} s" if us >= 1e6 else (f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.0f} us")
name = f"({b}, {h}, {lq}, {lk}, {e}){' causal' if causal else ''} {label}"
pas = "forward+backward" if backward else "forward"
print(f"| {name} | {dtype} | {pas} | {fmt(ours)} | {fmt(theirs)} | {ours / theirs:.2f}x | {gflops:.0f} | {100 * gflops / peak:.0f}% |")
EOF
done
