#!/usr/bin/env bash
# GPU check for a lent GPU machine only (never in CI): a short DAN-ResNet-50 training at batch 256
# with bf16 autocast and channels-last, printing images/s and peak GPU memory. Under 3 minutes.
#
#   bash bench/gpu_check.sh            # PYTHON=... to choose the interpreter (default python3)
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh   # the same code paths on the CPU at toy sizes, in
#                                               # seconds (tests/test_bench.py), so that the script
#                                               # works on the day a GPU is lent
#
# Part 1 needs only torch + torchvision: it times the trainer's step (ferflow.model + ferflow.losses,
# Adam, gradient clipping, bf16 autocast, channels-last) on a synthetic uint8 batch already on the
# GPU, next to a plain torchvision ResNet-50 + linear head, and prints the ratio.
# Part 2, when webdataset and polars import (carry them as wheels on a bare machine), runs the real
# `python -m ferflow.train` for one epoch on synthetic shards (loader workers included) and prints
# the images/s and peak GPU memory it logged to history.csv.
# Part 3 times batched RetinaFace detection.
# Part 4 trains the paper's settings (config.paper.yaml: ResNet-50, 224 px, batch 1024,
# micro_batch auto) for two optimiser steps on one GPU, then on all GPUs of the machine as torchrun
# ranks (when more than one), printing the micro-batch chosen, img/s and peak memory per device.
# Part 5 checks the GPU paths: a few training steps in bf16 against a float32 CPU reference (losses
# printed, no NaN, within the stated tolerance), a run killed with SIGKILL and resumed, predict and
# extract (RetinaFace) end to end, and two claims under a preset multi-id CUDA_VISIBLE_DEVICES.
# The script exits non-zero when any part fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GPU_CHECK_SMOKE=${GPU_CHECK_SMOKE:-0}
[ "$GPU_CHECK_SMOKE" = 1 ] || nvidia-smi -L || true
# the time limits bound device time on a lent GPU; on a loaded shared CPU the smoke mode gets 10x
T=$([ "$GPU_CHECK_SMOKE" = 1 ] && echo 10 || echo 1)

timeout $((120 * T)) "$PY" - <<'EOF'
import os
import time
import torch
import torch.nn.functional as F
import torchvision
from ferflow.losses import DANLoss
from ferflow.model import build_model

smoke = os.environ["GPU_CHECK_SMOKE"] == "1"
assert smoke or torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cpu" if smoke else "cuda")
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
torch.backends.cudnn.benchmark = True
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'CPU smoke test'}")
B, S, WARMUP, STEPS = (4, 64, 1, 2) if smoke else (256, 224, 5, 20)
images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, device=dev).contiguous(memory_format=torch.channels_last)
expr = torch.randint(0, 8, (B,), device=dev)
va = torch.rand(B, 2, device=dev) * 2 - 1


def dan():
    model = build_model({"backbone": "resnet50", "heads": 4}).to(dev).to(memory_format=torch.channels_last)
    crit = DANLoss("both").to(dev)
    params = list(model.parameters()) + list(crit.parameters())
    opt = torch.optim.Adam(params, lr=1e-4, weight_decay=1e-4, fused=True)  # as ferflow.train's

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(images)
            loss, _ = crit(out, expr, va)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def plain():
    net = torchvision.models.resnet50(num_classes=10).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=1e-4, fused=True)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = net(((images.float() - mean) / std).contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(out[:, :8].float(), expr) + F.mse_loss(torch.tanh(out[:, 8:].float()), va)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return step


rates = {}
for name, make in (("DAN-ResNet-50", dan), ("plain ResNet-50", plain)):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = make()
    for _ in range(WARMUP):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(STEPS):
        step()
    sync()
    rates[name] = B * STEPS / (time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    print(f"{name:<16} batch {B} @ {S}px bf16: {rates[name]:8.0f} img/s, peak GPU memory {peak:5.1f} GiB")
print(f"DAN / plain cost ratio: {rates['plain ResNet-50'] / rates['DAN-ResNet-50']:.2f}")
EOF

if "$PY" -c "import webdataset, polars, tqdm, matplotlib" 2>/dev/null; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  timeout $((150 * T)) "$PY" - "$WORK" <<'EOF'
import csv, json, os, subprocess, sys, time
from pathlib import Path
from test_data import write_synthetic_shards

work = Path(sys.argv[1])
smoke = os.environ["GPU_CHECK_SMOKE"] == "1"
t = time.perf_counter()
if smoke:
    write_synthetic_shards(work / "shards", {"train": 48, "validation": 16}, per_shard=16, size=64, videos=4)
else:
    write_synthetic_shards(work / "shards", {"train": 3072, "validation": 256}, per_shard=256, size=224, videos=16)
print(f"wrote synthetic shards in {time.perf_counter() - t:.0f} s")
settings = {"name": "gpu_check", "backbone": "resnet50", "heads": 4, "input_size": 64 if smoke else 224,
            "epochs": 1, "batch_size": 8 if smoke else 256, "lr": 1e-4, "workers": 2 if smoke else 8,
            "augment": ["flip", "crop", "color"], "bootstrap": False}
subprocess.run([sys.executable, "-m", "ferflow.train", "--shards", str(work / "shards"), "--out", str(work / "out"),
                "--device", "cpu" if smoke else "auto", "--no-progress", "--settings", json.dumps(settings)],
               check=True)
row = list(csv.DictReader(open(work / "out" / "history.csv")))[-1]
print(f"ferflow.train end to end (loader, {settings['workers']} workers, first epoch incl. warm-up): "
      f"{float(row['train_img_per_s']):.0f} img/s, peak GPU memory {float(row.get('gpu_peak_mem_gib') or 'nan'):.1f} GiB")
EOF
else
  echo "part 2 skipped: webdataset/polars not importable (carry them as wheels to run ferflow.train end to end)"
fi

# Part 3: batched RetinaFace detection on the GPU at batch sizes 1, 16 and 64 (frames/s).
# Needs retinaface-pytorch (`pip install --no-deps retinaface-pytorch==0.0.8`).
FAILED=()
if [ "$GPU_CHECK_SMOKE" = 1 ]; then
  timeout $((90 * T)) "$PY" bench/gpu_detect.py --cpu-smoke-test --frames 2 --batch-sizes 1,2 --detect-size 128 --baseline-frames 0 \
    || FAILED+=("part 3 (exit $?)")
else
  timeout $((90 * T)) "$PY" bench/gpu_detect.py || FAILED+=("part 3 (exit $?)")
fi

WORK4=$(mktemp -d)
trap 'rm -rf "${WORK:-}" "$WORK4"' EXIT
timeout $((300 * T)) "$PY" bench/gpu_check_paper.py "$WORK4" || FAILED+=("part 4 (exit $?)")
timeout $((300 * T)) "$PY" bench/gpu_check_faults.py "$WORK4" || FAILED+=("part 5 (exit $?)")

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "GPU check FAILED: ${FAILED[*]}"
  exit 1
fi
echo "GPU check: all parts passed"
