"""Benchmark of ``ferflow annotate`` against a plain per-frame loop of the same components.

On the demo's two-person video (``105-30-480x270``: 480x270, 30 fps, two faces moving; the first
``--frames`` of it), with the demo's ensemble (three DAN variants as in ``config.yaml``: ResNet-18,
4/4/2 heads, 112 px input; untrained weights, since the time does not depend on their values), in
one process, on the CPU:

- **annotate**: :func:`ferflow.annotate.annotate_video` end to end (decode, detect every
  ``detect_every``-th frame (5, the pipeline's default) and where a track starts, ends or jumps,
  track every face between detections, crop, all variants on batches of ``--batch-size`` crops,
  soft vote, smoothing, the table written; no plot, no video). Detecting keyframes and tracking
  between them is the product's design, so the ratio includes what it saves;
- **plain loop**: the same components the plain way: decode each frame, detect on every frame (one
  frame per detector call), crop each face, run each variant on that one crop and average the
  variants (no tracking, no batching).

Same components: the detector of the run's config (``extract.detector``, MTCNN in the demo's
``config.yaml``: the headline) and, labelled as such, OpenCV's Haar cascade; the same networks
on both sides (the PyTorch backend's ``TorchRunner``: BatchNorm folded into the convolutions,
channels-last; the loop calls its variants one crop at a time), and the ONNX backend (the
ensemble written by ``ferflow export`` on onnxruntime; the loop calls its session with one crop
and reads the graph's vote). First, the PyTorch runner with BatchNorm folded is timed against the
same runner unfolded on one batch of random crops (what the folding buys). Each side's time is also split (timers around the detector and
network calls) into detector, networks and the rest (decoding, tracking, crops, table), so the
output says where the time goes on each side.

Threads: ``--threads`` (default 1) for PyTorch and onnxruntime on both sides. On a shared 2-core
machine two threads make the loop's one-crop calls stall at OpenMP barriers whenever another job
holds a core (measured 2.2-5.2 s per crop with 2 threads against 0.23-0.30 s with 1, load 11):
the ratio would then measure the load, not the code.

Rounds (``bench/_abba.py``): per detector, the sides (loop and annotate per backend) run in a
palindromic order, one cost per side per round; the ratio of a round is the loop's seconds over
annotate's (both handle every frame of the same video: the frames/s ratio); the median over the
rounds with its range is printed, the load average first.

    python bench/annotate.py                      # 60 frames, 3 rounds, MTCNN and Haar, torch and onnx
    python bench/annotate.py --quick              # smoke mode: 8 frames, 1 round (numbers mean little)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ferflow import annotate, demo, export, train  # noqa: E402
from ferflow.extract import ExtractSettings, make_detector, read_frames  # noqa: E402
from ferflow.inference import OnnxRunner, TorchRunner, load_ensemble  # noqa: E402
from ferflow.model import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _abba import load_line, ratio_line, ratios, run_rounds, timed  # noqa: E402

VARIANTS = (("dan4_s1", 4), ("dan4_s2", 4), ("dan2_s3", 2))


def make_video(path: Path, n_frames: int) -> int:
    p = demo.plan("small")
    unit = p.unit("105-30-480x270")
    frames = itertools.islice(demo.render_video(unit, demo.tracks(p, 0), 0), n_frames)
    return demo.write_video(path, frames, unit.width, unit.height)


def make_models(root: Path, input_size: int) -> Path:
    for i, (name, heads) in enumerate(VARIANTS):
        settings = train.resolve_settings({"name": name, "heads": heads, "input_size": input_size, "seed": i})
        torch.manual_seed(i)
        model = build_model(settings).eval()
        train.write_outputs(root / name, model, settings, [{"epoch": 1, "lr": 1e-3, "loss_total": 1.0}])
    return root


class Timer:
    """Wraps a callable (a detector, a runner, a one-crop classifier): adds up the seconds spent in
    it and the items handed to it; other attributes are the wrapped object's."""

    def __init__(self, fn):
        self.fn = fn
        self.seconds = 0.0
        self.items = 0

    def __call__(self, x):
        t = time.perf_counter()
        out = self.fn(x)
        self.seconds += time.perf_counter() - t
        self.items += len(x)
        return out

    def __getattr__(self, name):
        return getattr(self.fn, name)


