# Refinement and segmentation: dense CRF of pseudo-masks, DeepLab trained on pseudo-masks,
# multi-scale + flip prediction (optionally CRF-refined), the PNG export of every mask stage.
# See docs/segmentation.md.

# the crf block with the pseudo-mask threshold, the one key for the background of both
CRF = {**config["crf"], "bg_threshold": config["pseudo_masks"]["bg_threshold"]}
CRF_ENABLED = bool(CRF["enabled"])
SEG = config["segmenter"]
SEG_ENABLED = bool(SEG["enabled"])
SEG_NAME = SEG["model"]
SEG_PRED = SEG["predict"]
SEG_SPLIT = SEG_PRED["split"]
SEG_CRF = bool(SEG_PRED["crf"])
SEG_DIR = f"{RESULTS}/{{variant}}/{SEG_NAME}"
# the variants a segmenter is trained for (segmenter.variants; null = every variant)
SEG_VARIANTS = list(SEG.get("variants") or VARIANTS)
for _v in SEG_VARIANTS:
    if _v not in VARIANTS:
        raise ValueError(f"segmenter.variants: unknown variant {_v!r} (variants: {', '.join(VARIANTS)})")

# where each evaluated stage keeps its PNGs, relative to results/{ds}/{variant}/
STAGE_DIRS = {
    "pseudo_masks": "masks",
    "crf": "masks_crf",
    "segmenter": f"{SEG_NAME}/pred",
    "segmenter_crf": f"{SEG_NAME}/pred_crf",
}

# the segmenter block as train-segmenter receives it: without the prediction sub-block
SEG_TRAIN = with_device({k: v for k, v in SEG.items() if k not in ("predict", "variants")})
# init_pretraining: classifier = the backbone of the variant's own trained classifier
SEG_FROM_CLASSIFIER = SEG["init_pretraining"] == "classifier"
if SEG_FROM_CLASSIFIER and SEG["weights"]:
    raise ValueError(
        "segmenter.weights: must be null with init_pretraining: classifier "
        "(the variant's classifier.pt is the weights file)"
    )


PREDICT_OUTPUTS = {"pred": f"{SEG_DIR}/pred/{{split}}/shard-{{scatteritem}}.h5"}
if SEG_CRF:
    PREDICT_OUTPUTS["crf"] = f"{SEG_DIR}/pred_crf/{{split}}/shard-{{scatteritem}}.h5"


rule crf:
    input:
        cams=f"{RESULTS}/{{variant}}/cams/{{split}}/shard-{{scatteritem}}.h5",
        index=f"{RESULTS}/index.csv",
    output:
        f"{RESULTS}/{{variant}}/masks_crf/{{split}}/shard-{{scatteritem}}.h5",
    log:
        f"{RESULTS}/logs/crf/{{variant}}/{{split}}/shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/crf/{{variant}}/{{split}}/shard-{{scatteritem}}.tsv"
    wildcard_constraints:
        variant="[^/]+",
        split="[^/]+",
    conda:
        "../../envs/eps.yaml"
    threads: stage_threads("crf")
    params:
        crf=as_json(CRF),
        dataset=DS,
        code=code_hash("eps/crf.py"),
    shell:
        "eps crf --cams {input.cams} --index {input.index} --dataset {params.dataset} "
        "--params {params.crf:q} --workers {threads} --out {output} > {log} 2>&1"


# One export for every stage whose masks are shards: pseudo-masks, their CRF and the
# segmenter's predictions (with or without CRF); {kind} is the stage's folder (STAGE_DIRS).
rule export_pngs:
    input:
        gather.shard(f"{RESULTS}/{{{{variant}}}}/{{{{kind}}}}/{{{{split}}}}/shard-{{scatteritem}}.h5"),
    output:
        directory(f"{RESULTS}/{{variant}}/{{kind}}/{{split}}/png"),
    log:
        f"{RESULTS}/logs/export_pngs/{{variant}}/{{kind}}/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/export_pngs/{{variant}}/{{kind}}/{{split}}.tsv"
    wildcard_constraints:
        variant="[^/]+",
        kind="|".join(re.escape(d) for d in STAGE_DIRS.values()),
        split="[^/]+",
    conda:
        "../../envs/eps.yaml"
    params:
        dataset=DS,
        code=code_hash("eps/shards.py"),
    shell:
        "eps export-masks --masks {input} --dataset {params.dataset} --out {output} > {log} 2>&1"


