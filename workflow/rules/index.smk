# One manifest per source: every annotated frame/image, labels mapped to the ABAW space.
rule index_source:
    # seconds of reading annotation files: run by Snakemake itself, not submitted to a cluster
    localrule: index_is_light()
    input:
        index_inputs,
    output:
        f"{RESULTS}/manifest/{{source}}.parquet",
    params:
        source=lambda wc: as_json(SOURCES[wc.source]),
        content=lambda wc: content_param(index_inputs(wc)),  # annotation files and test list, by content
        code=code_version("index"),
    log:
        "logs/index_source/{source}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "python -m ferflow.index --source {params.source:q} --out {output:q} > {log:q} 2>&1"
