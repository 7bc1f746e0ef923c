#!/usr/bin/env python3
"""PyTorch SDPA timings beside attn-op's CUDA kernels, on the shapes of the CUDA issue.

    python3 scripts/bench_sdpa.py [--quick] > torch.jsonl           # time PyTorch's backends
    python3 scripts/bench_sdpa.py --table ours.jsonl torch.jsonl     # markdown table, ratios

Timing: CUDA events around each run, median of the timed runs after warm-up, per backend
(flash, efficient, math via torch.nn.attention.sdpa_kernel). FLOPs: 4·B·H·L²·D forward (half of
it causal), 3.5× that for forward + backward, as FlashAttention's papers count them.
The lines have the fields of attn-op's `cuda_attention` bench: impl, shape, dtype, causal, pass, ms, tflops.
"""
import argparse
import json
import sys


def shapes(quick):
    """(shape, dtype, causal, backends) in the order of attn-op's bench."""
    out = []
    for causal in (False, True):
        out.append(((32, 32, 1024, 32), "f16", causal))
    for d in (64, 128):
        for l in ((1024, 4096) if quick else (1024, 4096, 8192)):
            for causal in (False, True):
                out.append(((16, 8, l, d), "bf16", causal))
                if l <= 4096:
                    out.append(((16, 8, l, d), "f32", causal))
    return out


def time_torch(quick):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    iters = 5 if quick else 15

    def median_ms(fn, warmup):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        return times[len(times) // 2]

    for (b, h, l, d), dtype, causal in shapes(quick):
        q, k, v = (torch.randn(b, h, l, d, device="cuda", dtype=dt[dtype], requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        flops = 4.0 * b * h * l * l * d * (0.5 if causal else 1.0)
        for name, backend in backends.items():
            if name == "flash" and dtype == "f32":
                continue  # not supported by PyTorch's flash backend
            if name == "math" and l > 4096:
                continue  # holds B·H·L² scores
            try:
                with sdpa_kernel([backend]):
                    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    ms = median_ms(fwd, 3)
                    rec = dict(impl=f"torch-{name}", shape=[b, h, l, d], dtype=dtype, causal=causal)
                    print(json.dumps({**rec, "pass": "fwd", "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 2)}), flush=True)

                    def fwd_bwd():
                        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        y.backward(dout)

                    ms = median_ms(fwd_bwd, 2)
                    print(json.dumps({**rec, "pass": "fwd+bwd", "ms": round(ms, 4), "tflops": round(3.5 * flops / ms / 1e9, 2)}), flush=True)
            except RuntimeError as e:  # a backend that refuses the shape or runs out of memory
                print(json.dumps(dict(impl=f"torch-{name}", shape=[b, h, l, d], dtype=dtype, causal=causal, error=str(e)[:200])), flush=True)
            q.grad = k.grad = v.grad = None
        del q, k, v, dout
        torch.cuda.empty_cache()


def table(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    rows.append(json.loads(line))
    key = lambda r: (tuple(r["shape"]), r["dtype"], r["causal"], r["pass"])
    by = {}
    for r in rows:
        if "ms" in r:
            by.setdefault(key(r), {})[r["impl"]] = r
    print("| shape (B,H,L,D) | dtype | causal | pass | ours | TFLOP/s | torch flash | torch efficient | torch math | ours / torch same kind |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, impls in by.items():
        # attn-op-flash-r64, attn-op-efficient-r64: the forwards' 64-row tiles (ATTN_OP_CUDA_FWD_ROWS=64);
        # attn-op-efficient-simt: the f32 efficient kernels on CUDA cores (ATTN_OP_CUDA_EFFICIENT_SIMT)
        impls_ours = ("attn-op-flash", "attn-op-flash-r64", "attn-op-efficient", "attn-op-efficient-r64",
                      "attn-op-efficient-simt")
        for ours in impls_ours:
            if ours not in impls:
                continue
            o = impls[ours]
            kind = ours.split("-")[2]
            t = lambda n: f"{impls[n]['tflops']:.1f}" if n in impls else "-"
            same = impls.get(f"torch-{kind}")
            ratio = f"{o['tflops'] / same['tflops']:.2f}x" if same and same["tflops"] > 0 else "-"
            shape = ",".join(map(str, k[0]))
            print(f"| {shape} | {k[1]} | {k[2]} | {k[3]} | {ours[8:]} {o['ms']:.3f} ms | {o['tflops']:.1f} | {t('torch-flash')} | {t('torch-efficient')} | {t('torch-math')} | {ratio} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and runs")
    ap.add_argument("--table", nargs="+", metavar="JSONL", help="print a markdown table of these result files")
    a = ap.parse_args()
    if a.table:
        table(a.table)
    else:
        time_torch(a.quick)


if __name__ == "__main__":
    sys.exit(main())
