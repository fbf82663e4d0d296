"""Aff-Wild2 at full size, simulated: time, memory and disk of every CPU stage at 1%, 10%, 100%.

Builds synthetic inputs of ABAW3's shape at a fraction of full size (``--fractions``), runs each
stage as the workflow runs it (a subprocess ``python -m ferflow.<stage> ...`` with a rule's
arguments) and measures it:

- **inputs** (untimed): Aff-Wild2 (ABAW3 EXPR + VA) about 2.8M annotated frames in about 560 videos
  at 100%. Video lengths are heavy-tailed: the quantiles of a log-normal with a median of 100 s at
  30 fps and sigma 1.0 (most videos 1-5 minutes, the longest over 30 minutes), scaled so that the
  annotation lines add up to the fraction of 2.8M. One video in 20 has two annotated people
  (``_left``/``_right``). 40% of the videos are annotated for both tasks, 35% for VA only, 25% for
  EXPR only; EXPR ``-1`` runs (about 4% of lines) and VA ``-5,-5`` runs (about 3%); every seventh
  annotation has a few lines more or fewer than the video has frames. One video in five is in the
  validation split. The files are written with the demo's writers (:func:`ferflow.demo.expr_text`,
  :func:`ferflow.demo.va_text`), in the native layout of ``docs/formats.md``; each video is a
  one-frame 16x16 file (the index only opens it). AffectNet: 290k training rows of its csv
  (native codes 0-10, 68 landmarks, -2 for a missing valence/arousal), chunks of 10k images; ExpW:
  90k faces of ``label.lst``. No image file is written: the index does not open them.
- **faces** (untimed, instead of extraction, which ``--extract`` measures on its own): per video
  unit a FACES table (every frame of every annotated person; 4% ``missing``) and a tar of tiny
  16x16 JPEG crops, written with the extraction's own writers; per image chunk the same from the
  index's manifest.
- **stages** (measured): ``index`` (one job per source), ``shards`` (with its accounting check),
  ``loader``: labels.parquet read, the training split's label index (frame_step 2, bootstrap) and
  one epoch's batch plan, no image decoded (:func:`ferflow.data.make_loader`, the trainer's call);
  ``predict_write``: 6 prediction files of the validation split from synthetic model outputs, by
  the predict stage's writer (:func:`ferflow.predict.predictions_table`; no network runs);
  ``evaluate`` with the 6 variants (``--smoothing auto``, plots), the rule's call.

Per stage: wall time, CPU time (user + system of the stage's processes, from
``getrusage(RUSAGE_CHILDREN)`` before and after), peak memory (the summed RSS of the stage's
process tree, sampled every 50 ms with psutil, or the stage process's own ``VmHWM`` when that is
higher: a peak between two samples; ``bench/_peak.py`` runs the stage and reads it), and the disk of its outputs. Printed: a table
per fraction, the growth exponents between fractions (slope of log cost against log annotated
frames; from CPU time, wall time printed beside it: the machine is shared), and bytes on disk per
frame for faces, shards and predictions.

``--extract`` measures ``python -m ferflow.extract video`` (OpenCV's Haar cascade at 160x120 on a
generated 160x120 video of the demo face) at 1,000 and 54,000 frames (30 minutes at 30 fps): its
peak memory should not grow with the video's length (printed: the difference, per added frame).
``--extract-detectors retinaface mtcnn haar`` (``--extract-detector-frames N``, default 1000)
measures it per detector on a 1280x720 video, detected at 640 every 5th frame (the defaults), on the
CPU with one thread: MTCNN and Haar through ``python -m ferflow.extract video``; RetinaFace
ResNet-50 (the workflow's default) with seeded random weights, following the boxes Haar finds on the
frames it is run on (random weights find no face). The per-frame CPU time, peak memory and disk per
crop are what ``extract_video_faces`` asks for (workflow/rules/common.smk).

    python bench/scale.py --max-fraction 0.1          # 1% and 10%: a few minutes on 2 cores
    python bench/scale.py --fractions 1 --extract     # full size: about an hour, ~10 GB of disk
    python bench/scale.py --fractions 0.01 --work /tmp/s --keep   # keep the outputs (tests read them)
    python bench/scale.py --fractions --extract-detectors retinaface mtcnn haar   # ~5 CPU-min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
import polars as pl  # noqa: E402

from ferflow import demo, layout, schemas  # noqa: E402
from ferflow.extract import _add_member  # noqa: E402
from ferflow.faces import encode_jpeg  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _abba import load_line  # noqa: E402

FULL_FRAMES = 2_800_000  # ABAW3 EXPR + VA annotated frames (annotation lines) in Aff-Wild2
FULL_VIDEOS = 560
FULL_AFFECTNET = 290_000
FULL_EXPW = 90_000
FPS = 30
MEDIAN_SECONDS, SIGMA = 100.0, 1.0
IMAGES_PER_CHUNK = 10_000
SAMPLES_PER_SHARD = 1000
VARIANTS = 6
SAMPLE_S = 0.05
STAGES = ("index_affwild2", "index_affectnet", "index_expw", "shards", "loader", "predict_write", "evaluate")


# ---- growth ----------------------------------------------------------------------------------
def growth_exponent(sizes, costs) -> float:
    """Slope of log(cost) against log(size): least squares over the points (two points: the
    exponent between them, ``log(c2/c1) / log(s2/s1)``). 1.0 is linear growth. NaN when fewer than
    two points have positive values or the sizes do not differ."""
    pts = [(math.log(s), math.log(c)) for s, c in zip(sizes, costs) if s and c and s > 0 and c > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


# ---- inputs ------------------------------------------------------------------------------------
def video_lengths(n_videos: int, total_lines: int) -> list[int]:
    """Frames of ``n_videos`` videos: the (k + 0.5) / n quantiles of the log-normal (median 100 s
    at 30 fps, sigma 1.0), scaled so that they add up to ``total_lines``; at least 60 frames."""
    nd = NormalDist()
    raw = [math.exp(math.log(MEDIAN_SECONDS * FPS) + SIGMA * nd.inv_cdf((k + 0.5) / n_videos)) for k in range(n_videos)]
    scale = total_lines / sum(raw)
    return [max(60, int(round(r * scale))) for r in raw]


@dataclass
class Unit:
    stem: str
    split: str
    n_frames: int
    persons: list[str]  # "" or "left"/"right"
    tasks: tuple[str, ...]
    lines: dict[str, int] = field(default_factory=dict)  # annotation name -> lines per task file


def plan_affwild2(fraction: float) -> list[Unit]:
    """The Aff-Wild2 units at ``fraction`` (deterministic). Annotation lines add up to about
    ``fraction * FULL_FRAMES`` (a two-person video counts its frames twice)."""
    n = max(3, round(FULL_VIDEOS * fraction))
    persons = [["left", "right"] if k % 20 == 7 else [""] for k in range(n)]
    lines_per_frame = sum(len(p) for p in persons) / n
    lengths = video_lengths(n, round(FULL_FRAMES * fraction / lines_per_frame))
    order = np.random.default_rng(17).permutation(n)  # lengths not sorted by name or split
    units = []
    for k in range(n):
        n_frames = lengths[order[k]]
        tasks = ("expr", "va") if k % 20 < 8 else ("va",) if k % 20 < 15 else ("expr",)
        u = Unit(f"{100 + k}-30-{'1280x720' if k % 3 else '640x360'}", "validation" if k % 5 == 2 else "train",
                 n_frames, persons[k], tasks)
        for p in u.persons:
            name = f"{u.stem}_{p}" if p else u.stem
            off = (3, -2, 5)[k % 3] if k % 7 == 0 else 0  # a few lines more or fewer than frames
            u.lines[name] = max(1, n_frames + off)
        units.append(u)
    return units


def _runs(rng: np.random.Generator, n: int, share: float, mean_run: int = 30) -> np.ndarray:
    """A boolean mask with runs of about ``mean_run`` covering about ``share`` of ``n``."""
    mask = np.zeros(n, bool)
    for start in rng.integers(0, n, max(0, int(n * share / mean_run))):
        mask[start:start + int(rng.integers(mean_run // 2, mean_run * 3 // 2))] = True
    return mask


def _track(name: str, n: int) -> demo.Track:
    """Labels of one annotation: class segments of 10-60 frames, smooth VA, -1 and -5 runs."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    seg = np.repeat(rng.integers(0, 8, n // 10 + 1), rng.integers(10, 61, n // 10 + 1))[:n]
    cls = np.resize(seg, n) if len(seg) < n else seg
    t = np.arange(n)
    va = [np.clip(0.6 * np.sin(2 * np.pi * t / rng.uniform(100, 900) + rng.uniform(0, 6)), -0.98, 0.98)
          .round(3).astype(np.float32) for _ in range(2)]
    return demo.Track(cls, va[0], va[1], _runs(rng, n, 0.04), _runs(rng, n, 0.03))


