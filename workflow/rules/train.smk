# One training job per bagged variant (one GPU each), then its predictions for the evaluation split.
rule train_variant:
    input:
        shards=f"{RESULTS}/shards",
    output:
        model=f"{RESULTS}/models/{{variant}}/model.pt",
        history=f"{RESULTS}/models/{{variant}}/history.csv",
        curves=report(f"{RESULTS}/models/{{variant}}/curves.png", caption="../report/curves.rst", category="Training", subcategory="{variant}"),
    params:
        settings=lambda wc, output: variant_settings(wc.variant),
        out=lambda wc: f"{RESULTS}/models/{wc.variant}",
        code=code_version("train"),
        **keyed_params("training", variant_setting_keys(), lambda wc: variant_settings_dict(wc.variant)),
    log:
        "logs/train_variant/{variant}.log",
    threads: 4  # capped at --cores by Snakemake
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=1,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m ferflow.train --shards {input.shards:q} --settings {params.settings:q}"
        " --out {params.out:q} > {log:q} 2>&1"


rule predict_variant:
    input:
        model=f"{RESULTS}/models/{{variant}}/model.pt",
        shards=f"{RESULTS}/shards",
    output:
        f"{RESULTS}/predictions/{{variant}}/{{split}}.parquet",
    params:
        code=code_version("predict"),
    log:
        "logs/predict_variant/{variant}/{split}.log",
    threads: 4  # capped at --cores by Snakemake
    resources:
        mem_mb=8000,
        runtime=6 * 60,
        gpu=1,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m ferflow.predict --model {input.model:q} --shards {input.shards:q} --split {wildcards.split}"
        " --out {output:q} > {log:q} 2>&1"
