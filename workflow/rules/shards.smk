# WebDataset shards per split, labels.parquet, and the accounting of every annotated frame.
rule write_shards:
    input:
        manifests=expand(f"{RESULTS}/manifest/{{source}}.parquet", source=list(SOURCES)),
        issues=expand(f"{RESULTS}/issues/{{source}}.parquet", source=list(SOURCES)),
        tables=faces_tables(),
        tars=faces_tars(),
    output:
        shards=directory(f"{RESULTS}/shards"),
        accounting=f"{RESULTS}/accounting.parquet",
        summary=f"{RESULTS}/accounting.txt",
    params:
        samples_per_shard=lambda wc, output: config["shards"]["samples_per_shard"],
        seed=lambda wc, output: config["shards"]["seed"],
        code=code_version("shards"),
        **keyed_params("shards", config["shards"], lambda wc: config["shards"]),
    log:
        "logs/write_shards/write_shards.log",
    threads: 1
    resources:
        # from the size of the manifests and crops (common.smk); disk: a copy of the crops. Measured
        # (bench/scale.py): see docs/running.md, "Sizing".
        mem_mb=shards_mem_mb,
        disk_mb=shards_disk_mb,
        runtime=shards_runtime,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "python -m ferflow.shards --manifest {input.manifests:q} --faces {input.tables:q} --issues {input.issues:q}"
        " --out {output.shards:q} --accounting {output.accounting:q}"
        " --samples-per-shard {params.samples_per_shard} --seed {params.seed}"
        " --summary {output.summary:q} > {log:q} 2>&1"
