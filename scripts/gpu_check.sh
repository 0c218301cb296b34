#!/usr/bin/env bash
# Every GPU check in one command, under 10 minutes on one GPU (`make gpu-check`; README, "GPU checks"):
#   1. the GPU-only tests (tests/test_gpu.py: bf16 training, packing and DPO's shared row with the GPU's SDPA,
#      flash-attention 2's varlen path and a Q-LoRA step when flash_attn / bitsandbytes are installed)
#   2. benchmarks/gpu_throughput.py: the ~1.8B VLM under FSDP2 in bf16: tokens/s, MFU, memory
#   3. benchmarks/finetune_memory.py --full-size: Qwen-VL at 9.6B on one GPU, LoRA (and Q-LoRA with bitsandbytes)
# Each step has its own time limit and a failing step does not stop the next. Logs and a summary go to $OUT
# (the device tool's folder) or gpu_check/. On a machine with PyTorch but without this project's other packages
# and no network, `make gpu-wheels` here first writes .whl/ (carried along), installed into /tmp/site there.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_check}"
mkdir -p "$OUT_DIR"
PY="${GPU_PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "wheels: install failed" >> "$SUMMARY"
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" - <<'EOF' 2>&1
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("transformers", "peft", "timm", "flash_attn", "bitsandbytes", "lavis"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "(imported)"))
    except Exception as err:  # noqa: BLE001 - report whatever stops the import
        print(name, "missing:", type(err).__name__, err)
EOF
} | tee "$OUT_DIR/environment.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT_DIR/NAME.log, note the outcome
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    printf '%-18s rc=%-4s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" | tee -a "$SUMMARY"
}

step gpu_tests 120 "$PY" -m pytest -q -m gpu tests/test_gpu.py -rs -p no:cacheprovider
step throughput 240 "$PY" benchmarks/gpu_throughput.py --steps 10 --warmup 3
if "$PY" -c "import bitsandbytes" > /dev/null 2>&1; then modes=lora,qlora; else modes=lora; fi
step finetune_memory 210 "$PY" benchmarks/finetune_memory.py --full-size --modes "$modes"

echo "--- summary (logs in $OUT_DIR/)"
cat "$SUMMARY"
for log in gpu_tests throughput finetune_memory; do
    echo "--- $log (last lines)"
    tail -n 25 "$OUT_DIR/$log.log"
done
