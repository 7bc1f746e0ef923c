#!/usr/bin/env bash
# Times nanogpt's CPU recipe beside the same recipe in PyTorch (scripts/pytorch_reference.py),
# alternately, on this machine: the ratio is what counts on a shared or noisy machine.
#   scripts/vs-pytorch.sh [ITERS] [PAIRS]      (defaults 300 iterations, 3 pairs)
# Installs torch and numpy from PyPI into .venv-torch the first time (about 4.5 GB with the
# CUDA libraries PyPI's torch wheel pulls in; the runs use the CPU). Set NANOGPT_INPUT to a
# local tiny Shakespeare to prepare the data without a download.
set -euo pipefail
cd "$(dirname "$0")/.."
iters=${1:-300}
pairs=${2:-3}
if [ ! -x .venv-torch/bin/python ]; then
    python3 -m venv .venv-torch
    .venv-torch/bin/pip install --quiet torch numpy
fi
cargo build --release -q -p nanogpt
if [ ! -f data/shakespeare_char/train.bin ]; then
    ./target/release/nanogpt prepare ${NANOGPT_INPUT:+--input "$NANOGPT_INPUT"}
fi
for pair in $(seq "$pairs"); do
    ours=$(./target/release/nanogpt train --config configs/shakespeare_char_cpu.toml \
        --max-iters "$iters" --eval-interval 100000 --out-dir target/vs-pytorch --overwrite 2>&1 |
        sed -n 's/.*median \([0-9.]*\) ms\/iter.*/\1/p')
    theirs=$(.venv-torch/bin/python scripts/pytorch_reference.py --max-iters "$iters" |
        sed -n 's/^median \([0-9.]*\) ms\/iter.*/\1/p')
    echo "pair $pair: nanogpt $ours ms/iter, PyTorch $theirs ms/iter, ratio $(python3 -c "print(f'{$ours / $theirs:.2f}')")"
done
