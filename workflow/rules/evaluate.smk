# Evaluation against ground truth of every mask-producing stage, and the summary across variants.
# Every evaluation has mIoU, per-class scores, the co-occurrence confusion (with context masks)
# and boundary precision / recall / F1 (evaluation.boundary_tolerance, boundary_dir).
# Stages (wildcard {stage}): pseudo_masks, crf (CRF-refined pseudo-masks), segmenter and
# segmenter_crf (segmenter predictions, without / with CRF); STAGE_DIRS (segment.smk) says
# where each keeps its PNGs.


# evaluate-masks options for boundary precision / recall / F1 (the paper's Table 1)
BOUNDARY_ARGS = f"--boundary-tolerance {config['evaluation']['boundary_tolerance']}" + (
    f" --boundary-gt {shlex.quote(str(Path(dataset_root()) / config['evaluation']['boundary_dir']))}"
    if config["evaluation"].get("boundary_dir")
    else ""
)


rule evaluate_saliency:
    input:
        shards=saliency_shards(),
        index=f"{RESULTS}/index.csv",
    output:
        f"{RESULTS}/saliency/{SAL_METHOD}/metrics.json",
    log:
        f"{RESULTS}/logs/saliency/evaluate_{SAL_METHOD}.log",
    conda:
        "../../envs/eps.yaml"
    params:
        code=code_hash("eps/saliency/metrics.py"),
    shell:
        "eps eval-saliency --shards {input.shards} --index {input.index} --out {output} > {log} 2>&1"


rule evaluate_masks:
    input:
        pred=lambda w: f"{RESULTS}/{w.variant}/{STAGE_DIRS[w.stage]}/{w.split}/png",
        index=f"{RESULTS}/index.csv",  # each id's mask and context, the class count beside it
        classes=f"{RESULTS}/classes.json",
    output:
        metrics=f"{RESULTS}/{{variant}}/{{stage}}/{{split}}/metrics.json",
        per_class=f"{RESULTS}/{{variant}}/{{stage}}/{{split}}/per_class.csv",
    log:
        f"{RESULTS}/logs/evaluate_masks/{{variant}}/{{stage}}/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_masks/{{variant}}/{{stage}}/{{split}}.tsv"
    wildcard_constraints:
        variant="[^/]+",
        stage="|".join(STAGE_DIRS),
        split="[^/]+",
    conda:
        "../../envs/eps.yaml"
    threads: stage_threads("evaluate")
    params:
        pairs=pairs_args(),
        boundary=BOUNDARY_ARGS,
        out=subpath(output.metrics, parent=True),
        code=code_hash("eps/metrics.py"),
    shell:
        "eps evaluate-masks --pred {input.pred} --index {input.index} --split {wildcards.split} "
        "{params.pairs} {params.boundary} "
        "--workers {threads} --out {params.out} > {log} 2>&1"


# (variant, stage, split) rows of summary.csv: pseudo-masks (and their CRF) on the first
# evaluation split, the segmenter (and its CRF) on its prediction split
SUMMARY_STAGES = [("pseudo_masks", EVAL_SPLITS[0])]
if CRF_ENABLED:
    SUMMARY_STAGES.append(("crf", EVAL_SPLITS[0]))
if SEG_ENABLED:
    SUMMARY_STAGES.append(("segmenter", SEG_SPLIT))
    if SEG_CRF:
        SUMMARY_STAGES.append(("segmenter_crf", SEG_SPLIT))
SUMMARY_ENTRIES = [
    (v, stage, split)
    for stage, split in SUMMARY_STAGES
    for v in (SEG_VARIANTS if stage.startswith("segmenter") else VARIANTS)
]


rule summary:
    input:
        [f"{RESULTS}/{v}/{stage}/{split}/metrics.json" for v, stage, split in SUMMARY_ENTRIES],
    output:
        report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="1. Tables"),
    log:
        f"{RESULTS}/logs/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/summary.tsv"
    conda:
        "../../envs/eps.yaml"
    params:
        entries=" ".join(
            f"--entry {v}:{stage}:{RESULTS}/{v}/{stage}/{split}/metrics.json" for v, stage, split in SUMMARY_ENTRIES
        ),
        code=code_hash("eps/summary.py"),
    shell:
        "eps summary {params.entries} --out {output} > {log} 2>&1"
