# eps: weakly supervised semantic segmentation with EPS, from images to pseudo-masks and mIoU.
# Run: snakemake --cores 2            (default config.yaml: the synthetic world, CPU)
#      snakemake --cores 2 --configfile configs/voc12.yaml
# Every rule calls one `eps` subcommand; see docs/architecture.md.

configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/saliency.smk"
include: "workflow/rules/classifier.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        f"{RESULTS}/summary.csv",
    default_target: True
