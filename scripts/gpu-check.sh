#!/usr/bin/env bash
# One-call verification of attn-op's CUDA kernels on a GPU machine (which has no Rust).
#
# Here (a machine with Rust, no GPU):
#   scripts/gpu-check.sh bundle      # builds the CUDA test and bench executables and nanogpt with
#                                    # --features cuda, strips them into .cuda/bundle (ignored by
#                                    # git) with tiny Shakespeare prepared (NANOGPT_INPUT or ../shared)
# On the GPU machine (the device tool: carry [".cuda/bundle"], timeout_s 540):
#   scripts/gpu-check.sh [--quick]   # tests vs the CPU, compute-sanitizer, timings vs PyTorch SDPA,
#                                    # nanogpt's GPU recipe beside PyTorch's (100 iterations quick,
#                                    # 500 otherwise) and a sample
#   scripts/gpu-check.sh recipe      # the whole GPU recipe (5000 iterations): the val loss target
#
# The run writes its logs and the final table under $OUT (or ./gpu-check-out) and prints the
# table last. It needs the GPU driver's libcuda.so.1 and CUDA 13 runtime libraries (libcublas,
# libcublasLt, libcurand, libcudart), which it finds in PyTorch's environment
# (site-packages/nvidia/cu13/lib) or a system CUDA.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$ROOT/.cuda/bundle"
cd "$ROOT"

bundle() {
    set -e
    "$ROOT/scripts/setup-cuda.sh" >/dev/null
    # shellcheck disable=SC1091
    source "$ROOT/.cuda/env.sh"
    # The same target folder as scripts/ci-cuda.sh, so one cold build (Candle's kernels) serves both.
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"
    local json
    json="$(mktemp)"
    cargo test --release -p attn-op --features cuda --no-run \
        --test cuda_kernels --test cuda_deterministic --test cuda_efficient_tc --bench cuda_attention \
        --message-format=json-render-diagnostics >"$json"
    cargo build --release -p nanogpt --features cuda
    rm -rf "$BUNDLE"
    mkdir -p "$BUNDLE/ptx"
    cp "$CARGO_TARGET_DIR/release/nanogpt" "$BUNDLE/nanogpt"
    # Tiny Shakespeare prepared here (the GPU machine has no network).
    local input="${NANOGPT_INPUT:-$(cd "$ROOT/.." && pwd)/shared/data/tinyshakespeare/input.txt}"
    if [[ -f "$input" ]]; then
        "$BUNDLE/nanogpt" prepare --input "$input" --data-dir "$BUNDLE/data"
    else
        echo "warning: no tiny Shakespeare at $input (set NANOGPT_INPUT): the bundle has no data"
    fi
    python3 - "$json" "$BUNDLE" <<'EOF'
import json, shutil, sys
out = sys.argv[2]
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in (
        "cuda_kernels", "cuda_deterministic", "cuda_efficient_tc", "cuda_attention"):
        shutil.copy(m["executable"], f"{out}/{m['target']['name']}")
EOF
    rm -f "$json"
    strip "$BUNDLE"/cuda_* "$BUNDLE/nanogpt"
    # The PTX of the kernels this build embeds (for ptxas / cuobjdump on the GPU machine).
    local out
    out="$(ls -td "$CARGO_TARGET_DIR"/release/build/attn-kernels-*/out | head -n 1)"
    cp "$out"/*.ptx "$BUNDLE/ptx/"
    # Each binary carries Candle's and our PTX as text (about 78 MB stripped): xz brings the three
    # to about 21 MB, under the 64 MiB that travels to the GPU machine.
    (cd "$BUNDLE" && tar -cf ptx.tar ptx && rm -rf ptx && xz -T0 -5 cuda_kernels cuda_deterministic cuda_efficient_tc cuda_attention nanogpt ptx.tar)
    git rev-parse HEAD >"$BUNDLE/COMMIT"
    du -sh "$BUNDLE"
    ls -l "$BUNDLE"
}

find_libs() {
    local dirs=() d
    for py in python3 /usr/bin/python3; do
        command -v "$py" >/dev/null || continue
        while read -r d; do [[ -n "$d" ]] && dirs+=("$d"); done < <("$py" - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
seen = set()
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(r, "nvidia", "*", "lib")):
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            print(d)
EOF
        )
    done
    for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/lib/x86_64-linux-gnu; do [[ -d "$d" ]] && dirs+=("$d"); done
    local path=""
    for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
        for d in "${dirs[@]}"; do
            if [[ -e "$d/$lib" ]]; then
                [[ ":$path:" == *":$d:"* ]] || path="$path:$d"
                break
            fi
        done
    done
    path="${path#:}"
    export LD_LIBRARY_PATH="$path${LD_LIBRARY_PATH:+${path:+:}$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    local found
    for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
        found=no
        ldconfig -p 2>/dev/null | grep -q "$lib" && found=yes
        for d in ${LD_LIBRARY_PATH//:/ }; do [[ -e "$d/$lib" ]] && found=yes; done
        [[ $found == yes ]] || echo "warning: $lib not found"
    done
}

find_sanitizer() {
    command -v compute-sanitizer 2>/dev/null && return
    for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
        /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        [[ -x "$c" ]] && { echo "$c"; return; }
    done
    python3 - <<'EOF' 2>/dev/null
import glob, site
for r in site.getsitepackages():
    for c in glob.glob(r + "/nvidia/**/compute-sanitizer", recursive=True):
        print(c); raise SystemExit
EOF
}