def write_affwild2(root: Path, units: list[Unit], video_bytes: bytes) -> None:
    for u in units:
        (root / "videos").mkdir(parents=True, exist_ok=True)
        (root / "videos" / f"{u.stem}.mp4").write_bytes(video_bytes)
        for name, n in u.lines.items():
            tr = _track(name, n)
            native = demo.SPLIT_DIRS[u.split]
            if "expr" in u.tasks:
                path = root / "EXPR_Classification_Challenge" / native / f"{name}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(demo.expr_text(tr, n))
            if "va" in u.tasks:
                path = root / "VA_Estimation_Challenge" / native / f"{name}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(demo.va_text(tr, n))


def tiny_video(path: Path) -> bytes:
    """A one-frame 16x16 mp4 (the demo's writer): what the index opens for each video."""
    demo.write_video(path, iter([np.full((16, 16, 3), 128, np.uint8)]), 16, 16)
    return path.read_bytes()


def write_affectnet(root: Path, n: int) -> None:
    """``Manually_Annotated_file_lists/training.csv`` with ``n`` rows (demo.AFFECTNET_HEADER)."""
    rng = np.random.default_rng(290)
    codes = rng.choice(11, n, p=np.array([75, 134, 25, 14, 6, 4, 25, 4, 10, 5, 3]) / 305)
    v = rng.uniform(-1, 1, n).round(6)
    a = rng.uniform(-1, 1, n).round(6)
    bad = (codes == 10) | (rng.random(n) < 0.02)
    marks = ";".join(f"{z:.2f}" for z in demo._landmarks((40, 40, 200, 200)).reshape(-1))
    lines = [demo.AFFECTNET_HEADER]
    for i in range(n):
        va = "-2,-2" if bad[i] else f"{v[i]},{a[i]}"
        lines.append(f"{i % 1000}/{i:07x}{'ab' * 20}.jpg,40,40,160,160,{marks},{codes[i]},{va}")
    path = root / "Manually_Annotated_file_lists" / "training.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_expw(root: Path, n: int) -> None:
    """``label/label.lst`` with ``n`` faces (one or two per image)."""
    rng = np.random.default_rng(90)
    codes = rng.choice(7, n, p=np.array([4, 1, 1, 30, 10, 7, 34]) / 87)
    lines = []
    image = 0
    face = 0
    for i in range(n):
        lines.append(f"happy_actor_{image}.jpg {face} 20 30 110 100 {rng.uniform(20, 80):.4f} {codes[i]}")
        if face == 0 and i % 5 == 0:
            face = 1
        else:
            image, face = image + 1, 0
    path = root / "label" / "label.lst"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def sources(data: Path, fraction: float) -> dict[str, dict]:
    """The config entries of the three sources (as the rules pass them to the index)."""
    n_aff = max(100, round(FULL_AFFECTNET * fraction))
    return {
        "affwild2": {"name": "affwild2", "kind": "affwild2", "root": str(data / "affwild2"),
                     "videos": str(data / "affwild2" / "videos"),
                     "splits": {"Train_Set": "train", "Validation_Set": "validation"}, "tasks": ["expr", "va"]},
        "affectnet": {"name": "affectnet", "kind": "affectnet", "root": str(data / "affectnet"),
                      "splits": {"training": "train"}, "tasks": ["expr", "va"],
                      "chunks": max(1, round(n_aff / IMAGES_PER_CHUNK)),
                      "label_map": {str(k): v for k, v in demo_affectnet_map().items()}},
        "expw": {"name": "expw", "kind": "expw", "root": str(data / "expw"), "split": "train",
                 "chunks": max(1, round(max(100, round(FULL_EXPW * fraction)) / IMAGES_PER_CHUNK))},
    }


