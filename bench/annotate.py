"""Benchmark of ``ferflow annotate`` against a plain per-frame loop of the same components.

On the demo's two-person video (``105-30-480x270``: 480x270, 30 fps, two faces moving; ``--frames``
of it), with the demo's ensemble (three DAN variants as in ``config.yaml``: ResNet-18, 4/4/2 heads,
112 px input; untrained weights, since the time does not depend on their values) and the demo's
detector (OpenCV's Haar cascade), in one process:

- **annotate**: :func:`ferflow.annotate.annotate_video` end to end (decode, detect every 5th frame
  and where a track starts, ends or jumps, track every face, crop, all variants on batches of
  ``--batch-size`` crops, soft vote, smoothing, the table written; no plot, no video);
- **loop**: the same components the plain way: decode each frame, detect on every frame, crop each
  face, run each variant on that one crop, average the variants (no tracking, no batching).

Both run with the same threads, on the PyTorch backend and on the ONNX backend (the same
ensemble exported by ``ferflow export``, on onnxruntime; the loop calls its session with one crop).
Each round times loop and annotate back to back, the order alternating between rounds (ABBA); the
ratio of a round is annotate's frames/s over the loop's, and the median over the rounds is
reported with its range. Frames/s counts the video's frames (both handle every frame).

    python bench/annotate.py                       # 150 frames, 4 rounds: a few minutes on 2 CPU cores
    python bench/annotate.py --frames 30 --rounds 2 --backends torch   # a quick look
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
from ferflow.detect import HaarDetector  # noqa: E402
from ferflow.extract import ExtractSettings, read_frames  # noqa: E402
from ferflow.inference import OnnxRunner, TorchRunner, load_ensemble  # noqa: E402
from ferflow.model import build_model  # noqa: E402

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


class OnnxOne:
    """The exported graph called the plain way: one crop per call, the vote read from the graph."""

    def __init__(self, runner: OnnxRunner):
        self.session = runner.session

    def __call__(self, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, va = self.session.run(["probs", "va"], {"images": crop[None]})
        return probs[0], va[0]


class TorchOne:
    """Each variant on one crop, the mean of their softmax and VA."""

    def __init__(self, runner: TorchRunner):
        self.models = list(runner.net.variants)

    @torch.inference_mode()
    def __call__(self, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(crop[None])
        probs, va = [], []
        for model in self.models:
            out = model(x)
            probs.append(torch.softmax(out.expr, 1)[0])
            va.append(out.va[0])
        return torch.stack(probs).mean(0).numpy(), torch.stack(va).mean(0).numpy()


def plain_loop(video: str, detector, settings: ExtractSettings, one, size: int) -> int:
    """Detect every frame, classify each face on its own; returns the frames handled."""
    n = 0
    results = []
    for _, frame in read_frames(video):
        for row in detector([frame])[0]:
            results.append(one(annotate.model_input(frame, row, settings, size)))
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=150, help="frames of the demo video (at most 150)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--backends", default="torch,onnx")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_annotate."))
    video = tmp / "two.mp4"
    n_frames = make_video(video, args.frames)
    models = make_models(tmp / "models", args.input_size)
    settings = ExtractSettings(detector="haar")
    detector = HaarDetector(detect_size=settings.detect_size)
    net = load_ensemble(models)
    backends = {}
    for name in args.backends.split(","):
        if name == "torch":
            runner = TorchRunner(net)
            backends[name] = (runner, TorchOne(runner))
        elif name == "onnx":
            export.export_onnx(models, tmp / "ensemble.onnx", crop=export.crop_settings({"detector": "haar"}))
            runner = OnnxRunner(tmp / "ensemble.onnx", args.threads)
            backends[name] = (runner, OnnxOne(runner))
        else:
            ap.error(f"unknown backend {name!r}")
    print(f"video: demo 105-30-480x270, {n_frames} frames, 2 faces; ensemble {[v for v, _ in VARIANTS]} "
          f"(ResNet-18, {args.input_size} px); Haar detector; {args.threads} threads; {args.rounds} rounds")
    for name, (runner, one) in backends.items():
        def ours():
            out = annotate.annotate_video(video, tmp / "out", runner, settings, {"expr": 0, "va": 0}, detector,
                                          args.batch_size, progress=False, plot=False)
            return out.n_frames

        def loop():
            return plain_loop(str(video), detector, settings, one, args.input_size)

        ours(), loop()  # warm-up (first-call set-up of each library), untimed
        fps = {"annotate": [], "loop": []}
        for r in range(args.rounds):
            order = (("loop", loop), ("annotate", ours)) if r % 2 == 0 else (("annotate", ours), ("loop", loop))
            for label, fn in order:
                t0 = time.perf_counter()
                frames = fn()
                fps[label].append(frames / (time.perf_counter() - t0))
        ratios = [a / b for a, b in zip(fps["annotate"], fps["loop"])]
        print(f"[{name}] annotate {statistics.median(fps['annotate']):7.1f} frames/s, plain loop "
              f"{statistics.median(fps['loop']):7.1f} frames/s (medians); ratio annotate / loop: median "
              f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