class OnnxOne:
    """The exported graph called the plain way: one crop per call, the vote read from the graph."""

    def __init__(self, runner: OnnxRunner):
        self.session = runner.session

    def __call__(self, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, va = self.session.run(["probs", "va"], {"images": crop[None]})
        return probs[0], va[0]


class TorchOne:
    """Each variant of the runner's (folded, channels-last) network on one crop, the mean of their
    softmax and VA."""

    def __init__(self, runner: TorchRunner):
        self.models = list(runner.net.variants)

    @torch.inference_mode()
    def __call__(self, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(crop[None]).contiguous(memory_format=torch.channels_last)
        probs, va = [], []
        for model in self.models:
            out = model(x)
            probs.append(torch.softmax(out.expr, 1)[0])
            va.append(out.va[0])
        return torch.stack(probs).mean(0).numpy(), torch.stack(va).mean(0).numpy()


def plain_loop(video: str, detector, settings: ExtractSettings, one, size: int) -> tuple[int, int]:
    """Detect every frame, classify each face on its own; (frames, faces) handled."""
    n = faces = 0
    results = []
    for _, frame in read_frames(video):
        for row in detector([frame])[0]:
            results.append(one(annotate.model_input(frame, row, settings, size)))
            faces += 1
        n += 1
    return n, faces


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=60, help="frames of the demo video (at most 150)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--threads", type=int, default=1, help="PyTorch and onnxruntime threads, both sides")
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--detectors", default="mtcnn,haar", help="mtcnn: the demo config's detector; haar (empty: none)")
    ap.add_argument("--no-fold-check", action="store_true", help="skip timing the folded against the unfolded runner")
    ap.add_argument("--quick", action="store_true", help="smoke mode: 8 frames, 1 round, batches of 8")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.rounds, args.batch_size = 8, 1, 8
    print(load_line(), flush=True)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_annotate."))
    video = tmp / "two.mp4"
    n_frames = make_video(video, args.frames)
    models = make_models(tmp / "models", args.input_size)
    net = load_ensemble(models)
    runners = {}
    for name in args.backends.split(","):
        if name == "torch":
            runner = TorchRunner(net)
            runners[name] = (runner, TorchOne(runner))
        elif name == "onnx":
            export.export_onnx(models, tmp / "ensemble.onnx", crop=export.crop_settings({"detector": "mtcnn"}))
            runner = OnnxRunner(tmp / "ensemble.onnx", args.threads)
            runners[name] = (runner, OnnxOne(runner))
        else:
            ap.error(f"unknown backend {name!r}")
    every = ExtractSettings().detect_every
    print(f"video: demo 105-30-480x270, {n_frames} frames, 2 faces; ensemble {[v for v, _ in VARIANTS]} "
          f"(ResNet-18, {args.input_size} px, BatchNorm folded); {args.threads} thread(s); {args.rounds} rounds; "
          f"annotate: batches of {args.batch_size} crops, detects every {every}th frame (and where a track starts, "
          f"ends or jumps) and tracks between, the product's design; plain loop: detects every frame, "
          f"one crop per network call", flush=True)
    if "torch" in runners and not args.no_fold_check:
        # what folding BatchNorm into the convolutions buys the runner: the same crops, one batch
        crops = np.random.default_rng(0).integers(0, 256, (args.batch_size, 3, args.input_size, args.input_size),
                                                  dtype=np.uint8)
        folded, unfolded = runners["torch"][0], TorchRunner(net, fold=False)
        print(f"\nPyTorch runner, {args.batch_size} crops per call, BatchNorm folded vs not:", flush=True)
        per_round = run_rounds({"folded": timed(lambda: folded(crops)), "unfolded": timed(lambda: unfolded(crops))},
                               args.rounds, warmup=1)
        print("  " + ratio_line("runner, folded / unfolded speed", ratios(per_round, "unfolded", "folded")),
              flush=True)
    for det_name in filter(None, args.detectors.split(",")):
        settings = ExtractSettings(detector=det_name, device="cpu", detect_every=every)
        detector = make_detector(settings, "cpu")
        label = "the demo config's detector" if det_name == "mtcnn" else "not the demo config's detector"
        print(f"\n{det_name} ({label}):", flush=True)
        timers: dict[str, tuple[Timer, Timer]] = {}
        counts: dict[str, tuple[int, int]] = {}
        sides = {}
        for backend, (runner, one) in runners.items():
            for kind in ("loop", "annotate"):
                det_t = Timer(detector)
                net_t = Timer(runner if kind == "annotate" else one)
                side = f"{kind} {backend}"
                timers[side] = (det_t, net_t)

                def run(kind=kind, side=side, det_t=det_t, net_t=net_t) -> float:
                    t = time.perf_counter()
                    if kind == "annotate":
                        out = annotate.annotate_video(video, tmp / "out", net_t, settings, {"expr": 0, "va": 0},
                                                      det_t, args.batch_size, progress=False, plot=False)
                        handled = (out.n_frames, int(out.table["track"].is_not_null().sum()))
                    else:
                        handled = plain_loop(str(video), det_t, settings, net_t, args.input_size)
                    seconds = time.perf_counter() - t
                    if handled[0] != n_frames:
                        raise SystemExit(f"{side} handled {handled[0]} of {n_frames} frames")
                    counts[side] = handled
                    return seconds
                sides[side] = run
        for run in sides.values():  # warm-up (first-call set-up of each library), untimed
            run()
        for det_t, net_t in timers.values():
            det_t.seconds = net_t.seconds = det_t.items = 0
        per_round = run_rounds(sides, args.rounds, first=1)
        seconds = {s: [r[s] for r in per_round] for s in sides}
        for side, (det_t, net_t) in timers.items():
            runs = 2 * args.rounds
            total = sum(seconds[side])
            print(f"  {side:14s} {statistics.median(seconds[side]) / 2:7.2f} s per run (median); detector "
                  f"{100 * det_t.seconds / total:4.1f}%, networks {100 * net_t.seconds / total:4.1f}%, rest "
                  f"{100 * (total - det_t.seconds - net_t.seconds) / total:4.1f}%; {det_t.items / runs:.0f} of "
                  f"{n_frames} frames detected, {counts[side][1]} face crops classified", flush=True)
        for backend in runners:
            loop_fps = [2 * n_frames / s for s in seconds[f"loop {backend}"]]
            ours_fps = [2 * n_frames / s for s in seconds[f"annotate {backend}"]]
            print(f"  {backend}: annotate {statistics.median(ours_fps):.2f} frames/s, plain loop "
                  f"{statistics.median(loop_fps):.2f} frames/s (medians)")
            print("  " + ratio_line(f"{det_name}, {backend}, annotate / plain loop frames/s",
                             ratios(per_round, f"loop {backend}", f"annotate {backend}"), goal="goal >= 5"),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
