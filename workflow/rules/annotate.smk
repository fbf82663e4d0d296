# The trained ensemble on videos (`python -m ferflow.annotate`): one job per video (gpu=1), after
# training and evaluation (for the smoothing windows chosen on validation).
#   snakemake annotate --config annotate_dir=/data/my_videos     every video of a folder
# With the demo, `snakemake` (`make demo`) ends by annotating one demo video (annotate.demo).
ANNOTATE = config["annotate"]
ANNOTATE_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


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
        if ext.lower() in ANNOTATE_SUFFIXES and os.path.isfile(path):
            if stem in found:
                raise ValueError(f"annotate_dir: {found[stem]} and {path} have the same name {stem!r}")
            found[stem] = path
    if not found:
        raise ValueError(f"annotate_dir: {folder} holds no video ({', '.join(ANNOTATE_SUFFIXES)})")
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
    exts = ("parquet", "csv", "png") + (("mp4",) if ANNOTATE["video"] else ())
    return [f"{RESULTS}/annotated/{name}.{ext}" for name in names for ext in exts]


rule annotate:
    # the target: every video of annotate_dir
    localrule: True
    input:
        lambda wc: annotate_outputs(annotate_dir_videos()),


rule annotate_video:
    input:
        video=lambda wc: annotate_videos()[wc.name],
        models=expand(f"{RESULTS}/models/{{variant}}/model.pt", variant=list(VARIANTS)),
        metrics=f"{RESULTS}/evaluation/metrics.json",
    output:
        table=f"{RESULTS}/annotated/{{name}}.parquet",
        csv=f"{RESULTS}/annotated/{{name}}.csv",
        plot=report(f"{RESULTS}/annotated/{{name}}.png", caption="../report/annotated.rst", category="Annotated videos"),
        video=[f"{RESULTS}/annotated/{{name}}.mp4"] if ANNOTATE["video"] else [],
    params:
        models=f"{RESULTS}/models",
        out=f"{RESULTS}/annotated",
        settings=extract_settings(),
        weights=" ".join(f"{name}={w}" for name, w in variant_weights().items()),
        video="--video" if ANNOTATE["video"] else "",
        batch_size=ANNOTATE["batch_size"],
        code=code_version("annotate"),
    log:
        "logs/annotate_video/{name}.log",
    threads: 4  # capped at --cores by Snakemake
    resources:
        mem_mb=8000,
        runtime=6 * 60,
        gpu=1,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m ferflow.annotate {input.video:q} --models {params.models:q}"
        " --metrics {input.metrics:q} --extract-settings {params.settings:q} --weights {params.weights}"
        " --out {params.out:q} {params.video} --batch-size {params.batch_size} --threads {threads} --no-progress"
        " > {log:q} 2>&1"
