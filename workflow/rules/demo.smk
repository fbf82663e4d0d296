# The embedded demo data: generated (deterministically, in seconds) when config demo.enabled.
if DEMO["enabled"]:

    rule make_demo:
        # seconds of work: run by Snakemake itself, never submitted to a cluster
        localrule: True
        output:
            demo_files(),
        params:
            root=lambda wc, output: DEMO["root"],
            seed=DEMO["seed"],
            size=DEMO["size"],
            code=code_version("demo"),
        log:
            "logs/make_demo/make_demo.log",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        conda:
            "../../envs/ferflow.yaml"
        shell:
            "python -m ferflow.demo --root {params.root:q} --seed {params.seed} --size {params.size} > {log:q} 2>&1"