def demo_affectnet_map() -> dict[int, str]:
    from ferflow.index import AFFECTNET_MAP

    return {int(k): v for k, v in AFFECTNET_MAP.items()}


# ---- faces (instead of extraction) -------------------------------------------------------------
JPEG = encode_jpeg(np.full((16, 16, 3), 120, np.uint8), 90)


def _faces_table(videos: list[str], frames: list[np.ndarray], status: list[np.ndarray], n_frames: int,
                 detector: str) -> pl.DataFrame:
    video = np.concatenate([np.full(len(f), v, object) for v, f in zip(videos, frames)])
    frame = np.concatenate(frames)
    st = np.concatenate(status)
    found = st != "missing"
    member = np.where(found, np.char.add(np.char.add(video.astype(str), "/"),
                                         np.char.add(np.char.zfill(frame.astype(str), 6), ".jpg")), None)
    n = len(frame)
    box = pl.Series(np.where(found, 10.0, np.nan), dtype=pl.Float32).fill_nan(None)
    cols = {"video": video.astype(str), "frame": frame.astype(np.int64), "status": st.astype(str),
            "x0": box, "y0": box, "x1": box, "y1": box, "score": box,
            "member": pl.Series(member.tolist(), dtype=pl.String), "n_frames": np.full(n, n_frames, np.int64)}
    for c, t in schemas.FACE_DETAILS.items():
        cols[c] = pl.Series([None] * n, dtype=t)
    cols["crop"] = pl.Series(np.where(found, "square", None).tolist(), dtype=pl.String)
    cols["detector"] = pl.Series([detector] * n, dtype=pl.String)
    return pl.DataFrame(cols).select(list(schemas.FACES_FULL))


def write_faces(table: pl.DataFrame, out_table: Path, out_tar: Path) -> None:
    out_table.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in table["member"].drop_nulls():
            _add_member(tar, member, JPEG)
    schemas.write_table(table, out_table, schemas.FACES_FULL)


def faces_for_videos(faces: Path, units: list[Unit]) -> list[Path]:
    out = []
    for u in units:
        names = list(u.lines)
        frames, status = [], []
        for name in names:
            rng = np.random.default_rng(zlib.crc32(("faces" + name).encode()))
            f = np.arange(u.n_frames)
            frames.append(f)
            status.append(np.where(_runs(rng, u.n_frames, 0.04, 20), "missing",
                                   np.where(f % 5 == 0, "detected", "interpolated")))
        t = _faces_table(names, frames, status, u.n_frames, '{"detector":{"name":"bench"}}')
        path = faces / "affwild2" / f"{u.stem}.parquet"
        write_faces(t, path, path.with_suffix(".tar"))
        out.append(path)
    return out


def faces_for_images(faces: Path, manifest: Path) -> list[Path]:
    m = schemas.read_table(manifest, schemas.MANIFEST).filter(pl.col("drop").is_null())
    out = []
    for (source, unit), part in m.group_by("source", "unit", maintain_order=True):
        part = part.sort("video", "frame")
        t = _image_table(part["video"].to_numpy().astype(str), part["frame"].to_numpy(), part.height)
        path = faces / source / f"{unit}.parquet"
        write_faces(t, path, path.with_suffix(".tar"))
        out.append(path)
    return out


