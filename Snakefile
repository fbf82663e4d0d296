# ferflow: videos -> faces -> shards -> bagged DAN variants -> soft-voting ensemble metrics.
# This file is only wiring; each stage lives in workflow/rules/<stage>.smk and calls
# `python -m ferflow.<stage>` (see README.md).
from snakemake.utils import min_version

min_version("8.20")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/temporal.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/annotate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True


onsuccess:
    print_summary()
