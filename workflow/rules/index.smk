# One manifest per source: every annotated frame/image, labels mapped to the ABAW space.
rule index_source:
    # seconds of reading annotation files and opening each video: run by Snakemake itself, not submitted to a cluster
    localrule: index_is_light()
    input:
        annotations=index_inputs,
        videos=index_videos,
    output:
        manifest=f"{RESULTS}/manifest/{{source}}.parquet",
        issues=f"{RESULTS}/issues/{{source}}.parquet",
    params:
        source=lambda wc, output: as_json(SOURCES[wc.source]),
        on_unusable=config["on_unusable_input"],
        content=lambda wc: content_param(index_inputs(wc)),  # annotation files and test list, by content
        code=code_version("index"),
        **keyed_params("source", set().union(*SOURCES.values()), lambda wc: SOURCES[wc.source]),
    log:
        "logs/index_source/{source}.log",
    threads: 1
    resources:
        # measured (bench/scale.py, full ABAW3): Aff-Wild2 1590 MB peak, 11 s CPU; AffectNet 634 MB
        mem_mb=index_mem_mb,
        runtime=20,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "python -m ferflow.index --source {params.source:q} --out {output.manifest:q} --issues {output.issues:q}"
        " --on-unusable-input {params.on_unusable} > {log:q} 2>&1"
