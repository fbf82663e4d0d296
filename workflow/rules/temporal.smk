# The temporal stage (temporal.enabled): per variant, a transformer encoder over windows of the
# variant's per-frame features (written by predict_variant from its forward pass), trained on the
# training split and run on every split the evaluation or the submission needs. It reruns only
# when the features, its code or its settings change (one param per settings key).


rule train_temporal:
    input:
        features=f"{RESULTS}/features/{{variant}}/train.parquet",
        accounting=f"{RESULTS}/accounting.parquet",
    output:
        model=f"{RESULTS}/temporal/{{variant}}/model.pt",
    params:
        settings=lambda wc, output: temporal_settings(),
        code=code_version("temporal"),
        **keyed_params("temporal", TEMPORAL_KEYS, lambda wc: TEMPORAL),
    log:
        "logs/train_temporal/{variant}.log",
    threads: 2
    resources:
        mem_mb=16000,  # the split's features in memory: ~2.1 kB per frame (522 float32), ~3 GB for Aff-Wild2's training split
        runtime=2 * 60,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m ferflow.temporal train --features {input.features:q}"
        " --accounting {input.accounting:q} --settings {params.settings:q} --threads {threads}"
        " --out {output.model:q} > {log:q} 2>&1"


rule predict_temporal:
    input:
        model=f"{RESULTS}/temporal/{{variant}}/model.pt",
        features=f"{RESULTS}/features/{{variant}}/{{split}}.parquet",
    output:
        f"{RESULTS}/temporal/{{variant}}/{{split}}.parquet",
    params:
        code=code_version("temporal"),
    log:
        "logs/predict_temporal/{variant}/{split}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m ferflow.temporal predict --model {input.model:q}"
        " --features {input.features:q} --threads {threads} --out {output:q} > {log:q} 2>&1"
