"""CPU cost of a DAN training step against a plain torchvision backbone with a linear head.

For each backbone (ResNet-18, ResNet-50) and input size (112, 224), two models train on the same
uint8 batch, side by side in this process, alternating step for step so that both see the same
machine load:

- DAN: ``ferflow.model.build_model`` (4 heads) + ``ferflow.losses.DANLoss`` (task both: focal,
  CCC, affinity, partition) + the trainer's optimiser and gradient clipping (``ferflow.train.build``);
- plain: ``torchvision.models.resnetXX`` with its fc replaced by Linear(features, 8 + 2),
  cross-entropy + MSE, the same optimiser (``train.make_optimizer``) and clipping, and the same
  uint8 -> normalised input.

Timing runs in ``--rounds`` rounds of four steps, DAN, plain, plain, DAN (``bench/_abba.py``,
after ``--warmup`` steps each), so that a load change during a round weighs on both; each round
gives one cost ratio (DAN seconds / plain seconds). DAN does more arithmetic than the plain model
(its attention heads and fusion): its forward + backward FLOPs over the plain model's, counted once
with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matrix products; the optimiser
step is not counted), is the floor of the time ratio. The headline is the time ratio divided by
the FLOP ratio (goal <= 1.05: DAN's implementation costs no more than 5% beyond its arithmetic).
Also reported: images/s per model (median over rounds), and the median peak memory of a step,
measured in separate, untimed steps: the peak resident
set size (sampled every 1 ms by a thread) above its size when the step started (activations,
gradients and temporaries; the weights and optimiser state are already resident). glibc's
``malloc_trim`` runs between steps so that freed memory does not hide the next peak.

``--per-head`` adds a third side, DAN with its heads run one module after the other
(``model.fuse_heads = False``: the implementation before ``ferflow.model.fused_heads``), and
prints its ratio over FLOPs and its step time over the fused DAN's.

On a loaded machine with 2 threads the time ratio tracks the number of OpenMP parallel regions a
step opens more than its FLOPs: each region waits until both threads are scheduled. Counted by
``bench/omp_regions.py`` (ResNet-18, 112 px, batch 16): plain 459 per step, DAN 701 (980 with
the heads one by one), 90 of DAN's extra in the fused Adam step (151 against 61: one region per
parameter tensor). ``--threads 1 --cpu-time`` measures the compute alone.

    python bench/train_step.py                  # resnet18 and resnet50 at 112 px, batch 16
    python bench/train_step.py --quick          # smoke mode (tests): resnet18 at 112, batch 4, 1 round
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _abba import load_line, ratio_line, run_rounds, summary, timed  # noqa: E402

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


def dan_step_fn(backbone: str, batch: dict, fuse_heads: bool = True):
    settings = train.resolve_settings({"backbone": backbone, "heads": 4, "task": "both"})
    model, criterion, optimizer, _, _ = train.build(settings, torch.device("cpu"))
    model.fuse_heads = fuse_heads  # False: the heads one module after the other (--per-head)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()

    def loss_backward():
        out = model(batch["image"])
        loss, _ = criterion(out, batch["expr"], batch["va"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step():
        loss_backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step, sum(p.numel() for p in params), loss_backward


def plain_step_fn(backbone: str, batch: dict):
    model = Plain(backbone)
    params = list(model.parameters())
    optimizer = train.make_optimizer(params, train.DEFAULTS)
    model.train()

    def loss_backward():
        out = model(batch["image"])
        loss = F.cross_entropy(out[:, :NUM_EXPRESSIONS], batch["expr"]) + F.mse_loss(
            torch.tanh(out[:, NUM_EXPRESSIONS:]), batch["va"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step():
        loss_backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step, sum(p.numel() for p in params), loss_backward


def cpu_timed(fn):
    """A side that returns the CPU seconds of this process spent in ``fn()`` (``--cpu-time``)."""

    def side() -> float:
        t = time.process_time()
        fn()
        return time.process_time() - t

    return side


def bench(backbone: str, size: int, batch_size: int, warmup: int, rounds: int, per_head: bool = False,
          cpu_time: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g),
        "expr": torch.randint(0, NUM_EXPRESSIONS, (batch_size,), generator=g),
        "va": torch.rand(batch_size, 2, generator=g) * 2 - 1,
    }
    torch.manual_seed(0)
    steps = {"dan": dan_step_fn(backbone, batch)}
    if per_head:
        steps["per_head"] = dan_step_fn(backbone, batch, fuse_heads=False)
    steps["plain"] = plain_step_fn(backbone, batch)
    # DAN's arithmetic is counted on its heads run one by one: FlopCounterMode counts the weight
    # gradient of a grouped convolution (the fused heads) as if each group saw every input channel,
    # groups times too many (12 GFLOP too many for ResNet-18 at 112 px, batch 16); the arithmetic is
    # the same either way.
    flops = {name: count_flops(fwd_bwd) for name, (_, _, fwd_bwd) in steps.items() if name != "dan"}
    flops["dan"] = flops.get("per_head") or count_flops(dan_step_fn(backbone, batch, fuse_heads=False)[2])
    # Timing: ABBA rounds of single steps (DAN, plain, plain, DAN; with --per-head DAN, per-head,
    # plain, plain, per-head, DAN), after the warm-up; the steps run
    # as in training: no memory probe (below) while timed.
    clock = cpu_timed if cpu_time else timed
    per_round = run_rounds({name: clock(fn) for name, (fn, _, _) in steps.items()}, rounds, warmup=warmup, log=None)
    ratios = [r["dan"] / r["plain"] for r in per_round]  # DAN cost / plain cost
    # Memory, in separate steps: the probe trims the heap before a step (so that the step's peak
    # shows) and samples it from a thread, neither of which a real training loop does.
    mems: dict[str, list[int]] = {k: [] for k in steps}
    for _ in range(max(1, rounds // 3)):
        for name, (fn, _, _) in steps.items():
            with PeakRSS() as mem:
                fn()
            mems[name].append(mem.delta)
    result = {"backbone": backbone, "size": size, "flop_ratio": flops["dan"] / flops["plain"]}
    for name, (_, n_params, _) in steps.items():
        result[f"{name}_img_s"] = 2 * batch_size / statistics.median(r[name] for r in per_round)
        result[f"{name}_mem_mb"] = statistics.median(mems[name]) / 2**20
        result[f"{name}_params_m"] = n_params / 1e6
        result[f"{name}_gflop"] = flops[name] / 1e9
    result["ratios"] = ratios
    result["per_flop"] = [r / result["flop_ratio"] for r in ratios]
    if per_head:
        result["fused_vs_per_head"] = [r["per_head"] / r["dan"] for r in per_round]
        result["per_head_per_flop"] = [r["per_head"] / r["plain"] / result["flop_ratio"] for r in per_round]
    return result


def count_flops(fwd_bwd) -> int:
    """FLOPs of one forward + loss + backward (``FlopCounterMode``: convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    return counter.get_total_flops()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--sizes", nargs="+", type=int, default=[112])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="ABBA rounds (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--per-head", action="store_true",
                   help="also time DAN with its heads run one module after the other (model.fuse_heads = False), "
                        "the implementation before the heads were fused, as a third side")
    p.add_argument("--cpu-time", action="store_true",
                   help="time CPU seconds (time.process_time) instead of wall seconds; needs --threads 1: a descheduled "
                        "thread then costs nothing, so a loaded machine skews the ratio less")
    p.add_argument("--quick", action="store_true", help="smoke mode: resnet18 at 112, batch 4, 1 warm-up, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.backbones, args.sizes, args.batch_size, args.warmup, args.rounds = ["resnet18"], [112], 4, 1, 1
    if args.cpu_time and args.threads != 1:
        p.error("--cpu-time needs --threads 1 (with more threads, CPU time counts threads spinning at barriers)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(load_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.rounds} ABBA rounds after {args.warmup} warm-up steps; DAN: 4 heads, task both; "
          f"{'CPU' if args.cpu_time else 'wall'} seconds")
    header = (f"{'backbone':<9} {'input':>5} | {'DAN img/s':>9} {'plain img/s':>11} | {'time ratio':>10} {'range':>9} | "
              f"{'GFLOP DAN':>9} {'plain':>6} {'ratio':>6} | {'DAN MB':>7} {'plain MB':>8} | {'DAN Mpar':>8} {'plain Mpar':>10}")
    print(header)
    print("-" * len(header))
    headlines = []
    for backbone in args.backbones:
        for size in args.sizes:
            r = bench(backbone, size, args.batch_size, args.warmup, args.rounds, args.per_head, args.cpu_time)
            med, lo, hi = summary(r["ratios"])
            print(f"{backbone:<9} {size:>5} | {r['dan_img_s']:>9.1f} {r['plain_img_s']:>11.1f} | {med:>10.2f} "
                  f"{f'{lo:.2f}-{hi:.2f}':>9} | {r['dan_gflop']:>9.1f} {r['plain_gflop']:>6.1f} {r['flop_ratio']:>6.3f} | "
                  f"{r['dan_mem_mb']:>7.0f} {r['plain_mem_mb']:>8.0f} | {r['dan_params_m']:>8.1f} {r['plain_params_m']:>10.1f}",
                  flush=True)
            headlines.append((f"RATIO {backbone} {size}px: (DAN / plain step time) / (DAN / plain FLOPs, "
                              f"{r['flop_ratio']:.3f})", r["per_flop"]))
            if args.per_head:
                headlines.append((f"  {backbone} {size}px, heads one by one: (per-head DAN / plain step time) / "
                                  f"FLOP ratio", r["per_head_per_flop"]))
                headlines.append((f"  {backbone} {size}px: per-head DAN / fused DAN, step time",
                                  r["fused_vs_per_head"]))
    for label, values in headlines:
        print(ratio_line(label, values, goal="goal <= 1.05" if label.startswith("RATIO") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