def _image_table(videos: np.ndarray, frame: np.ndarray, n: int) -> pl.DataFrame:
    member = np.char.add(np.char.add(videos, "/"), np.char.add(np.char.zfill(frame.astype(str), 6), ".jpg"))
    box = pl.Series(np.full(n, 10.0), dtype=pl.Float32)
    cols = {"video": videos, "frame": frame.astype(np.int64), "status": np.full(n, "provided"),
            "x0": box, "y0": box, "x1": box, "y1": box, "score": box, "member": member,
            "n_frames": np.full(n, n, np.int64)}
    for c, t in schemas.FACE_DETAILS.items():
        cols[c] = pl.Series([None] * n, dtype=t)
    cols["crop"] = pl.Series(["square"] * n, dtype=pl.String)
    cols["detector"] = pl.Series(['{"detector":{"name":"given_boxes"}}'] * n, dtype=pl.String)
    return pl.DataFrame(cols).select(list(schemas.FACES_FULL))


# ---- measuring a stage -------------------------------------------------------------------------
@dataclass
class Cost:
    wall_s: float
    cpu_s: float
    peak_mib: float
    disk_mib: float = 0.0
    how: str = "tree"  # how the peak was measured: "tree" (sampled RSS) or "hwm" (the stage process's VmHWM)


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], log: Path, cwd: Path | None = None, src: Path | None = None) -> Cost:
    """Run ``cmd`` (``[python, "-m", module, ...]`` or ``[python, script, ...]``) to the end under
    ``bench/_peak.py`` and measure it (see the module doc), with ``src`` (default: this checkout's
    src/) as its PYTHONPATH. Raises CalledProcessError with the log's tail when it fails."""
    import psutil

    assert cmd[0] == sys.executable, cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_file = log.with_name(log.name + ".peak")
    peak_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "_peak.py"), *cmd[1:]],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, "PYTHONPATH": str(src or REPO / "src"), "OMP_NUM_THREADS": "1",
                                     "POLARS_MAX_THREADS": os.environ.get("POLARS_MAX_THREADS", "2"),
                                     "FERFLOW_PEAK_FILE": str(peak_file)})
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(ps))
            time.sleep(SAMPLE_S)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, output=log.read_text()[-4000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    how = "tree"
    hwm = int(peak_file.read_text()) * 1024  # the stage process's own peak (bench/_peak.py)
    if hwm > peak:
        peak, how = hwm, "hwm"
    return Cost(wall, cpu, peak / 2**20, how=how)


def disk_mib(*paths: Path) -> float:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total / 2**20


# ---- helpers run as stage subprocesses (the parts of a stage the bench cannot call as a rule) ---
def plan_loader(shards: str, split: str = "train") -> None:
    """labels.parquet -> the trainer's label index (frame_step 2) and one epoch's plan (bootstrap,
    class balance), as ``ferflow.train`` builds them; no image decoded. Prints the counts."""
    from ferflow import data

    labels = data.read_labels(shards)
    index = data.label_index(labels, split, frame_step=2)
    _, stream = data.make_loader(shards, split, batch_size=1024, input_size=112, train=True, seed=1, epoch=0,
                                 bootstrap=True, workers=0, index=index, class_balance=True)
    batches = sum(stream.batches_per_worker())
    samples = sum(stream.samples_per_worker())
    print(json.dumps({"split": split, "labels": len(index), "kept": int(index.keep.sum()), "samples": samples,
                      "batches": batches}))


def write_predictions(shards: str, split: str, out: str, seed: int) -> None:
    """A PREDICTIONS file of every sample of ``split`` from synthetic model outputs (softmax of
    random logits, VA in [-1, 1]), written by the predict stage's own writer."""
    from ferflow import data, predict

    labels = data.read_labels(shards)
    keys = labels.filter(pl.col("split") == split)["key"].to_list()
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((len(keys), 8), dtype=np.float32)
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    va = rng.uniform(-1, 1, (len(keys), 2)).astype(np.float32)
    table = predict.predictions_table(keys, probs, va, labels)
    schemas.write_table(table, out, schemas.PREDICTIONS)


# ---- one fraction ------------------------------------------------------------------------------
def build(work: Path, fraction: float) -> dict:
    """Write the inputs of ``fraction`` under ``work/data``; returns the plan's counts."""
    data = work / "data"
    units = plan_affwild2(fraction)
    video = tiny_video(work / "tiny.mp4")
    write_affwild2(data / "affwild2", units, video)
    srcs = sources(data, fraction)
    n_aff = max(100, round(FULL_AFFECTNET * fraction))
    n_expw = max(100, round(FULL_EXPW * fraction))
    write_affectnet(data / "affectnet", n_aff)
    write_expw(data / "expw", n_expw)
    lines = sum(n for u in units for n in u.lines.values())
    return {"units": units, "sources": srcs, "affwild2_lines": lines, "affectnet": n_aff, "expw": n_expw,
            "frames": lines + n_aff + n_expw, "videos": len(units),
            "longest_video_min": max(u.n_frames for u in units) / FPS / 60}


def stages_to_run(stages) -> set[str]:
    """``stages`` (names of STAGES; None: all) with the stages they need: the index jobs always
    (the faces of the image sources are made from their manifests), the shards for the loader, the
    prediction files and the evaluation, the prediction files for the evaluation."""
    want = set(STAGES if stages is None else stages)
    if want & {"loader", "predict_write", "evaluate"}:
        want.add("shards")
    if "evaluate" in want:
        want.add("predict_write")
    return want | {s for s in STAGES if s.startswith("index_")}


def run_fraction(work: Path, fraction: float, log=print, stages=None) -> dict:
    """Build, run and measure the ``stages`` (default all; see :func:`stages_to_run`) at
    ``fraction``; returns {stage: Cost} of the stages run and the counts."""
    run = stages_to_run(stages)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = build(work, fraction)
    log(f"  inputs: {plan['videos']} videos ({plan['affwild2_lines']} annotation lines, longest "
        f"{plan['longest_video_min']:.1f} min), AffectNet {plan['affectnet']}, ExpW {plan['expw']} "
        f"({time.perf_counter() - t0:.0f} s)")
    res = work / "results"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    py = sys.executable
    costs: dict[str, Cost] = {}
    manifests, issues = [], []
    for name, src in plan["sources"].items():
        m, i = res / "manifest" / f"{name}.parquet", res / "issues" / f"{name}.parquet"
        m.parent.mkdir(parents=True, exist_ok=True)
        i.parent.mkdir(parents=True, exist_ok=True)
        c = measure([py, "-m", "ferflow.index", "--source", json.dumps(src), "--out", str(m), "--issues", str(i),
                     "--on-unusable-input", "stop"], logs / f"index_{name}.log")
        c.disk_mib = disk_mib(m, i)
        costs[f"index_{name}"] = c
        manifests.append(m)
        issues.append(i)
        log(f"  index {name}: {fmt_cost(c)}")
    t0 = time.perf_counter()
    faces = res / "faces"
    tables = faces_for_videos(faces, plan["units"])
    for m in manifests[1:]:
        tables += faces_for_images(faces, m)
    faces_disk = disk_mib(faces)
    log(f"  faces: {len(tables)} tables and tars, {faces_disk:.0f} MiB ({time.perf_counter() - t0:.0f} s, not measured)")
    shards, acc = res / "shards", res / "accounting.parquet"
    result = {"fraction": fraction, "frames": plan["frames"], "videos": plan["videos"],
              "affwild2_lines": plan["affwild2_lines"], "faces_mib": faces_disk, "costs": costs}
    if "shards" not in run:
        return result
    c = measure([py, "-m", "ferflow.shards", "--manifest", *map(str, manifests), "--faces", *map(str, tables),
                 "--issues", *map(str, issues), "--out", str(shards), "--accounting", str(acc),
                 "--samples-per-shard", str(SAMPLES_PER_SHARD), "--seed", "0",
                 "--summary", str(res / "accounting.txt")], logs / "shards.log")
    c.disk_mib = disk_mib(shards, acc)
    costs["shards"] = c
    log(f"  shards: {fmt_cost(c)}")
    result["accounting_rows"] = pl.scan_parquet(acc).select(pl.len()).collect().item()
    result["written"] = pl.scan_parquet(shards / "labels.parquet").select(pl.len()).collect().item()
    if "loader" in run:
        c = measure([py, str(Path(__file__).resolve()), "--plan-loader", str(shards)], logs / "loader.log")
        costs["loader"] = c
        log(f"  loader: {fmt_cost(c)}  {(logs / 'loader.log').read_text().strip().splitlines()[-1]}")
    if "predict_write" not in run:
        return result
    preds = []
    worst = None
    for k in range(VARIANTS):
        out = res / "predictions" / f"v{k}" / "validation.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        c = measure([py, str(Path(__file__).resolve()), "--write-predictions", str(shards), str(out), str(k)],
                    logs / f"predict_v{k}.log")
        c.disk_mib = disk_mib(out)
        worst = c if worst is None else Cost(max(worst.wall_s, c.wall_s), max(worst.cpu_s, c.cpu_s),
                                             max(worst.peak_mib, c.peak_mib), max(worst.disk_mib, c.disk_mib))
        preds.append(out)
    costs["predict_write"] = worst  # one job (the largest of the 6)
    log(f"  predict_write (one job of {VARIANTS}, the largest of each): {fmt_cost(worst)}")
    result["predictions_rows"] = sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in preds) / VARIANTS
    if "evaluate" not in run:
        return result
    ev = res / "evaluation"
    c = measure([py, "-m", "ferflow.evaluate", "--predictions", *[f"v{k}={p}" for k, p in enumerate(preds)],
                 "--weights", *[f"v{k}=1.0" for k in range(VARIANTS)], "--accounting", str(acc),
                 "--split", "validation", "--smoothing", "auto", "--out-dir", str(ev)], logs / "evaluate.log")
    c.disk_mib = disk_mib(ev)
    costs["evaluate"] = c
    log(f"  evaluate: {fmt_cost(c)}")
    return result


