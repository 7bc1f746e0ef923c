#!/usr/bin/env bash
# CI's short real run of nanogpt: prepare tiny Shakespeare from the local copy, train 40
# iterations of the CPU recipe, check that the val loss fell from ~4.2, and sample from the
# checkpoint. Takes about a minute after the build.
#   NANOGPT_INPUT=path/to/input.txt scripts/ci-nanogpt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
input="${NANOGPT_INPUT:-$(cd .. && pwd)/shared/data/tinyshakespeare/input.txt}"
if [[ ! -f "$input" ]]; then
    echo "ci-nanogpt: no tiny Shakespeare at $input; set NANOGPT_INPUT" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cargo build --release -p nanogpt
bin="${CARGO_TARGET_DIR:-target}/release/nanogpt"

"$bin" prepare --input "$input" --data-dir "$work/data"
"$bin" train --device cpu --config configs/shakespeare_char_cpu.toml \
    --data-dir "$work/data" --out-dir "$work/out" \
    --max-iters 40 --eval-interval 20 --log-interval 10 | tee "$work/train.log"
for f in ckpt.safetensors loss.csv loss.png; do
    test -s "$work/out/$f" || { echo "ci-nanogpt: $f was not written" >&2; exit 1; }
done
val=$(sed -n 's/^step 40: train loss [0-9.]*, val loss \([0-9.]*\)$/\1/p' "$work/train.log")
awk -v v="$val" 'BEGIN { exit !(v != "" && v < 3.4) }' \
    || { echo "ci-nanogpt: val loss at step 40 is '$val', expected < 3.4" >&2; exit 1; }
"$bin" sample --device cpu --out-dir "$work/out" --num-samples 1 --max-new-tokens 200 --start "ROMEO:"
echo "ci-nanogpt: ok (val loss $val at step 40)"
