# Soft-voting ensemble over the variants' predictions; metrics per variant and for the ensemble
# (and, with temporal.enabled, the same for the temporal heads' predictions).
EVAL_SPLIT = config["evaluation"]["split"]



rule evaluate_ensemble:
    input:
        predictions=expand(f"{RESULTS}/predictions/{{variant}}/{EVAL_SPLIT}.parquet", variant=list(VARIANTS)),
        accounting=f"{RESULTS}/accounting.parquet",
        temporal=expand(f"{RESULTS}/temporal/{{variant}}/{EVAL_SPLIT}.parquet", variant=list(VARIANTS) if TEMPORAL_ON else []),
    output:
        metrics=report(f"{RESULTS}/evaluation/metrics.json", caption="../report/metrics.rst", category="Evaluation"),
        summary=report(f"{RESULTS}/evaluation/summary.txt", caption="../report/summary.rst", category="Evaluation"),
        confusion=report(f"{RESULTS}/evaluation/confusion.png", caption="../report/confusion.rst", category="Evaluation"),
        f1=report(f"{RESULTS}/evaluation/f1_per_class.png", caption="../report/f1.rst", category="Evaluation"),
        va=report(f"{RESULTS}/evaluation/va_hist.png", caption="../report/va.rst", category="Evaluation"),
        ensemble=f"{RESULTS}/evaluation/ensemble_{EVAL_SPLIT}.parquet",
    params:
        predictions=lambda wc, input: " ".join(
            shlex_quote(f"{name}={path}") for name, path in zip(VARIANTS, input.predictions)
        ),
        weights=" ".join(f"{name}={w}" for name, w in variant_weights().items()),
        out_dir=lambda wc, output: os.path.dirname(output.metrics),
        split=EVAL_SPLIT,
        smoothing=config["evaluation"]["smoothing"],
        temporal=lambda wc, input: temporal_arg(input.temporal),
        code=code_version("evaluate"),
    log:
        "logs/evaluate_ensemble/evaluate_ensemble.log",
    threads: 1
    resources:
        # from the predictions' and accounting's size (common.smk): 1.4 GB measured for 6 variants of
        # 3M scored frames, 41 s CPU (bench/scale.py --evaluate-frames 3000000)
        mem_mb=evaluate_mem_mb,
        runtime=60,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "python -m ferflow.evaluate --predictions {params.predictions} --weights {params.weights}"
        " --accounting {input.accounting:q} --split {params.split} --smoothing {params.smoothing}"
        " {params.temporal} --out-dir {params.out_dir:q}"
        " > {output.summary:q}.tmp 2> {log:q} && mv {output.summary:q}.tmp {output.summary:q}"


# ABAW3 submission files for the videos of the test lists (only when a source has a test_list):
# the ensemble predicts every frame, smoothed with the windows chosen on the evaluation split.
rule export_submission:
    input:
        predictions=expand(f"{RESULTS}/predictions/{{variant}}/test.parquet", variant=list(VARIANTS)),
        accounting=f"{RESULTS}/accounting.parquet",
        metrics=f"{RESULTS}/evaluation/metrics.json",
        test_lists=test_lists(),
        frame_counts=test_faces_tables(),
        temporal=expand(f"{RESULTS}/temporal/{{variant}}/test.parquet",
                        variant=list(VARIANTS) if config["evaluation"]["submission_source"] == "temporal" else []),
    output:
        submission=directory(f"{RESULTS}/submission/abaw3"),
        metrics=f"{RESULTS}/submission/metrics.json",
    params:
        predictions=lambda wc, input: " ".join(
            shlex_quote(f"{name}={path}") for name, path in zip(VARIANTS, input.predictions)
        ),
        weights=" ".join(f"{name}={w}" for name, w in variant_weights().items()),
        out_dir=lambda wc, output: os.path.dirname(output.metrics),
        content=content_param(test_lists()),
        temporal=lambda wc, input: temporal_arg(input.temporal),
        source=config["evaluation"]["submission_source"],
        code=code_version("evaluate"),
    log:
        "logs/export_submission/export_submission.log",
    threads: 1
    resources:
        # from the predictions' and accounting's size (common.smk): 1.4 GB measured for 6 variants of
        # 3M scored frames, 41 s CPU (bench/scale.py --evaluate-frames 3000000)
        mem_mb=evaluate_mem_mb,
        runtime=60,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "cat {input.test_lists:q} > {params.out_dir:q}/test_list.txt && "
        "python -m ferflow.evaluate --predictions {params.predictions} --weights {params.weights}"
        " --accounting {input.accounting:q} --split test --smoothing-from {input.metrics:q} --no-plots"
        " {params.temporal} --submission-source {params.source}"
        " --out-dir {params.out_dir:q} --submission-dir {output.submission:q}"
        " --test-list {params.out_dir:q}/test_list.txt --frame-counts {input.frame_counts:q} > {log:q} 2>&1"
