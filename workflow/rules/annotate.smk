# The trained ensemble on videos (`python -m ferflow.annotate`): one job per video (gpu=1), after
# training and evaluation (for the smoothing windows chosen on validation).
#   snakemake annotate --config annotate_dir=/data/my_videos     every video of a folder
# With the demo, `snakemake` (`make demo`) ends by annotating one demo video (annotate.demo).
# The videos and outputs are listed in common.smk.
rule annotate:
    # the target: every video of annotate_dir
    localrule: True
    input:
        lambda wc: annotate_outputs(annotate_dir_videos()),


rule annotate_video:
    wildcard_constraints:
        name="[^/]+",
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
        models=lambda wc, input: os.path.dirname(os.path.dirname(input.models[0])),
        out=lambda wc, output: os.path.dirname(output.table),
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


# The ensemble as one ONNX file (`python -m ferflow.export`), on request: `snakemake results/ensemble.onnx`.
rule export_onnx:
    input:
        models=expand(f"{RESULTS}/models/{{variant}}/model.pt", variant=list(VARIANTS)),
        metrics=f"{RESULTS}/evaluation/metrics.json",
    output:
        f"{RESULTS}/ensemble.onnx",
    params:
        models=lambda wc, input: os.path.dirname(os.path.dirname(input.models[0])),
        settings=extract_settings(),
        weights=" ".join(f"{name}={w}" for name, w in variant_weights().items()),
        code=code_version("export"),
    log:
        "logs/export_onnx/export_onnx.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/ferflow-onnx.yaml"
    shell:
        "python -m ferflow.export --models {params.models:q} --metrics {input.metrics:q}"
        " --extract-settings {params.settings:q} --weights {params.weights} --out {output:q} > {log:q} 2>&1"
