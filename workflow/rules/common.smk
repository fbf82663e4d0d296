# Config validation, source/unit tables, input functions and per-stage code versions.
import atexit
import errno
import functools
import hashlib
import re
import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from ferflow import config_check  # noqa: E402  (schema check only)

# One line per problem (key path, what is wrong, closest valid key) instead of Snakemake's message
# with the whole schema; Snakemake's validate then fills in the defaults.
config_check.check_config(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
validate(config, schema="../schemas/config.schema.yaml")

# Jobs run the package in this workflow (the code that code_version() hashes), whether or not
# ferflow is installed where they run: the --sdm conda environment holds only its dependencies.
_SRC_ROOT = str(Path(workflow.basedir) / "src")
_PYTHONPATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if _PYTHONPATH[:1] != [_SRC_ROOT]:
    os.environ.update(PYTHONPATH=os.pathsep.join([_SRC_ROOT, *_PYTHONPATH]))
from ferflow import codeversion, layout  # noqa: E402  (listing and hashing only; no stage code runs at parse time)

RESULTS = config["results"].rstrip("/")
SRC = Path(workflow.basedir) / "src" / "ferflow"
DEMO = config["demo"]
VIDEO_KINDS = {"affwild2"}
IMAGE_KINDS = {"affectnet", "affectnet_npy", "expw", "aihub", "generic"}
SOURCES = {s["name"]: s for s in config["sources"]}
if len(SOURCES) != len(config["sources"]):
    raise ValueError("config.yaml: two sources share a name")

# Per-stage code versions: a stage reruns when the code it runs changes, and only then. The
# modules of a stage are its CLI module and every ferflow module it imports, transitively.
STAGE_ENTRY = {"demo": "demo", "index": "index", "extract": "extract", "shards": "shards",
               "train": "train", "predict": "predict", "evaluate": "evaluate", "annotate": "annotate",
               "export": "export", "report": "report", "temporal": "temporal"}


def code_version(stage):
    """'<stage> code <hash>': the stage's modules without comments and docstrings (ferflow.codeversion)."""
    return f"{stage} code {codeversion.code_version(SRC, STAGE_ENTRY[stage])}"


def as_json(value):
    """Params as sorted JSON strings: stable across runs, so they only trigger on real changes."""
    return json.dumps(value, sort_keys=True)


# ---- content fingerprints ------------------------------------------------------------------
# Snakemake reruns a job whose input is newer than its output; a file replaced by one with an
# older modification time (unzip of a re-released archive, cp -p, rsync -t) would go unnoticed.
# So the jobs that read the user's files carry their content as params: a change of content
# reruns them (and what follows), whatever the mtimes. Annotation files and test lists: a SHA-256
# of the whole file; videos: their size and a SHA-256 of their first and last MiB (a video is never
# read whole for this). Results are cached in .snakemake/ferflow-fingerprints.json, keyed by
# (device, inode, size, mtime, ctime): a replaced file always has a new ctime, so the cache never
# hides a change, and an unchanged dataset costs one stat() per file.
_FINGERPRINTS = Path(".snakemake") / "ferflow-fingerprints.json"
_MIB = 1 << 20


def _load_fingerprints():
    try:
        cached = json.loads(_FINGERPRINTS.read_text())
        return cached if isinstance(cached, dict) else {}
    except (OSError, ValueError):
        return {}


_FP_CACHE = _load_fingerprints()
_FP_NEW = []


def _save_fingerprints():
    """Write the cache (atomically) when new fingerprints were computed in this run."""
    if not _FP_NEW:
        return
    try:
        _FINGERPRINTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = _FINGERPRINTS.with_name(f"{_FINGERPRINTS.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_FP_CACHE, sort_keys=True))
        os.replace(tmp, _FINGERPRINTS)
    except OSError:
        pass  # a cache only: the next run computes the fingerprints again


atexit.register(_save_fingerprints)


def fingerprint(path, whole):
    """``size:sha256`` of the file's content (``whole``), or of its first and last MiB; cached."""
    st = os.stat(path)
    key = f"{'whole' if whole else 'ends'}:{os.path.abspath(path)}"
    stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    hit = _FP_CACHE.get(key)
    if isinstance(hit, list) and len(hit) == 2 and hit[0] == stamp:
        return hit[1]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if whole or st.st_size <= 2 * _MIB:
            for block in iter(lambda: fh.read(_MIB), b""):
                h.update(block)
        else:
            h.update(fh.read(_MIB))
            fh.seek(-_MIB, os.SEEK_END)
            h.update(fh.read(_MIB))
    value = f"{st.st_size}:{h.hexdigest()[:20]}"
    _FP_CACHE[key] = [stamp, value]
    _FP_NEW.append(key)
    return value


def content_param(paths, whole=True):
    """One fingerprint of the user's files among ``paths`` (their paths and contents), for params:
    ``"<n> files <digest>"``. Files the workflow generates (the demo data) and folders are left to
    Snakemake's own checks. Params must not be functions of ``input`` (Snakemake does not record
    those), so rules call it on their input functions."""
    found = {p: fingerprint(p, whole) for p in sorted(set(map(str, paths)))
             if not is_demo_path(p) and os.path.isfile(p)}
    return f"{len(found)} files {hashlib.sha256(as_json(found).encode()).hexdigest()[:20]}"
def keyed_params(prefix, keys, settings_of):
    """One param per settings key, valued '<prefix>.<key>=<JSON value>' (settings_of(wildcards) gives
    the settings dict), so that Snakemake's rerun reason ("Params have changed ... before: ... now:
    ...") names only the keys that changed. The rule hands the whole settings to its stage as a
    param that also takes `output`, which Snakemake leaves out of that comparison."""
    return {f"{prefix}_{key}": (lambda wc, key=key: f"{prefix}.{key}={as_json(settings_of(wc).get(key))}")
            for key in sorted(keys)}


# ---- demo data ---------------------------------------------------------------------------
def demo_plan():
    from ferflow import demo

    return demo.plan(DEMO["size"])


def is_demo_path(path):
    if not DEMO["enabled"]:
        return False
    root = os.path.abspath(DEMO["root"])
    return os.path.abspath(path) == root or os.path.abspath(path).startswith(root + os.sep)


def demo_files():
    return [os.path.join(DEMO["root"], f) for f in demo_plan().files]


def check_paths():
    """Every path the config names must exist before any job starts (paths under the demo root
    exist only once make_demo has run); the error names the config key and the path."""
    problems = []

    def need(where, path, kind):
        if path is None or is_demo_path(path):
            return
        ok = os.path.isfile(path) if kind == "file" else os.path.isdir(path)
        if not ok:
            exists = "is not a " + ("file" if kind == "file" else "folder") if os.path.exists(path) else "does not exist"
            problems.append(f"{where}: {path} {exists}")

    for i, src in enumerate(config["sources"]):
        where = f"sources[{i}] ({src['name']})"
        need(f"{where}.root", src["root"], "file" if src["kind"] == "generic" else "dir")
        if src["kind"] == "affwild2" and not src.get("videos"):
            need(f"{where}.videos (default: <root>/videos)", os.path.join(src["root"], "videos"), "dir")
        else:
            need(f"{where}.videos", src.get("videos"), "dir")
        need(f"{where}.test_list", src.get("test_list"), "file")
        if src["kind"] == "affwild2" and os.path.isdir(src["root"]) and not is_demo_path(src["root"]):
            task_dirs = [layout.AFFWILD2_TASK_DIRS[t] for t in src.get("tasks", ["expr", "va"])]
            if not src.get("test_list") and not any(os.path.isdir(os.path.join(src["root"], d)) for d in task_dirs):
                problems.append(f"{where}.root: {src['root']} holds none of {', '.join(d + '/' for d in task_dirs)}")
    for where, settings in [("training", config.get("training", {}))] + [
            (f"variants[{i}] ({v['name']})", v) for i, v in enumerate(config["variants"])]:
        if settings.get("pretrained"):
            need(f"{where}.pretrained.path", settings["pretrained"]["path"], "file")
    weights = config["extract"].get("retinaface_weights")
    if config["extract"]["detector"] == "retinaface" and weights and "://" not in weights:
        need("extract.retinaface_weights", weights, "file")
    if problems:
        raise ValueError("config: paths that do not exist or are of the wrong kind:\n  " + "\n  ".join(problems))


check_paths()


# ---- sources and units ---------------------------------------------------------------------
def video_units(name):
    """Aff-Wild2 units (video file + annotated people + test-list videos), from the demo plan or the disk."""
    src = SOURCES[name]
    listing = demo_files() if is_demo_path(src["root"]) else None
    tests = layout.read_test_list(src["test_list"]) if src.get("test_list") else None
    return layout.affwild2_units(src["root"], src.get("videos"), src.get("splits"), src.get("tasks", ["expr", "va"]), listing, tests)


_UNITS = {}


def units(name):
    if name not in _UNITS:
        src = SOURCES[name]
        if src["kind"] in VIDEO_KINDS:
            _UNITS[name] = {u.unit: u for u in video_units(name) if u.video_path is not None}
        else:
            _UNITS[name] = {u: None for u in layout.image_units(src["chunks"])}
    return _UNITS[name]


def index_inputs(wildcards):
    src = SOURCES[wildcards.source]
    extra = [src["test_list"]] if src.get("test_list") else []
    if is_demo_path(src["root"]):
        return demo_files() + extra
    if src["kind"] in VIDEO_KINDS:
        return sorted(f for u in video_units(wildcards.source) for a in u.annotations for f in a.files.values()) + extra
    splits = src.get("splits")
    if src["kind"] == "affectnet":
        used = [n for n, s in (splits or {"training": 0, "validation": 0}).items() if s is not None]
        return [os.path.join(src["root"], "Manually_Annotated_file_lists", f"{n}.csv") for n in used]
    if src["kind"] == "affectnet_npy":  # the annotation folders (their entries, not 4 files per image)
        return layout.affectnet_npy_folders(src["root"], splits)
    if src["kind"] == "aihub":
        return layout.aihub_label_files(src["root"], splits)
    if src["kind"] == "expw":
        return [os.path.join(src["root"], "label", "label.lst")]
    return [src["root"]]


def index_videos(wildcards):
    """The video files of a video source: the index opens each (missing, empty or unusable videos
    stop the run, config on_unusable_input), so a replaced video reruns it. Demo videos are in
    index_inputs already."""
    src = SOURCES[wildcards.source]
    if src["kind"] not in VIDEO_KINDS or is_demo_path(src["root"]):
        return []
    return sorted(u.video_path for u in video_units(wildcards.source) if u.video_path)


def index_is_light():
    """Indexing reads only annotation files (seconds) unless a source takes its face boxes from the
    images themselves (image headers, e.g. 300k AffectNet crops): then it runs as a cluster job."""
    return all(s["kind"] in {"affwild2", "affectnet", "expw"} for s in SOURCES.values())


def video_path(wildcards):
    return units(wildcards.source)[wildcards.unit].video_path


def person_args(wildcards):
    unit = units(wildcards.source)[wildcards.unit]
    return " ".join(f"--person {shlex_quote(a.name + '=' + a.person)}" for a in unit.annotations)


def extract_mode(wildcards):
    """`video` (detect faces), or `cropped --root DIR` for Aff-Wild2's own cropped_aligned faces."""
    cropped = SOURCES[wildcards.source].get("cropped_aligned")
    return f"cropped --root {shlex_quote(cropped)}" if cropped else "video"


def shlex_quote(text):
    import shlex

    return shlex.quote(text)


def faces_tables():
    return [f"{RESULTS}/faces/{name}/{unit}.parquet" for name in SOURCES for unit in units(name)]


def faces_tars():
    return [f"{RESULTS}/faces/{name}/{unit}.tar" for name in SOURCES for unit in units(name)]


def extract_settings(wildcards=None, output=None):
    return as_json(config["extract"])


def uses_gpu_detector():
    """1 for a detector that runs on a GPU when there is one, unless told to use the CPU."""
    extract = config["extract"]
    return 1 if extract["detector"] in ("retinaface", "mtcnn") and extract["device"] != "cpu" else 0


def _alternatives(names):
    """A wildcard constraint matching exactly one of names (nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


# ---- temporal stage (temporal.smk) -----------------------------------------------------------
TEMPORAL = config["temporal"]
TEMPORAL_ON = bool(TEMPORAL["enabled"])
TEMPORAL_KEYS = sorted(k for k in TEMPORAL if k != "enabled")
if config["evaluation"]["submission_source"] == "temporal" and not TEMPORAL_ON:
    raise ValueError("config: evaluation.submission_source is temporal, but temporal.enabled is false")


def temporal_settings():
    """The settings of the temporal heads (without `enabled`) as sorted JSON."""
    return as_json({k: TEMPORAL[k] for k in TEMPORAL_KEYS})


def temporal_arg(paths):
    """`--temporal NAME=PATH ...` for the given temporal predictions, or "" when there are none;
    paths in the order of the variants."""
    if not paths:
        return ""
    pairs = " ".join(shlex_quote(f"{name}={path}") for name, path in zip(VARIANTS, paths))
    return f"--temporal {pairs}"


# ---- variants ------------------------------------------------------------------------------
VARIANTS = {v["name"]: v for v in config["variants"]}
if len(VARIANTS) != len(config["variants"]):
    raise ValueError("config.yaml: two variants share a name")


def variant_settings_dict(name):
    settings = dict(config.get("training", {}))
    settings.update({k: v for k, v in VARIANTS[name].items() if k != "weight"})
    return settings


def variant_settings(name):
    return as_json(variant_settings_dict(name))


def variant_setting_keys():
    return set(config.get("training", {})).union(*VARIANTS.values()) - {"weight"}


def variant_weights():
    return {name: v.get("weight", 1.0) for name, v in VARIANTS.items()}


def test_lists():
    return [s["test_list"] for s in config["sources"] if s.get("test_list")]


def test_faces_tables():
    """FACES tables of the units holding test-list videos (their real frame counts)."""
    tables = []
    for name, src in SOURCES.items():
        if src.get("test_list"):
            tests = set(layout.read_test_list(src["test_list"]))
            tables += [f"{RESULTS}/faces/{name}/{u}.parquet" for u, unit in units(name).items()
                       if any(a.name in tests for a in unit.annotations)]
    return tables


def final_outputs():
    outputs = [f"{RESULTS}/evaluation/metrics.json", f"{RESULTS}/report/summary.html"]
    if test_lists():
        outputs.append(f"{RESULTS}/submission/metrics.json")
    return outputs + annotate_outputs(annotate_demo_videos())


def print_summary():
    for path in (f"{RESULTS}/accounting.txt", f"{RESULTS}/evaluation/summary.txt"):
        if os.path.exists(path):
            print(Path(path).read_text(), file=sys.stderr)


# ---- videos to annotate (annotate.smk) ----------------------------------------------------
ANNOTATE = config["annotate"]


def annotate_dir_videos():
    """{name: path} of the videos of config annotate_dir (names: file names without extension)."""
    folder = config.get("annotate_dir")
    if not folder:
        raise ValueError("annotate: no folder given; run `snakemake annotate --config annotate_dir=FOLDER`")
    if not os.path.isdir(folder):
        raise ValueError(f"annotate_dir: {folder} is not a folder")
    found = {}
    for f in sorted(os.listdir(folder)):
        path = os.path.join(folder, f)
        stem, ext = os.path.splitext(f)
        if ext.lower() in layout.VIDEO_EXTENSIONS and os.path.isfile(path):
            if stem in found:
                raise ValueError(f"annotate_dir: {found[stem]} and {path} have the same name {stem!r}")
            found[stem] = path
    if not found:
        extensions = " ".join(layout.VIDEO_EXTENSIONS)
        raise ValueError(f"annotate_dir: {folder} holds no video ({extensions})")
    return found


def annotate_demo_videos():
    """{name: path} of the demo video annotated at the end of the demo: its first two-person video."""
    if not (DEMO["enabled"] and ANNOTATE["demo"]):
        return {}
    unit = next(u for u in demo_plan().units if len(u.annotations) > 1)
    return {unit.stem: os.path.join(DEMO["root"], unit.file)}


def annotate_videos():
    videos = dict(annotate_demo_videos())
    if config.get("annotate_dir"):
        videos.update(annotate_dir_videos())
    return videos


def annotate_outputs(names):
    exts = ["parquet", "csv", "png", *(["mp4"] if ANNOTATE["video"] else [])]
    return [f"{RESULTS}/annotated/{name}.{ext}" for name in names for ext in exts]

wildcard_constraints:
    variant="[A-Za-z0-9_-]+",
    split="train|validation|test",


# ---- training launch (train.smk) --------------------------------------------------------
def variant_gpus(name):
    return int(variant_settings_dict(name).get("gpus_per_variant", 1))


def train_launcher(wildcards):
    k = variant_gpus(wildcards.variant)
    if k == 1:
        return "python"
    return (f"python -m ferflow.devices --gpus {k} -- python -m torch.distributed.run --standalone"
            f" --nproc-per-node {k}")


# ---- resources from measurements (bench/scale.py; docs/running.md, "Sizing") ----------------------
# Memory of the stages that hold the tables of a whole dataset grows with their input, so the rules ask
# for it as a function of the size of their input: Snakemake evaluates such a function once the inputs
# exist (a FileNotFoundError before then defers it), so a cluster job asks for what its data needs.
# The factors are the peak resident memory that bench/scale.py measured per MB of input at full
# ABAW3 size (2.8M Aff-Wild2 frames, 290k AffectNet, 90k ExpW rows), with headroom.
def files_mb(paths):
    """Total size in MB of the files (folders: their files) in ``paths``."""
    total = 0
    for p in paths:
        if os.path.isdir(p):
            total += sum(e.stat().st_size for e in os.scandir(p) if e.is_file())
        else:
            total += os.path.getsize(p)  # FileNotFoundError: Snakemake asks again once it exists
    return total / 1e6


# index: MB of peak memory per MB of annotation files. Measured at full size: Aff-Wild2 1590 MB for
# 33 MB of EXPR/VA files (48/MB), AffectNet 634 MB for its 255 MB csv (2.5/MB), ExpW 200 MB for a
# 4.5 MB label.lst (44/MB); other kinds: the factor of Aff-Wild2.
INDEX_MB_PER_INPUT_MB = {"affwild2": 60, "affectnet": 4, "expw": 60}


def index_mem_mb(wildcards):
    src = SOURCES[wildcards.source]
    files = [f for f in index_inputs(wildcards) if not is_demo_path(f)]
    return int(1000 + INDEX_MB_PER_INPUT_MB.get(src["kind"], 60) * files_mb(files))


# shards: peak memory per MB of manifests (2.85 GB measured for 3.2M rows in 11.7 MB of parquet at
# full size: 245/MB); disk: the shards are a copy of the crops (1565 vs 1490 bytes per sample
# measured), plus labels and accounting.
SHARDS_MB_PER_MANIFEST_MB = 250


def shards_mem_mb(wildcards, input):
    return int(1000 + SHARDS_MB_PER_MANIFEST_MB * files_mb(input.manifests))


def shards_disk_mb(wildcards, input):
    return int(1000 + 1.2 * files_mb(input.tars))


# shards time: CPU per MB of manifests (211-283 CPU-s for 11.7 MB at full size alone, 403 on a busy
# machine: 35 s/MB) plus copying the crops, which the 16x16 crops of the bench do not measure: 50 MB/s
# assumed for the shared filesystem of a cluster (full ABAW3 with 224 px crops of 10-17 kB: 30-50 GB,
# 10-17 minutes).
SHARDS_CPU_S_PER_MANIFEST_MB = 35
SHARDS_COPY_MB_PER_S = 50


def shards_runtime(wildcards, input):
    """Minutes: twice the measured CPU time and the copy time, plus 10."""
    seconds = SHARDS_CPU_S_PER_MANIFEST_MB * files_mb(input.manifests) + files_mb(input.tars) / SHARDS_COPY_MB_PER_S
    return int(10 + 2 * seconds / 60)


# evaluation: peak memory per MB of prediction files and accounting (1.4 GB measured for 6 variants
# of 3M scored frames, about 700 MB of predictions and accounting: 2/MB; asked: twice that).
EVAL_MB_PER_INPUT_MB = 4


def evaluate_mem_mb(wildcards, input):
    return int(1000 + EVAL_MB_PER_INPUT_MB * files_mb([*input.predictions, *input.temporal, input.accounting]))


# extraction (extract_video_faces, one job per video): its time grows with the frames of the video, its
# memory does not (bench/scale.py --extract for the growth, --extract-detectors for the per-frame
# cost). Measured per detector on a 1280x720 video detected at 640, every 5th frame, CPU, one thread
# (threads: 1 in the rule): decoding every frame, the detector on ~0.21 frames per frame (keyframes and
# re-detections), cropping and JPEG-writing every frame. Measured 2026-11-30 on the 2-CPU VM: CPU ms
# per frame / peak MiB: RetinaFace ResNet-50 149 / 1070, MTCNN 43 / 1277, Haar 32 / 191. On a GPU the
# detection is far cheaper; these CPU figures are then an upper bound (no GPU was measured).
# The cropped_aligned faces of Aff-Wild2 (no detection) were not measured apart: the Haar figures, an
# upper bound.
EXTRACT_CPU_S_PER_FRAME = {"retinaface": 0.15, "mtcnn": 0.045, "haar": 0.035, "cropped": 0.035}
EXTRACT_PEAK_MB = {"retinaface": 1100, "mtcnn": 1300, "haar": 200, "cropped": 200}
EXTRACT_CROP_KB = 20  # disk per crop: 224 px JPEG at quality 90 (16-17 kB measured) and its table row
EXTRACT_DEFAULT_FRAMES = 54000  # a unit whose length cannot be read yet: 30 minutes at 30 fps


@functools.lru_cache(maxsize=None)
def _lines(path):
    with open(path, "rb") as fh:
        return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))


@functools.lru_cache(maxsize=None)
def _container_frames(path):
    import cv2  # only for test-list videos, which have no annotation file to count

    cap = cv2.VideoCapture(path)
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    finally:
        cap.release()
    return n or EXTRACT_DEFAULT_FRAMES


def unit_frames(wildcards):
    """Frames of the video of an Aff-Wild2 unit, for the resources of its job: the longest of its
    annotation files (one line per frame, plus a header) or, for a test-list video without one, the
    count its container states. Before the video exists (a demo video, until make_demo ran), a FileNotFoundError
    naming it, an input of the job: Snakemake then evaluates the resources once it exists."""
    unit = units(wildcards.source)[wildcards.unit]
    if not os.path.exists(unit.video_path):
        raise FileNotFoundError(errno.ENOENT, "not written yet", unit.video_path)
    files = [f for a in unit.annotations for f in a.files.values() if os.path.isfile(f)]
    if files:
        return max(_lines(f) for f in files)
    return _container_frames(unit.video_path)


def _extract_kind(wildcards):
    return "cropped" if SOURCES[wildcards.source].get("cropped_aligned") else config["extract"]["detector"]


def extract_runtime(wildcards):
    """Minutes: twice the measured CPU time of the frames of the unit (slower nodes, busy disks), plus
    10; detecting more often than every 5th frame costs proportionally more."""
    kind = _extract_kind(wildcards)
    more_often = max(1.0, 5 / config["extract"]["detect_every"]) if kind != "cropped" else 1.0
    per_frame = EXTRACT_CPU_S_PER_FRAME[kind] * more_often
    return int(10 + 2 * unit_frames(wildcards) * per_frame / 60)


def extract_mem_mb(wildcards):
    return int(1.5 * EXTRACT_PEAK_MB[_extract_kind(wildcards)] + 500)


def extract_disk_mb(wildcards):
    persons = len(units(wildcards.source)[wildcards.unit].annotations)
    return int(100 + unit_frames(wildcards) * max(1, persons) * EXTRACT_CROP_KB / 1000)