rule train_segmenter:
    input:
        index=f"{RESULTS}/index.csv",
        # the exported pseudo-masks (or their CRF) of the split the classifier trained on
        masks=lambda w: f"{RESULTS}/{w.variant}/{SEG['pseudo_labels']}/{config['train_split']}/png",
        classifier=lambda w: [f"{RESULTS}/{w.variant}/classifier.pt"] if SEG_FROM_CLASSIFIER else [],
    output:
        model=f"{SEG_DIR}/model.pt",
        meta=f"{SEG_DIR}/model.json",
        train_log=f"{SEG_DIR}/train_log.csv",
    log:
        f"{RESULTS}/logs/train_segmenter/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_segmenter/{{variant}}.tsv"
    wildcard_constraints:
        variant="[^/]+",
    conda:
        "../../envs/eps.yaml"
    threads: config["threads"].get("segmenter") or config["threads"]["train"]
    resources:
        gpu=1,
    params:
        # with init_pretraining: classifier, the variant's classifier.pt is the weights file
        segmenter=lambda w: as_json(
            {**SEG_TRAIN, "weights": f"{RESULTS}/{w.variant}/classifier.pt"} if SEG_FROM_CLASSIFIER else SEG_TRAIN
        ),
        split=config["train_split"],
        code=code_hash("eps/segment.py", "eps/models"),
    shell:
        "EPS_THREADS={threads} eps train-segmenter --index {input.index} --masks {input.masks} "
        "--split {params.split} --params {params.segmenter:q} --out {output.model} > {log} 2>&1"


rule predict:
    input:
        index=f"{RESULTS}/index.csv",
        model=f"{SEG_DIR}/model.pt",
    output:
        **PREDICT_OUTPUTS,
    log:
        f"{RESULTS}/logs/predict/{{variant}}/{{split}}/shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict/{{variant}}/{{split}}/shard-{{scatteritem}}.tsv"
    wildcard_constraints:
        variant="[^/]+",
        split="[^/]+",
    conda:
        "../../envs/eps.yaml"
    threads: config["threads"]["infer"]
    resources:
        gpu=1,
    params:
        predict=as_json(with_device(SEG_PRED)),
        # --crf (the crf block's kernel) and --crf-out when predictions are CRF-refined
        crf=lambda w, output: (
            f"--crf {shlex.quote(as_json(CRF))} --crf-out {shlex.quote(str(output.crf))}" if SEG_CRF else ""
        ),
        code=code_hash("eps/predict.py", "eps/models"),
    shell:
        "EPS_THREADS={threads} eps predict --index {input.index} --model {input.model} "
        "--split {wildcards.split} --shard {wildcards.scatteritem} --params {params.predict:q} "
        "{params.crf} --workers {threads} --out {output.pred} > {log} 2>&1"


# Test-set predictions in the layout of the PASCAL VOC evaluation server (only with
# segmenter.predict.test_split set): `snakemake --cores N server_layout`, then archive
# results/{ds}/{variant}/{segmenter}/server/results/ and upload it.
rule server_export:
    input:
        gather.shard(
            f"{RESULTS}/{{{{variant}}}}/{SEG_NAME}/{'pred_crf' if SEG_CRF else 'pred'}/"
            f"{{{{split}}}}/shard-{{scatteritem}}.h5"
        ),
    output:
        directory(f"{SEG_DIR}/server/{{split}}/results/VOC2012/Segmentation/comp6_test_cls"),
    log:
        f"{RESULTS}/logs/server_export/{{variant}}/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/server_export/{{variant}}/{{split}}.tsv"
    wildcard_constraints:
        variant="[^/]+",
        split="[^/]+",
    conda:
        "../../envs/eps.yaml"
    params:
        dataset=DS,
        code=code_hash("eps/shards.py"),
    shell:
        "eps export-masks --masks {input} --dataset {params.dataset} --out {output} > {log} 2>&1"


rule server_layout:
    input:
        expand(
            f"{RESULTS}/{{variant}}/{SEG_NAME}/server/{{split}}/results/VOC2012/Segmentation/comp6_test_cls",
            variant=SEG_VARIANTS,
            split=[SEG_PRED["test_split"]] if SEG_PRED["test_split"] else [],
        ),
