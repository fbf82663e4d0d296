# Soft-voting ensemble over the variants' predictions; metrics per variant and for the ensemble.
EVAL_SPLIT = config["evaluation"]["split"]


rule evaluate_ensemble:
    input:
        predictions=expand(f"{RESULTS}/predictions/{{variant}}/{EVAL_SPLIT}.parquet", variant=list(VARIANTS)),
        accounting=f"{RESULTS}/accounting.parquet",
    output:
        metrics=report(f"{RESULTS}/evaluation/metrics.json", caption="../report/metrics.rst", category="Evaluation"),
        summary=report(f"{RESULTS}/evaluation/summary.txt", caption="../report/summary.rst", category="Evaluation"),
        confusion=report(f"{RESULTS}/evaluation/confusion.png", caption="../report/confusion.rst", category="Evaluation"),
        f1=report(f"{RESULTS}/evaluation/f1_per_class.png", caption="../report/f1.rst", category="Evaluation"),
        va=report(f"{RESULTS}/evaluation/va_hist.png", caption="../report/va.rst", category="Evaluation"),
    params:
        predictions=lambda wc, input: " ".join(
            shlex_quote(f"{name}={path}") for name, path in zip(VARIANTS, input.predictions)
        ),
        weights=" ".join(f"{name}={w}" for name, w in variant_weights().items()),
        out_dir=lambda wc, output: os.path.dirname(output.metrics),
        split=EVAL_SPLIT,
        smoothing=config["evaluation"]["smoothing"],
        code=code_version("evaluate"),
    log:
        "logs/evaluate_ensemble/evaluate_ensemble.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/ferflow.yaml"
    shell:
        "python -m ferflow.evaluate --predictions {params.predictions} --weights {params.weights}"
        " --accounting {input.accounting:q} --split {params.split} --smoothing {params.smoothing}"
        " --out-dir {params.out_dir:q}"
        " > {output.summary:q}.tmp 2> {log:q} && mv {output.summary:q}.tmp {output.summary:q}"
