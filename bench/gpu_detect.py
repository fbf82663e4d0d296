"""Batched RetinaFace on a GPU: frames/s at batch sizes 1, 16 and 64 (for ``bench/gpu_check.sh``).

Times ``ferflow.retinaface.RetinaFaceDetector`` (ResNet-50, seeded random weights unless
``--weights``) on 1280x720 frames detected at ``--detect-size`` (640: 640x360), host frames in,
host arrays out: resize, upload, network, decoding, score filter, NMS and the one copy back are all
in the timing. With retinaface-pytorch's albumentations-based ``predict_single`` importable it also
times ``Model.predict_jsons`` one frame at a time on the same GPU (at the same size and at its
documented ``max_size=2048``) for comparison. Each shape gets untimed warm-up passes first.

Needs CUDA (exits with status 2 and says so otherwise), torch, torchvision, opencv and
retinaface-pytorch 0.0.8 (``pip install --no-deps retinaface-pytorch==0.0.8``; only its
``network`` module is used by the batched detector). Under 2 minutes on an H100.

    python bench/gpu_detect.py [--frames 256] [--detect-size 640] [--weights FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def fail(msg: str) -> int:
    print(f"gpu_detect: {msg}", file=sys.stderr, flush=True)
    return 2


def frames_720p(n: int, seed: int = 0):
    """Smooth random 1280x720 BGR frames with a few ellipses (content does not change the cost)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    base = []
    for _ in range(min(n, 8)):
        small = rng.integers(0, 256, (720 // 16, 1280 // 16, 3), dtype=np.uint8)
        img = cv2.resize(small, (1280, 720), interpolation=cv2.INTER_CUBIC)
        for _ in range(4):
            cv2.ellipse(img, (int(rng.integers(0, 1280)), int(rng.integers(0, 720))),
                        (int(rng.integers(40, 200)), int(rng.integers(50, 250))), 0, 0, 360,
                        tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
        base.append(img)
    return [base[i % len(base)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=256, help="frames timed per batch size (default 256)")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--detect-size", type=int, default=640)
    p.add_argument("--min-score", type=float, default=0.97, help="random weights: a few boxes per frame pass")
    p.add_argument("--weights", help="RetinaFace ResNet-50 weights (default: seeded random init)")
    p.add_argument("--baseline-frames", type=int, default=32, help="frames for predict_jsons (0: skip)")
    p.add_argument("--cpu-smoke-test", action="store_true", help=argparse.SUPPRESS)  # the code path, on the CPU
    args = p.parse_args(argv)

    try:
        import torch
    except ImportError as e:
        return fail(f"torch is not importable ({e})")
    if not torch.cuda.is_available() and not args.cpu_smoke_test:
        return fail("CUDA is not available (torch.cuda.is_available() is False): this check needs a GPU")
    try:
        from ferflow.retinaface import RetinaFaceDetector, build_retinaface
        build_retinaface()
    except ImportError as e:
        return fail(f"retinaface-pytorch is not importable ({e}); install it with "
                    "`pip install --no-deps retinaface-pytorch==0.0.8`")

    torch.backends.cudnn.benchmark = True
    dev = torch.device("cpu" if args.cpu_smoke_test else "cuda")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU smoke test"
    print(f"torch {torch.__version__}, {name}, detect_size {args.detect_size}, "
          f"1280x720 frames, {torch.get_num_threads()} CPU threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if not weights:
            torch.manual_seed(0)
            weights = str(Path(tmp) / "retinaface_random.pth")
            torch.save(build_retinaface().state_dict(), weights)
        frames = frames_720p(args.frames)
        results = {}
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            det = RetinaFaceDetector(weights, detect_size=args.detect_size, min_score=args.min_score,
                                     device=dev, batch_size=bs)
            for _ in range(2):
                det(frames[:bs])  # warm-up: cuDNN autotuning for this batch shape
            sync()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            out = det(frames)
            sync()
            dt = time.perf_counter() - t
            results[bs] = len(frames) / dt
            boxes = sum(len(d) for d in out) / len(out)
            print(f"batched RetinaFace, batch {bs:3d}: {results[bs]:8.1f} frames/s "
                  f"({boxes:.1f} boxes/frame, peak GPU memory "
                  f"{torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else 0:.1f} GiB)",
                  flush=True)
            del det
            if dev.type == "cuda":
                torch.cuda.empty_cache()

        if args.baseline_frames > 0:
            try:
                import cv2
                from retinaface import predict_single
            except ImportError as e:
                print(f"predict_jsons baseline skipped: {e} (needs albumentations)", flush=True)
                return 0
            sub = frames[:args.baseline_frames]
            for max_size in (args.detect_size, 2048 if dev.type == "cuda" else 256):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    model = predict_single.Model(max_size=max_size, device=dev.type)
                model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
                model.eval()
                rgb = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in sub]
                for f in rgb[:2]:
                    model.predict_jsons(f, confidence_threshold=args.min_score)
                sync()
                t = time.perf_counter()
                for f in rgb:
                    model.predict_jsons(f, confidence_threshold=args.min_score)
                sync()
                fps = len(rgb) / (time.perf_counter() - t)
                best = max(results.values())
                print(f"predict_jsons(max_size={max_size}), one frame at a time: {fps:8.1f} frames/s "
                      f"(best batched / this: {best / fps:.1f}x)", flush=True)
                del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
