#!/usr/bin/env bash
# The checks CI cannot run: a short, prepared script for a CUDA box (one GPU is enough), about 8 minutes in all.
#
#     bash benchmarks/gpu_check.sh                 # PYTHON=/path/to/python picks the interpreter
#
# Needs the package's dependencies installed (pip install -e ".[test]" + peft; no network is used). Logs go to
# $OUT/gpu_check/ when OUT is set (the device runner collects that folder), else to a temporary directory. Each
# check is one block with its own time limit; add yours the same way and keep the total under ~8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOGS=${OUT:+$OUT/gpu_check}
LOGS=${LOGS:-$(mktemp -d)}
mkdir -p "$LOGS"
export TOKENIZERS_PARALLELISM=false
status=0

check() {  # check NAME SECONDS COMMAND...: run it with a time limit, log it, report it, keep going
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    if timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - start)) s)"
    else
        echo "FAIL $name ($((SECONDS - start)) s, rc $?): tail of $LOGS/$name.log"
        tail -40 "$LOGS/$name.log"
        status=1
    fi
}

check environment 60 "$PY" -c "
import torch, bitsandbytes, deepspeed, transformers, peft
assert torch.cuda.is_available(), 'no CUDA device visible'
print(torch.cuda.get_device_name(0), 'CUDA', torch.version.cuda, 'torch', torch.__version__, 'bitsandbytes',
      bitsandbytes.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__)"
[ $status = 0 ] || exit 1  # without a GPU every check below would only skip
cat "$LOGS/environment.log"

# The fused log-prob head: the Triton kernel against the naive head natively on CUDA (CI runs it only under
# TRITON_INTERPRET=1), then the head benchmark at V = 32000 and 128256 (its table lands in the log folder).
check triton_head 120 "$PY" -m pytest -q -x -rs tests/ops
check logprob_bench 180 "$PY" benchmarks/logprob_bench.py --rounds 1 --out "$LOGS/logprob_bench.md"

# FlexAttention on the shared layout, compiled as transformers runs it: log-probs and gradients against SDPA rows
# (CPU runs only the uncompiled forward: no CPU backward, and the CPU kernel does not build for this mask).
check flex_shared 180 "$PY" -m pytest -q -x -rs tests/families/test_shared.py -k flex_attention_shared

# A ~1B VLM BPO step on one GPU, bf16, rows vs shared-prompt layout (SDPA with the dense shared mask, and
# FlexAttention with it as a block mask, compiled), with MFU.
check vlm_step 300 "$PY" benchmarks/gpu_step.py --steps 6 --out "$LOGS/gpu_step.md"

# Issue 12: QLoRA (4-bit NF4 base under ZeRO-3: trains only adapters, exports adapter + merged weights) and
# paged_adamw_8bit (its states back in paged memory after a resume). Three one-GPU training jobs, ~3 minutes.
check qlora_paged_8bit 300 "$PY" -m pytest -q -x -rs tests/test_qlora.py

exit $status
