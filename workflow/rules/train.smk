# One training job per bagged variant, then its predictions for the evaluation split. A variant with
# `gpus_per_variant: k` (k > 1) asks for k GPUs and runs as k torchrun ranks (DistributedDataParallel):
# `python -m ferflow.devices` claims the k GPUs for the whole job and starts torchrun under the claim.


rule train_variant:
    input:
        shards=f"{RESULTS}/shards",
    output:
        model=f"{RESULTS}/models/{{variant}}/model.pt",
        history=f"{RESULTS}/models/{{variant}}/history.csv",
        steps=f"{RESULTS}/models/{{variant}}/steps.csv",
        curves=report(f"{RESULTS}/models/{{variant}}/curves.png", caption="../report/curves.rst", category="Training", subcategory="{variant}"),
    params:
        settings=lambda wc, output: variant_settings(wc.variant),
        out=lambda wc: f"{RESULTS}/models/{wc.variant}",
        code=code_version("train"),
        **keyed_params("training", variant_setting_keys(), lambda wc: variant_settings_dict(wc.variant)),
        launch=train_launcher,
        rank_threads=lambda wc, threads: max(1, threads // variant_gpus(wc.variant)),
    log:
        "logs/train_variant/{variant}.log",
    threads: lambda wc: 4 * variant_gpus(wc.variant)  # 4 per rank, capped at --cores by Snakemake
    resources:
        mem_mb=lambda wc: 16000 * variant_gpus(wc.variant),
        runtime=24 * 60,
        gpu=lambda wc: variant_gpus(wc.variant),
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "OMP_NUM_THREADS={params.rank_threads} {params.launch} -m ferflow.train --shards {input.shards:q}"
        " --settings {params.settings:q} --out {params.out:q} > {log:q} 2>&1"


# With temporal.enabled the same forward pass also writes the split's per-frame features
# (results/features/{variant}/{split}.parquet), the temporal stage's input (temporal.smk).
rule predict_variant:
    input:
        model=f"{RESULTS}/models/{{variant}}/model.pt",
        shards=f"{RESULTS}/shards",
        **({"accounting": f"{RESULTS}/accounting.parquet"} if TEMPORAL_ON else {}),
    output:
        predictions=f"{RESULTS}/predictions/{{variant}}/{{split}}.parquet",
        **({"features": f"{RESULTS}/features/{{variant}}/{{split}}.parquet"} if TEMPORAL_ON else {}),
    params:
        code=code_version("predict"),
        features=lambda wc, input, output: (f"--features {shlex_quote(output.features)} --accounting "
                                            f"{shlex_quote(input.accounting)}" if TEMPORAL_ON else ""),
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
        " --out {output.predictions:q} {params.features} > {log:q} 2>&1"
