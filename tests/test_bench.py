"""The GPU check script's code paths, on the CPU at toy sizes.

``bench/gpu_check.sh`` only earns its keep on the day a GPU is lent (15 minutes of device time
per task): it must not be broken by then. ``GPU_CHECK_SMOKE=1`` runs every part of it on the CPU
with tiny batches; the numbers it prints mean nothing, the lines must be there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_in_cpu_smoke_mode():
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # part 1: both models' training steps timed, and their ratio
    for model in ("DAN-ResNet-50", "plain ResNet-50"):
        assert re.search(rf"{model}\s+batch 4 @ 64px bf16:\s+\d+ img/s", out), out[-4000:]
    ratio = float(re.search(r"DAN / plain cost ratio: ([0-9.]+)", out).group(1))
    assert ratio > 0
    # part 2: the real trainer, one epoch, its images/s read back from history.csv
    assert re.search(r"ferflow\.train end to end \(loader, 2 workers.*\): \d+ img/s", out), out[-4000:]
    # part 3: batched RetinaFace at each batch size
    assert "CPU smoke test" in out
    # part 4: the paper's settings on one device and on all (two CPU ranks in the smoke mode), the
    # memory cap forcing micro-batches of 6
    for where in ("1 CPU process", "2 CPU processes"):
        line = re.search(rf"paper settings \(resnet50, 64 px, batch 1024\) on {where}: micro-batch (\d+) per device, "
                         rf"(\d+) img/s, peak memory ([0-9.]+) GiB per device, loss ([0-9.]+)", out)
        assert line, out[-4000:]
        assert int(line.group(1)) == 6 and float(line.group(3)) > 0 and float(line.group(4)) > 0
    # part 5: every fault check ran and passed
    for check in ("bf16 steps vs float32 CPU reference:", "kill -9 and resume:", "predict and extract:",
                  "claims with a preset multi-id CUDA_VISIBLE_DEVICES:"):
        assert check in out, out[-4000:]
    assert len(re.findall(r"step \d: loss float32 CPU [0-9.]+, bf16 cpu [0-9.]+", out)) == 3
    assert re.search(r"claims under CUDA_VISIBLE_DEVICES=0,1: (0 0 and 1 1|1 1 and 0 0)", out), out[-4000:]
    assert "part 5: all checks passed" in out and "GPU check: all parts passed" in out
