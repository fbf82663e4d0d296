# Config validation, source/unit tables, input functions and per-stage code versions.
import hashlib
import re
import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from ferflow import layout  # noqa: E402  (listing only; no stage code runs at parse time)

RESULTS = config["results"].rstrip("/")
SRC = Path(workflow.basedir) / "src" / "ferflow"
DEMO = config["demo"]
VIDEO_KINDS = {"affwild2"}
IMAGE_KINDS = {"affectnet", "expw", "generic"}
SOURCES = {s["name"]: s for s in config["sources"]}
if len(SOURCES) != len(config["sources"]):
    raise ValueError("config.yaml: two sources share a name")

# Per-stage code versions: a stage reruns when the modules it runs change, and only then.
STAGE_MODULES = {
    "demo": ["demo"],
    "index": ["index", "layout", "labels", "schemas"],
    "extract": ["extract", "faces", "detect", "retinaface", "schemas", "atomic"],
    "shards": ["shards", "schemas", "atomic"],
    "train": ["train", "data", "model", "losses", "weights", "devices", "metrics", "labels", "schemas", "atomic"],
    "predict": ["predict", "data", "model", "weights", "devices", "schemas", "atomic"],
    "evaluate": ["evaluate", "metrics", "plots", "labels", "schemas", "atomic"],
}


def code_version(stage):
    h = hashlib.sha256()
    for module in STAGE_MODULES[stage]:
        path = SRC / f"{module}.py"
        h.update(module.encode())
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:16]


def as_json(value):
    """Params as sorted JSON strings: stable across runs, so they only trigger on real changes."""
    return json.dumps(value, sort_keys=True)


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


# ---- sources and units ---------------------------------------------------------------------
def video_units(name):
    """Aff-Wild2 units (video file + annotated people), from the demo plan or the disk."""
    src = SOURCES[name]
    listing = demo_files() if is_demo_path(src["root"]) else None
    return layout.affwild2_units(src["root"], src.get("videos"), src.get("splits"), src.get("tasks", ["expr", "va"]), listing)


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
    if is_demo_path(src["root"]):
        return demo_files()
    if src["kind"] in VIDEO_KINDS:
        return sorted(f for u in video_units(wildcards.source) for a in u.annotations for f in a.files.values())
    if src["kind"] == "affectnet":
        return [os.path.join(src["root"], "Manually_Annotated_file_lists", f"{n}.csv") for n in src.get("splits", {"training": 0, "validation": 0})]
    if src["kind"] == "expw":
        return [os.path.join(src["root"], "label", "label.lst")]
    return [src["root"]]


def video_path(wildcards):
    return units(wildcards.source)[wildcards.unit].video_path


def person_args(wildcards):
    unit = units(wildcards.source)[wildcards.unit]
    return " ".join(f"--person {shlex_quote(a.name + '=' + a.person)}" for a in unit.annotations)


def shlex_quote(text):
    import shlex

    return shlex.quote(text)


def faces_tables():
    return [f"{RESULTS}/faces/{name}/{unit}.parquet" for name in SOURCES for unit in units(name)]


def faces_tars():
    return [f"{RESULTS}/faces/{name}/{unit}.tar" for name in SOURCES for unit in units(name)]


def extract_settings():
    return as_json(config["extract"])


def uses_gpu_detector():
    return 1 if config["extract"]["detector"] == "retinaface" else 0


# ---- variants ------------------------------------------------------------------------------
VARIANTS = {v["name"]: v for v in config["variants"]}
if len(VARIANTS) != len(config["variants"]):
    raise ValueError("config.yaml: two variants share a name")


def variant_settings(name):
    settings = dict(config.get("training", {}))
    settings.update({k: v for k, v in VARIANTS[name].items() if k != "weight"})
    return as_json(settings)


def variant_weights():
    return {name: v.get("weight", 1.0) for name, v in VARIANTS.items()}


def final_outputs():
    return [f"{RESULTS}/evaluation/metrics.json"]


def print_summary():
    for path in (f"{RESULTS}/accounting.txt", f"{RESULTS}/evaluation/summary.txt"):
        if os.path.exists(path):
            print(Path(path).read_text(), file=sys.stderr)


wildcard_constraints:
    variant="[A-Za-z0-9_-]+",
    split="train|validation|test",