def fmt_cost(c: Cost) -> str:
    return (f"wall {c.wall_s:7.1f} s  cpu {c.cpu_s:7.1f} s  peak {c.peak_mib:7.0f} MiB"
            f"{'*' if c.how == 'hwm' else ' '}  disk {c.disk_mib:7.1f} MiB")


# ---- extraction of one long video ---------------------------------------------------------------
def face_video(path: Path, n: int, width: int = 160, height: int = 120) -> None:
    """``n`` frames at ``width`` x ``height``: the demo face moving (a 300-frame loop), mp4v."""
    from ferflow.demo import Look, draw_face

    rng = np.random.default_rng(0)
    bg = rng.uniform(60, 200, (height, width, 3)).astype(np.float32)
    loop = []
    for t in range(300):
        canvas = bg.copy()
        s = t / FPS
        draw_face(canvas, Look((1.0, 1.0, 1.0), 1.0, False, 1.0), width / 2 + 0.2 * width * np.sin(2 * np.pi * s / 10),
                  height / 2, 0.6 * height)
        loop.append(np.clip(canvas, 0, 255).astype(np.uint8))
    demo.write_video(path, (loop[i % 300] for i in range(n)), width, height)


def run_extract(work: Path, lengths=(1000, 54000), log=print) -> dict[int, Cost]:
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    settings = json.dumps({"detector": "haar", "detect_size": 160, "crop_size": 112, "device": "cpu"})
    for n in lengths:
        video = work / f"face_{n}.mp4"
        face_video(video, n)
        tar, table = work / f"face_{n}.tar", work / f"face_{n}.parquet"
        c = measure([sys.executable, "-m", "ferflow.extract", "video", "--video", str(video), "--person", "face=",
                     "--settings", settings, "--out-tar", str(tar), "--out-table", str(table)],
                    work / f"extract_{n}.log")
        c.disk_mib = disk_mib(tar, table)
        rows = pl.read_parquet(table)
        found = rows.filter(pl.col("member").is_not_null()).height
        log(f"  extract {n:6d} frames: {fmt_cost(c)}  ({found} of {rows.height} frames with a crop)")
        out[n] = c
    return out


