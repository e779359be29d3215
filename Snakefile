# eps: weakly supervised semantic segmentation with EPS, from images to pseudo-masks and mIoU.
# Run: snakemake --cores 2            (default config.yaml: the synthetic world, CPU)
#      snakemake --cores 2 --configfile configs/voc12.yaml
#      snakemake --report results/synthetic/report.html   (after a run: tables, figures, provenance)
# Every rule calls one `eps` subcommand; see docs/architecture.md.

from snakemake.utils import min_version

# the schema, scattergather and executor-plugin interfaces the rules use
min_version("9.0")

# config.yaml is the default run; a --configfile (a preset) replaces it rather than merging
# into it, so a preset never inherits the default run's variants.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


# a variant is one folder of results/{ds}/ (classifier.pt and train_log.csv must not match
# the segmenter's {variant}/{model}/train_log.csv)
wildcard_constraints:
    variant="[^/]+",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/saliency.smk"
include: "workflow/rules/classifier.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# seconds-long bookkeeping jobs: run on the submitting machine, not as cluster jobs
localrules:
    all,
    index,
    summary,
    report_tables,
    export_pngs,
    server_layout,


rule all:
    default_target: True
    input:
        f"{RESULTS}/summary.csv",
        f"{RESULTS}/saliency/{SAL_METHOD}/metrics.json",
        REPORT_TARGETS,