# Unpacks the bundle's binaries into $1 (python's lzma: no xz needed on the GPU machine).
unpack() {
    local bin="$1"
    [[ -f "$BUNDLE/cuda_kernels.xz" ]] || { echo "no $BUNDLE: run 'scripts/gpu-check.sh bundle' where Rust is, and carry .cuda/bundle"; exit 2; }
    mkdir -p "$bin"
    python3 - "$BUNDLE" "$bin" <<'EOF'
import lzma, os, shutil, sys, tarfile
src, dst = sys.argv[1], sys.argv[2]
for name in ("cuda_kernels", "cuda_deterministic", "cuda_efficient_tc", "cuda_attention", "nanogpt"):
    with lzma.open(f"{src}/{name}.xz") as f, open(f"{dst}/{name}", "wb") as g:
        shutil.copyfileobj(f, g)
    os.chmod(f"{dst}/{name}", 0o755)
with tarfile.open(f"{src}/ptx.tar.xz") as t:
    t.extractall(dst)
EOF
    echo "== unpacked into $bin ($(du -sh "$bin" | cut -f1))"
}

check() {
    local quick="${1:-}"
    local out="${OUT:-$ROOT/gpu-check-out}" bin=/tmp/attn-op-gpu-check
    mkdir -p "$out"
    unpack "$bin"
    echo "== bundle built from $(cat "$BUNDLE/COMMIT" 2>/dev/null), working tree at $(git rev-parse HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
    find_libs
    local status=0 start=$SECONDS
    export ATTN_OP_REQUIRE_GPU=1  # a device that fails to open is a failure here, not a skip

    echo "== 1. kernels against the CPU implementation"
    "$bin/cuda_kernels" 2>&1 | tee "$out/tests.log" || status=1
    "$bin/cuda_deterministic" 2>&1 | tee -a "$out/tests.log" || status=1
    "$bin/cuda_efficient_tc" --nocapture 2>&1 | tee -a "$out/tests.log" || status=1
    echo "   ($((SECONDS - start)) s)"

    echo "== 2. compute-sanitizer on small cases"
    local san
    san="$(find_sanitizer)"
    if [[ -n "$san" ]]; then
        for tool in memcheck racecheck; do
            "$san" --tool "$tool" --error-exitcode 99 "$bin/cuda_kernels" --test-threads 1 \
                dropout_masks_are_the_cpus fully_masked_rows_are_zero flash_attn_layouts_match_cpu \
                >"$out/sanitizer-$tool.log" 2>&1
            local rc=$?
            # The tensor-core and CUDA-core f32 efficient forwards on their small cases.
            "$san" --tool "$tool" --error-exitcode 99 "$bin/cuda_efficient_tc" \
                >>"$out/sanitizer-$tool.log" 2>&1 || rc=$?
            tail -n 3 "$out/sanitizer-$tool.log"
            echo "   $tool exit $rc"
            [[ $rc -eq 0 ]] || status=1
        done
    else
        echo "   compute-sanitizer not found: skipped"
    fi
    echo "   ($((SECONDS - start)) s)"

    echo "== 3. timings beside PyTorch SDPA"
    "$bin/cuda_attention" $quick | tee "$out/ours.jsonl"
    python3 "$ROOT/scripts/bench_sdpa.py" $quick | tee "$out/torch.jsonl"
    echo "   ($((SECONDS - start)) s)"
    python3 "$ROOT/scripts/bench_sdpa.py" --table "$out/ours.jsonl" "$out/torch.jsonl" | tee "$out/table.md"
    echo "   ($((SECONDS - start)) s)"

    echo "== 4. nanogpt's GPU recipe beside PyTorch's (bf16; eval-iters 20)"
    local iters=500
    [[ -n "$quick" ]] && iters=100
    if [[ -f "$BUNDLE/data/train.bin" ]]; then
        gpt "$bin" "$out" train --overwrite --config "$ROOT/configs/shakespeare_char.toml" --data-dir "$BUNDLE/data" \
            --out-dir "$out/gpt" --max-iters "$iters" --eval-interval "$iters" --eval-iters 20 \
            --log-interval 50 >"$out/nanogpt.log" 2>&1 || status=1
        tail -n 4 "$out/nanogpt.log"
        gpt "$bin" "$out" sample --out-dir "$out/gpt" --num-samples 1 --max-new-tokens 300 --seed 1 \
            >"$out/sample.txt" 2>&1 || status=1
        tail -n 8 "$out/sample.txt"
        python3 "$ROOT/scripts/pytorch_reference.py" --recipe gpu --device cuda --data-dir "$BUNDLE/data" \
            --max-iters "$iters" --eval-iters 20 >"$out/pytorch-nanogpt.log" 2>&1 || status=1
        tail -n 3 "$out/pytorch-nanogpt.log"
        local ours theirs
        ours="$(sed -n 's/.*median \([0-9.]*\) ms\/iter.*/\1/p' "$out/nanogpt.log")"
        theirs="$(sed -n 's/^median \([0-9.]*\) ms\/iter.*/\1/p' "$out/pytorch-nanogpt.log")"
        echo "nanogpt GPU recipe, $iters iterations: ours ${ours:-?} ms/iter, PyTorch (eager, bf16 autocast) ${theirs:-?} ms/iter" \
            | tee -a "$out/table.md"
    else
        echo "   no prepared data in the bundle: skipped"
    fi
    echo "   ($((SECONDS - start)) s)"
    echo "== summary"
    grep -E "test result|cases agree|FAILED|panicked" "$out/tests.log" | tail -n 12
    cat "$out/table.md"
    exit $status
}

