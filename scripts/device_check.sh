#!/bin/bash
# The checks that need a GPU, as one script for a short lease of a CUDA machine whose Python has torch,
# transformers and accelerate but not the rest of our dependencies (no network there). Here, first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl diffusers trl datasets dill multiprocess open_clip_torch ftfy \
#       wcwidth peft accelerate            # (the versions this machine has; .whl/ is git-ignored locally)
#   python -c "import datasets; datasets.load_from_disk('PAIRS').select(range(160)).flatten_indices()\
#       .save_to_disk('.whl/pairs160')"  # a few mined image pairs for stage D
# then run it there with .whl carried:  bash scripts/device_check.sh  (writes logs to $OUT or ./device_out).
# 1. the test suite with CUDA present (one thread per worker: 16 workers x 16 threads timed out on 2026-12-04);
# 2. stage D (Diffusion-DPO, U-Net LoRA) on CUDA in fp32 and bf16: s/step and cuda_peak_gib in log.jsonl;
# 3. the CLI with --device cuda (eval slice against the CPU, one generate).
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
python3 -c "import torch, transformers, diffusers, trl, peft, datasets; print(torch.__version__, \
transformers.__version__, diffusers.__version__, trl.__version__, peft.__version__, torch.cuda.is_available())"
timeout 420 python3 -m pytest -p no:cacheprovider -p no:benchmark -n 8 --timeout 300 --ignore=tests/test_webui.py \
    -q --tb=short -rfE tests > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -40
for mode in fp32 bf16; do
    bf16=false
    [ "$mode" = bf16 ] && bf16=true
    timeout 150 python3 -m plan2img dpo --config configs/toy_dpo.yaml --set pairs=.whl/pairs160 \
        out="/tmp/dpo_$mode" max_steps=60 log_every=20 checkpoint_every=1000 batch_size=16 bf16=$bf16 \
        > "$OUT/dpo_$mode.log" 2>&1
    echo "dpo $mode rc=$?"
    python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][-1]; \
print({k: r.get(k) for k in ('step', 'sec_per_step', 'cuda_peak_gib', 'loss', 'heldout_diffusion_loss')})" \
        "/tmp/dpo_$mode/log.jsonl"
    cp "/tmp/dpo_$mode/log.jsonl" "$OUT/dpo_$mode.jsonl"
done
# 3. the CLI on CUDA (--device): one image and a small ShapesEval slice, against the same run on the CPU
for device in cuda cpu; do
    timeout 120 python3 -m plan2img eval --generate bridge --limit-per-task 2 --n-per-prompt 1 --steps 10 \
        --device "$device" --out "$OUT/eval_$device" > "$OUT/eval_$device.log" 2>&1
    echo "eval $device rc=$? $(grep -o 'overall[^|]*|[^|]*' "$OUT/eval_$device/summary.md" 2>/dev/null)"
done
timeout 60 python3 -m plan2img generate "a red star to the left of a green circle" --device cuda -o "$OUT/cuda.png"
echo "generate cuda rc=$?"