# ---- extraction with RetinaFace: cost per frame of the workflow's default detector ----------------
def extract_retinaface_child(video: str, weights: str, tar: str, table: str, detect_size: int, min_score: float
                             ) -> None:
    """Child process of :func:`run_extract_retinaface`: :func:`ferflow.extract.extract_video` with
    RetinaFace ResNet-50 on the CPU (one thread, ``detect_batch`` auto = 1) run on every frame the
    tracker asks for, the tracker following the boxes OpenCV's Haar cascade finds on those frames
    (bench/extract.py's ``RetinaFaceCostHaarBoxes``): ``weights`` are seeded random (the real ones
    cannot be downloaded here; the cost of a forward pass does not depend on the values), and random
    weights find no face to follow. ``min_score`` is calibrated by the parent to leave about 10 boxes
    per frame, as real weights on a crowded frame do, so NMS is not flooded. Prints the detector's
    frames as JSON on the last line."""
    import extract as bench_extract  # bench/extract.py

    from ferflow import extract as fx
    from ferflow.retinaface import RetinaFaceDetector

    detector = RetinaFaceDetector(weights, detect_size=detect_size, min_score=min_score, device="cpu",
                                  batch_size="auto")
    counting = bench_extract.RetinaFaceCostHaarBoxes(detector, bench_extract.CachedHaar(detect_size))
    settings = fx.ExtractSettings(detector="retinaface", detect_size=detect_size, min_score=min_score,
                                  detect_batch=detector.batch_size, device="cpu")
    fx.extract_video(video, {"face": ""}, settings, counting, tar, table)
    print(json.dumps({"detector_frames": counting.requests}))


def run_extract_detector(work: Path, detector: str, n: int, size=(1280, 720), detect_size: int = 640,
                         log=print) -> Cost:
    """One video of ``n`` frames at ``size`` (most Aff-Wild2 videos are 640x360 to 1280x720) extracted
    with ``detector`` at ``detect_size``, every 5th frame detected (the defaults), measured as a stage:
    what ``extract_video_faces`` asks for (workflow/rules/common.smk) comes from this."""
    import torch

    import extract as bench_extract  # bench/extract.py
    from ferflow.extract import read_frames
    from ferflow.retinaface import RetinaFaceDetector, build_retinaface

    work.mkdir(parents=True, exist_ok=True)
    video = work / f"face_{n}_{size[0]}x{size[1]}.mp4"
    if not video.exists():
        face_video(video, n, *size)
    tar, table, log_file = work / f"{detector}_{n}.tar", work / f"{detector}_{n}.parquet", work / f"{detector}_{n}.log"
    if detector == "retinaface":
        torch.manual_seed(0)
        weights = work / "retinaface_random.pth"
        torch.save(build_retinaface().state_dict(), weights)
        probe = next(iter(read_frames(str(video))))[1]
        min_score = bench_extract.calibrate(RetinaFaceDetector(str(weights), detect_size=detect_size), probe, target=10)
        c = measure([sys.executable, str(Path(__file__).resolve()), "--extract-retinaface-child", str(video),
                     str(weights), str(tar), str(table), str(detect_size), str(min_score)], log_file)
        asked = json.loads(log_file.read_text().strip().splitlines()[-1])["detector_frames"]
    else:
        settings = json.dumps({"detector": detector, "detect_size": detect_size, "device": "cpu"})
        c = measure([sys.executable, "-m", "ferflow.extract", "video", "--video", str(video), "--person", "face=",
                     "--settings", settings, "--out-tar", str(tar), "--out-table", str(table)], log_file)
        asked = None
    c.disk_mib = disk_mib(tar, table)
    rows = pl.read_parquet(table)
    found = rows.filter(pl.col("member").is_not_null()).height
    statuses = dict(rows.group_by("status").len().iter_rows())
    log(f"  {detector}, {n} frames {size[0]}x{size[1]} detected at {detect_size}: {fmt_cost(c)}; "
        + (f"detector ran on {asked} frames ({asked / n:.2f} per frame), " if asked is not None else "")
        + f"rows {statuses}, {found} with a crop; {c.cpu_s / n * 1000:.0f} CPU-ms per frame, "
        f"{c.disk_mib * 2**20 / max(1, found) / 1000:.1f} kB on disk per crop")
    return c


