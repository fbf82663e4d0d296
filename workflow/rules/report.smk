# The first page of `snakemake --report` (metrics, per-video, class support and accounting tables)
# and the per-video figures, from the evaluation's outputs.
rule report_evaluation:
    input:
        metrics=f"{RESULTS}/evaluation/metrics.json",
        ensemble=f"{RESULTS}/evaluation/ensemble_{EVAL_SPLIT}.parquet",
        accounting=f"{RESULTS}/accounting.parquet",
    output:
        summary=report(f"{RESULTS}/report/summary.html", caption="../report/summary_html.rst", category="Evaluation",
                       labels={"figure": "tables: metrics, per video, class support, accounting"}),
        per_video_csv=report(f"{RESULTS}/report/per_video.csv", caption="../report/per_video.rst", category="Evaluation",
                             labels={"figure": "per-video scores (csv)"}),
        per_video=report(f"{RESULTS}/report/per_video.png", caption="../report/per_video.rst", category="Evaluation",
                         labels={"figure": "per-video scores, worst first"}),
        va_over_time=report(f"{RESULTS}/report/va_over_time.png", caption="../report/va_over_time.rst",
                            category="Evaluation", labels={"figure": "valence/arousal over time"}),
        class_support=report(f"{RESULTS}/report/class_support.png", caption="../report/class_support.rst",
                             category="Data", labels={"figure": "class support per split"}),
    params:
        out_dir=lambda wc, output: os.path.dirname(output.summary),
        video_sources=" ".join(shlex_quote(n) for n, s in SOURCES.items() if s["kind"] in VIDEO_KINDS),
        code=code_version("report"),
    log:
        "logs/report_evaluation/report_evaluation.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "python -m ferflow.report --metrics {input.metrics:q} --ensemble {input.ensemble:q}"
        " --accounting {input.accounting:q} --video-sources {params.video_sources} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"
