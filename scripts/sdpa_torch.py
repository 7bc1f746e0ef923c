#!/usr/bin/env python3
"""Times PyTorch's CPU `F.scaled_dot_product_attention` (default dispatch) on one shape.

    python3 scripts/sdpa_torch.py --batch 32 --heads 32 --seq 1024 --head-dim 32 \
        [--kv-seq N] [--dtype f32|f16|bf16] [--causal] [--backward] [--min-time-ms 1000]

Prints `median_us <value>`. Timing as attn-op's `bench::time` (so both sides are measured alike):
one warm-up run, then blocks of runs, each block at least a tenth of the minimum time, until the
minimum time has passed and three blocks ran; the median of the blocks' per-run means. With
`--backward` each run also backpropagates `sum(output)`, as `nanogpt bench sdpa --backward`.
Used by scripts/vs-pytorch-sdpa.sh, which alternates it with `nanogpt bench sdpa`.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--kv-seq", type=int)
    ap.add_argument("--head-dim", type=int, required=True)
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--min-time-ms", type=float, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    lk = a.kv_seq or a.seq

    def rand(l):
        return torch.randn(a.batch, a.heads, l, a.head_dim).to(dt).requires_grad_(a.backward)

    q, k, v = rand(a.seq), rand(lk), rand(lk)

    def run():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)
        if a.backward:
            y.sum().backward()
            q.grad = k.grad = v.grad = None

    min_time = a.min_time_ms / 1000
    t0 = time.perf_counter()
    run()
    first = max(time.perf_counter() - t0, 1e-9)
    per_block = max(1, math.ceil(min_time / 10 / first))
    means = []
    begin = time.perf_counter()
    while len(means) < 3 or time.perf_counter() - begin < min_time:
        t = time.perf_counter()
        for _ in range(per_block):
            run()
        means.append((time.perf_counter() - t) / per_block)
    means.sort()
    print(f"median_us {means[len(means) // 2] * 1e6:.1f}")


if __name__ == "__main__":
    main()