# ---- evaluation alone at a given number of scored frames ----------------------------------------
def run_evaluate_only(work: Path, frames: int, log=print) -> Cost:
    """``python -m ferflow.evaluate`` (6 variants, smoothing auto, plots) on ``frames`` scored
    frames of one split: the accounting and predictions of ``bench/evaluate.py``'s generator (its
    mean video of 5,000 frames), written as parquet files."""
    work.mkdir(parents=True, exist_ok=True)
    had = "_RJEM_MALLOC_CONF" in os.environ
    import evaluate as bench_evaluate  # bench/evaluate.py (sets polars' allocator for its own process)

    if not had:  # the stage runs with polars' default allocator, as in the workflow
        os.environ.pop("_RJEM_MALLOC_CONF", None)
    acc, preds = bench_evaluate.make_data(frames, VARIANTS, 5000)
    schemas.write_table(acc, work / "accounting.parquet", schemas.ACCOUNTING)
    paths = []
    for name, df in preds.items():
        paths.append(f"{name}={work / (name + '.parquet')}")
        schemas.write_table(df, work / f"{name}.parquet", schemas.PREDICTIONS)
    del acc, preds
    c = measure([sys.executable, "-m", "ferflow.evaluate", "--predictions", *paths, "--accounting",
                 str(work / "accounting.parquet"), "--split", "validation", "--smoothing", "auto",
                 "--out-dir", str(work / "evaluation")], work / "evaluate.log")
    c.disk_mib = disk_mib(work / "evaluation")
    log(f"  evaluate, {frames:,} scored frames, {VARIANTS} variants: {fmt_cost(c)}")
    return c


