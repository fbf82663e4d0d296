"""CPU cost of a DAN training step against a plain torchvision backbone with a linear head.

For each backbone (ResNet-18, ResNet-50) and input size (112, 224), two models train on the same
uint8 batch, side by side in this process, alternating step for step so that both see the same
machine load:

- DAN: ``ferflow.model.build_model`` (4 heads) + ``ferflow.losses.DANLoss`` (task both: focal,
  CCC, affinity, partition) + the trainer's optimiser and gradient clipping (``ferflow.train.build``);
- plain: ``torchvision.models.resnetXX`` with its fc replaced by Linear(features, 8 + 2),
  cross-entropy + MSE, the same optimiser (``train.make_optimizer``) and clipping, and the same
  uint8 -> normalised input.

Timing runs in ``--rounds`` rounds of four steps, DAN, plain, plain, DAN (ABBA, after ``--warmup``
steps each), so that a load change during a round weighs on both; each round gives one cost ratio
(DAN seconds / plain seconds). Reported: median images/s per model, the median ratio over rounds
with its range (goal <= 1.25), and the median peak memory of a step, measured in separate,
untimed steps: the peak resident
set size (sampled every 1 ms by a thread) above its size when the step started (activations,
gradients and temporaries; the weights and optimiser state are already resident). glibc's
``malloc_trim`` runs between steps so that freed memory does not hide the next peak.

    python bench/train_step.py                  # full: resnet18/50 x 112/224, batch 32
    python bench/train_step.py --quick          # resnet18 at 112 only, batch 16, few repeats
    python bench/train_step.py --threads 1 --batch-size 16 --backbones resnet50 --sizes 112
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ferflow import train  # noqa: E402
from ferflow.labels import NUM_EXPRESSIONS  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Peak RSS above the size at entry, sampled by a thread."""

    def __enter__(self):
        trim()
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.base


class Plain(torch.nn.Module):
    def __init__(self, backbone: str):
        super().__init__()
        self.net = getattr(torchvision.models, backbone)(weights=None)
        self.net.fc = torch.nn.Linear(self.net.fc.in_features, NUM_EXPRESSIONS + 2)

    def forward(self, images):
        x = (images.float() - IMAGENET_MEAN) / IMAGENET_STD
        return self.net(x)


def dan_step_fn(backbone: str, batch: dict):
    settings = train.resolve_settings({"backbone": backbone, "heads": 4, "task": "both"})
    model, criterion, optimizer, _, _ = train.build(settings, torch.device("cpu"))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()

    def step():
        out = model(batch["image"])
        loss, _ = criterion(out, batch["expr"], batch["va"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step, sum(p.numel() for p in params)


def plain_step_fn(backbone: str, batch: dict):
    model = Plain(backbone)
    params = list(model.parameters())
    optimizer = train.make_optimizer(params, train.DEFAULTS)
    model.train()

    def step():
        out = model(batch["image"])
        loss = F.cross_entropy(out[:, :NUM_EXPRESSIONS], batch["expr"]) + F.mse_loss(
            torch.tanh(out[:, NUM_EXPRESSIONS:]), batch["va"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step, sum(p.numel() for p in params)


def bench(backbone: str, size: int, batch_size: int, warmup: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g),
        "expr": torch.randint(0, NUM_EXPRESSIONS, (batch_size,), generator=g),
        "va": torch.rand(batch_size, 2, generator=g) * 2 - 1,
    }
    torch.manual_seed(0)
    steps = {"dan": dan_step_fn(backbone, batch), "plain": plain_step_fn(backbone, batch)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    mems: dict[str, list[int]] = {k: [] for k in steps}
    ratios = []
    for _ in range(warmup):
        for fn, _ in steps.values():
            fn()
    # Timing: rounds of four steps in the order DAN, plain, plain, DAN (ABBA: a load that rises
    # or falls during the round weighs on both alike); each round gives one ratio, and the median
    # over rounds is reported. Steps run as in training: no memory probe (below) while timed.
    for _ in range(rounds):
        spent = {"dan": 0.0, "plain": 0.0}
        for name in ("dan", "plain", "plain", "dan"):
            t = time.perf_counter()
            steps[name][0]()
            dt = time.perf_counter() - t
            times[name].append(dt)
            spent[name] += dt
        ratios.append(spent["dan"] / spent["plain"])
    # Memory, in separate steps: the probe trims the heap before a step (so that the step's peak
    # shows) and samples it from a thread, neither of which a real training loop does.
    for _ in range(max(1, rounds // 3)):
        for name, (fn, _) in steps.items():
            with PeakRSS() as mem:
                fn()
            mems[name].append(mem.delta)
    result = {"backbone": backbone, "size": size}
    for name, (_, n_params) in steps.items():
        result[f"{name}_img_s"] = batch_size / statistics.median(times[name])
        result[f"{name}_mem_mb"] = statistics.median(mems[name]) / 2**20
        result[f"{name}_params_m"] = n_params / 1e6
    result["ratio"] = statistics.median(ratios)  # DAN cost / plain cost
    result["ratio_lo"], result["ratio_hi"] = min(ratios), max(ratios)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--sizes", nargs="+", type=int, default=[112, 224])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9, help="ABBA rounds (default 9)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="resnet18 at 112, batch 16, 1 warmup, 3 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.backbones, args.sizes, args.batch_size, args.warmup, args.rounds = ["resnet18"], [112], 16, 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.rounds} ABBA rounds after {args.warmup} warm-up steps; DAN: 4 heads, task both")
    header = (f"{'backbone':<9} {'input':>5} | {'DAN img/s':>9} {'plain img/s':>11} {'ratio':>6} {'range':>11} "
              f"{'goal':>5} | "
              f"{'DAN MB':>7} {'plain MB':>8} | {'DAN Mpar':>8} {'plain Mpar':>10}")
    print(header)
    print("-" * len(header))
    for backbone in args.backbones:
        for size in args.sizes:
            r = bench(backbone, size, args.batch_size, args.warmup, args.rounds)
            ok = "ok" if r["ratio"] <= 1.25 else "OVER"
            spread = f"{r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}"
            print(f"{backbone:<9} {size:>5} | {r['dan_img_s']:>9.1f} {r['plain_img_s']:>11.1f} {r['ratio']:>6.2f} "
                  f"{spread:>11} {ok:>5} | {r['dan_mem_mb']:>7.0f} {r['plain_mem_mb']:>8.0f} | {r['dan_params_m']:>8.1f} "
                  f"{r['plain_params_m']:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