# nanogpt from the bundle on the GPU: `gpt BIN OUT SUBCOMMAND ARGS...`.
gpt() {
    local bin="$1" out="$2" cmd="$3"
    shift 3
    mkdir -p "$out"
    "$bin/nanogpt" "$cmd" --device cuda "$@"
}

# The whole GPU recipe (nanoGPT: val loss 1.4697 after 5000 iterations, about 3 minutes on an
# A100).
recipe() {
    local out="${OUT:-$ROOT/gpu-check-out}" bin=/tmp/attn-op-gpu-check
    [[ -x "$bin/nanogpt" ]] || unpack "$bin"
    find_libs
    gpt "$bin" "$out" train --overwrite --config "$ROOT/configs/shakespeare_char.toml" --data-dir "$BUNDLE/data" \
        --out-dir "$out/gpt-recipe" 2>&1 | tee "$out/recipe.log"
    gpt "$bin" "$out" sample --out-dir "$out/gpt-recipe" --num-samples 2 --max-new-tokens 500 --seed 1 \
        | tee "$out/recipe-sample.txt"
}

case "${1:-}" in
bundle) bundle ;;
recipe) recipe ;;
--quick) check --quick ;;
"") check ;;
*) echo "usage: $0 [bundle | --quick | recipe]"; exit 2 ;;
esac