# ---- report ------------------------------------------------------------------------------------
def report(runs: list[dict], log=print) -> None:
    fr = [r["frames"] for r in runs]
    log("")
    log("per stage and fraction: wall s / CPU s / peak MiB / disk MiB (* peak from the stage process's VmHWM)")
    head = f"{'stage':16s}" + "".join(f" | {r['fraction'] * 100:g}% ({r['frames']:,} frames)".ljust(44) for r in runs)
    log(head)
    for stage in STAGES:
        cells = []
        for r in runs:
            c = r["costs"].get(stage)
            cells.append(" | " + (f"{c.wall_s:8.1f} {c.cpu_s:8.1f} {c.peak_mib:6.0f}{'*' if c.how == 'hwm' else ' '}"
                                  f" {c.disk_mib:8.1f}" if c else "-").ljust(41))
        log(f"{stage:16s}" + "".join(cells))
    if len(runs) >= 2:
        log("")
        log("growth exponents (slope of log cost vs log frames; <= 1.1 holds): CPU time, wall time, peak memory")
        for stage in STAGES:
            cs = [r["costs"][stage] for r in runs if stage in r["costs"]]
            if len(cs) < 2:
                continue
            pairs = []
            for (a, ca), (b, cb) in zip(list(zip(fr, cs))[:-1], list(zip(fr, cs))[1:]):
                pairs.append(f"{growth_exponent([a, b], [ca.cpu_s, cb.cpu_s]):.2f}/"
                             f"{growth_exponent([a, b], [ca.wall_s, cb.wall_s]):.2f}/"
                             f"{growth_exponent([a, b], [ca.peak_mib, cb.peak_mib]):.2f}")
            log(f"  {stage:16s} " + "   ".join(pairs) + "   (cpu/wall/memory between consecutive fractions)")
    log("")
    log("bytes on disk per frame: faces (tars + tables) per annotated frame, shards (+ accounting) per "
        "written sample, predictions per predicted frame")
    for r in runs:
        c = r["costs"]
        log(f"  {r['fraction'] * 100:g}%: faces {r['faces_mib'] * 2**20 / r['frames']:.0f}  shards "
            + (f"{c['shards'].disk_mib * 2**20 / max(1, r['written']):.0f}" if "shards" in c else "-")
            + "  predictions "
            + (f"{c['predict_write'].disk_mib * 2**20 / max(1, r['predictions_rows']):.1f}"
               if "predict_write" in c else "-"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.01, 0.1, 1.0],
                    help="fractions of full ABAW3 size to run (default 0.01 0.1 1)")
    ap.add_argument("--max-fraction", type=float, default=None, help="leave out fractions above this (CI: 0.01)")
    ap.add_argument("--work", default=None, help="folder for the data and outputs (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep each fraction's data and outputs (default: deleted)")
    ap.add_argument("--extract", action="store_true", help="also measure extraction of 1,000 and 54,000 frames")
    ap.add_argument("--extract-frames", type=int, nargs="+", default=[1000, 54000])
    ap.add_argument("--extract-detectors", nargs="*", default=[], choices=["retinaface", "mtcnn", "haar"],
                    help="also measure extraction of a 1280x720 video with these detectors (RetinaFace: random weights)")
    ap.add_argument("--extract-detector-frames", type=int, default=1000, help="its frames (default 1000)")
    ap.add_argument("--evaluate-frames", type=int, nargs="*", default=[],
                    help="also measure the evaluation alone at these numbers of scored frames (e.g. 3000000)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=None,
                    help="measure only these stages and the ones they need (default all; the inputs, "
                         "the index jobs and the faces are always made)")
    ap.add_argument("--json", help="write the measurements to this JSON file")
    ap.add_argument("--plan-loader", metavar="SHARDS", help=argparse.SUPPRESS)
    ap.add_argument("--extract-retinaface-child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--write-predictions", nargs=3, metavar=("SHARDS", "OUT", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plan_loader:
        plan_loader(args.plan_loader)
        return 0
    if args.extract_retinaface_child:
        video, weights, tar, table, size, min_score = args.extract_retinaface_child
        extract_retinaface_child(video, weights, tar, table, int(size), float(min_score))
        return 0
    if args.write_predictions:
        shards, out, seed = args.write_predictions
        write_predictions(shards, "validation", out, int(seed))
        return 0
    import tempfile

    check_args(ap, args)
    print(load_line(), flush=True)
    base = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        return run_all(args, base)
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line usage errors (exit 2) for values the bench cannot measure, before anything runs."""
    for f in args.fractions:
        if not (math.isfinite(f) and 0 < f <= 1):
            ap.error(f"--fractions: {f:g} is not a fraction of full size in (0, 1]")
    for name in ("extract_frames", "evaluate_frames"):
        for n in getattr(args, name):
            if n < 1:
                ap.error(f"--{name.replace('_', '-')}: {n} frames; give at least 1")
    if args.extract and len(set(args.extract_frames)) < 2:
        ap.error("--extract-frames: give two different lengths (the growth is measured between them)")
    if args.extract_detector_frames < 1:
        ap.error(f"--extract-detector-frames: {args.extract_detector_frames} frames; give at least 1")
    if args.work and Path(args.work).exists() and not Path(args.work).is_dir():
        ap.error(f"--work: {args.work} exists and is not a folder")
    if args.json and (Path(args.json).is_dir() or not Path(args.json).resolve().parent.is_dir()):
        ap.error(f"--json: {args.json} is a folder or its folder does not exist")
    fractions = [f for f in args.fractions if args.max_fraction is None or f <= args.max_fraction]
    if not (fractions or args.extract or args.extract_detectors or args.evaluate_frames):
        ap.error("nothing to measure: no fraction is left (--fractions, --max-fraction) and no "
                 "--extract, --extract-detectors or --evaluate-frames")


def run_all(args: argparse.Namespace, base: Path) -> int:
    fractions = [f for f in args.fractions if args.max_fraction is None or f <= args.max_fraction]
    runs = []
    for f in fractions:
        print(f"fraction {f:g} ({f * 100:g}% of ABAW3):", flush=True)
        work = base / f"f{f:g}"
        try:
            runs.append(run_fraction(work, f, log=lambda s: print(s, flush=True), stages=args.stages))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        print(f"  load average now {os.getloadavg()[0]:.2f}", flush=True)
    if runs:
        report(runs)
    extracted = {}
    if args.extract:
        print("\nextraction (Haar, 160x120 video, detect_size 160):", flush=True)
        try:
            extracted = run_extract(base / "extract", args.extract_frames)
        finally:
            if not args.keep:
                shutil.rmtree(base / "extract", ignore_errors=True)
        (a, ca), (b, cb) = list(extracted.items())[0], list(extracted.items())[-1]
        if b != a:
            print(f"  peak memory {cb.peak_mib:.0f} MiB at {b} frames vs {ca.peak_mib:.0f} MiB at {a} "
                  f"({cb.peak_mib - ca.peak_mib:+.0f} MiB, {(cb.peak_mib - ca.peak_mib) * 2**20 / (b - a):+.0f} bytes "
                  f"per added frame); CPU exponent {growth_exponent([a, b], [ca.cpu_s, cb.cpu_s]):.2f}")
    if args.extract_detectors:
        print("\nextraction per detector (CPU, one thread; RetinaFace: random weights following Haar's boxes):",
              flush=True)
        try:
            for d in args.extract_detectors:
                extracted[f"{d}_{args.extract_detector_frames}"] = run_extract_detector(
                    base / "extract_detectors", d, args.extract_detector_frames)
        finally:
            if not args.keep:
                shutil.rmtree(base / "extract_detectors", ignore_errors=True)
    evaluated = {}
    for n in args.evaluate_frames:
        print(f"\nevaluation alone at {n:,} scored frames:", flush=True)
        try:
            evaluated[n] = run_evaluate_only(base / f"evaluate_{n}", n)
        finally:
            if not args.keep:
                shutil.rmtree(base / f"evaluate_{n}", ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "load": load_line(), "runs": [{**{k: v for k, v in r.items() if k != "costs"},
                                           "costs": {s: vars(c) for s, c in r["costs"].items()}} for r in runs],
            "extract": {n: vars(c) for n, c in extracted.items()},
            "evaluate": {n: vars(c) for n, c in evaluated.items()}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
