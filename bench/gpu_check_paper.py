"""Part 4 of bench/gpu_check.sh: the paper's settings for two optimiser steps, on one GPU and on
every GPU of the machine (torchrun ranks, when there is more than one).

    python bench/gpu_check_paper.py WORK_DIR      # GPU_CHECK_SMOKE=1: on the CPU at toy sizes

Settings are config.paper.yaml's (ResNet-50, 224 px, batch 1024, micro_batch auto) without the
pretrained weights (random init costs the same) and with one epoch of 2048 synthetic samples: two
optimiser steps of 1024. Prints the micro-batch the memory plan chose, img/s (first epoch, warm-up
included) and the peak memory per device that the trainer logged to history.csv. In the smoke mode
the images are 64 px, the batch 1024 of 24 samples is split by a memory cap into micro-batches,
and the "all GPUs" run is two CPU ranks over gloo.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from test_data import write_synthetic_shards  # noqa: E402


def count_gpus() -> int:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    res = subprocess.run([exe, "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in res.stdout.splitlines()) if res.returncode == 0 else 0


def main() -> int:
    work = Path(sys.argv[1])
    smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
    shards = work / "paper_shards"
    settings = {**yaml.safe_load((REPO / "config.paper.yaml").read_text())["training"],
                "name": "paper", "seed": 1, "pretrained": None, "epochs": 1, "bootstrap": False}
    env = dict(os.environ)
    if smoke:
        import torch

        from ferflow import train
        from ferflow.losses import DANLoss
        from ferflow.model import build_model

        write_synthetic_shards(shards, {"train": 24}, per_shard=12, size=64)
        settings.update(input_size=64, workers=2)
        fixed, per = train.estimate_step_bytes(build_model(settings), DANLoss(), 64, torch.device("cpu"))
        env[train.ENV_MEMORY] = str((fixed + 6.5 * per) / 0.9 / 2**30)  # room for micro-batches of 6
        env["FERFLOW_NUM_GPUS"] = "0"
        n_gpus = 2  # two CPU ranks stand for "all GPUs"
    else:
        write_synthetic_shards(shards, {"train": 2048}, per_shard=256, size=224, videos=16)
        n_gpus = count_gpus()
    common = ["-m", "ferflow.train", "--shards", str(shards), "--settings", json.dumps(settings), "--no-progress",
              "--log-every", "1"]
    for k in [1] + ([n_gpus] if n_gpus > 1 else []):
        out = work / f"paper_{k}"
        if k == 1:
            cmd = [sys.executable, *common, "--out", str(out), "--device", "cpu" if smoke else "auto"]
        else:
            cmd = [sys.executable, "-m", "ferflow.devices", "--gpus", str(k), "--", sys.executable, "-m",
                   "torch.distributed.run", "--standalone", f"--nproc-per-node={k}", *common, "--out", str(out)]
        subprocess.run(cmd, check=True, env={**env, "PYTHONPATH": str(REPO / "src")})
        row = list(csv.DictReader(open(out / "history.csv")))[-1]
        where = f"{k} GPU{'s' if k > 1 else ''}" if not smoke else f"{k} CPU process{'es' if k > 1 else ''}"
        print(f"paper settings (resnet50, {settings['input_size']} px, batch {settings['batch_size']}) on {where}: "
              f"micro-batch {row['micro_batch']} per device, {float(row['train_img_per_s']):.0f} img/s, "
              f"peak memory {float(row['peak_mem_gib']):.1f} GiB per device, loss {float(row['loss_total']):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
