"""nanoGPT's tiny Shakespeare recipes in plain PyTorch, to time and score beside ours.

The same model, initialisation, AdamW groups, schedule, clipping, batches and evaluation as
`nanogpt train` with configs/shakespeare_char_cpu.toml (`--recipe cpu`, the default: nanoGPT's
`model.py` and `train.py` as that recipe runs them on a CPU: float32, no compile, SDPA with
is_causal) or configs/shakespeare_char.toml (`--recipe gpu`: 6 layers of 384, context 256, batch
64, dropout 0.2, 5000 iterations; on CUDA in bf16 autocast as nanoGPT runs it, `--compile` for
torch.compile). It reads the train.bin/val.bin that `nanogpt prepare` writes. Written for this
project from the recipes; scripts/vs-pytorch.sh and scripts/gpu-check.sh run it beside ours.

    python scripts/pytorch_reference.py --data-dir data/shakespeare_char --max-iters 300
    python scripts/pytorch_reference.py --recipe gpu --device cuda --max-iters 500 --eval-iters 20
"""
import argparse
import contextlib
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--data-dir", default="data/shakespeare_char")
p.add_argument("--recipe", choices=("cpu", "gpu"), default="cpu")
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--compile", action="store_true", help="torch.compile the model")
p.add_argument("--seed", type=int, default=1337)
p.add_argument("--max-iters", type=int, default=0, help="0: the recipe's")
p.add_argument("--eval-iters", type=int, default=0, help="0: the recipe's")
p.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
DEVICE = torch.device(args.device)

VOCAB = 65
if args.recipe == "cpu":
    N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH, DROPOUT = 4, 4, 128, 64, 12, 0.0
    LR, MIN_LR, WARMUP, DECAY_ITERS, MAX_ITERS = 1e-3, 1e-4, 100, 2000, 2000
    EVAL_INTERVAL, EVAL_ITERS = 250, 20
else:
    N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH, DROPOUT = 6, 6, 384, 256, 64, 0.2
    LR, MIN_LR, WARMUP, DECAY_ITERS, MAX_ITERS = 1e-3, 1e-4, 100, 5000, 5000
    EVAL_INTERVAL, EVAL_ITERS = 250, 200
MAX_ITERS = args.max_iters or MAX_ITERS
EVAL_ITERS = args.eval_iters or EVAL_ITERS
# nanoGPT's train.py: bf16 autocast on CUDA, float32 elsewhere.
autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if DEVICE.type == "cuda"
            else contextlib.nullcontext())

train_data = np.fromfile(f"{args.data_dir}/train.bin", dtype=np.uint16)
val_data = np.fromfile(f"{args.data_dir}/val.bin", dtype=np.uint16)


class LayerNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.resid_dropout = nn.Dropout(DROPOUT)

    def forward(self, x):
        b, t, c = x.shape
        heads = [z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2)
                 for z in self.c_attn(x).split(N_EMBD, dim=2)]
        y = F.scaled_dot_product_attention(
            *heads, dropout_p=DROPOUT if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(N_EMBD), Attention()
        self.ln_2, self.mlp = LayerNorm(N_EMBD), Mlp()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, N_EMBD)
        self.wpe = nn.Embedding(BLOCK, N_EMBD)
        self.drop = nn.Dropout(DROPOUT)
        self.h = nn.ModuleList([Block() for _ in range(N_LAYER)])
        self.ln_f = LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for name, w in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(w, 0.0, 0.02 / math.sqrt(2 * N_LAYER))

    def forward(self, idx, targets):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def get_batch(data):
    ix = torch.randint(len(data) - BLOCK, (BATCH,))
    x = torch.stack([torch.from_numpy(data[i:i + BLOCK].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + BLOCK].astype(np.int64)) for i in ix])
    return x.to(DEVICE), y.to(DEVICE)


def learning_rate(it):
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > DECAY_ITERS:
        return MIN_LR
    ratio = (it - WARMUP) / (DECAY_ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


model = Gpt().to(DEVICE)
params = list(model.parameters())
opt = torch.optim.AdamW(
    [{"params": [w for w in params if w.dim() >= 2], "weight_decay": 0.1},
     {"params": [w for w in params if w.dim() < 2], "weight_decay": 0.0}],
    lr=LR, betas=(0.9, 0.99))
step = torch.compile(model) if args.compile else model


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def estimate_loss():
    model.eval()
    with autocast:
        out = [sum(step(*get_batch(d)).item() for _ in range(EVAL_ITERS)) / EVAL_ITERS
               for d in (train_data, val_data)]
    model.train()
    return out


print(f"torch {torch.__version__}, {args.recipe} recipe on {DEVICE}, {torch.get_num_threads()} threads, "
      f"seed {args.seed}{', compiled' if args.compile else ''}")
x, y = get_batch(train_data)
step_ms = []
for it in range(MAX_ITERS + 1):
    for group in opt.param_groups:
        group["lr"] = learning_rate(it)
    if it % EVAL_INTERVAL == 0 or it == MAX_ITERS:
        train_loss, val_loss = estimate_loss()
        print(f"step {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}", flush=True)
    if it == MAX_ITERS:
        break
    t0 = time.perf_counter()
    with autocast:
        loss = step(x, y)
    x, y = get_batch(train_data)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    step_ms.append((time.perf_counter() - t0) * 1e3)
step_ms.sort()
print(f"median {step_ms[len(step_ms) // 2]:.1f} ms/iter over {len(step_ms)} iterations")
