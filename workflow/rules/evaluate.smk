# Evaluation of pseudo-masks against ground truth, and the summary across variants.


rule evaluate_masks:
    input:
        pred=f"{RESULTS}/{{variant}}/masks/{{split}}/png",
        ids=f"{RESULTS}/ids/{{split}}.txt",
        classes=f"{RESULTS}/classes.json",
    output:
        metrics=f"{RESULTS}/{{variant}}/pseudo_masks/{{split}}/metrics.json",
        per_class=f"{RESULTS}/{{variant}}/pseudo_masks/{{split}}/per_class.csv",
    params:
        gt=gt_dir(),
        num_classes=lambda w, input: len(json.load(open(input.classes))["classes"]) + 1,
        context=context_args(),
        out=subpath(output.metrics, parent=True),
        code=code_hash(*COMMON_CODE, "eps/metrics.py"),
    threads: config["threads"]["evaluate"]
    log:
        f"{RESULTS}/logs/evaluate_masks/{{variant}}/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_masks/{{variant}}/{{split}}.tsv"
    conda:
        "../../envs/eps.yaml"
    shell:
        "eps evaluate-masks --pred {input.pred} --gt {params.gt} --ids {input.ids} "
        "--num-classes {params.num_classes} --classes {input.classes} {params.context} "
        "--workers {threads} --out {params.out} > {log} 2>&1"


rule summary:
    input:
        expand(
            f"{RESULTS}/{{variant}}/pseudo_masks/{{split}}/metrics.json",
            variant=VARIANTS,
            split=EVAL_SPLITS[:1],
        ),
    output:
        f"{RESULTS}/summary.csv",
    params:
        entries=" ".join(
            f"--entry {v}:pseudo_masks:{RESULTS}/{v}/pseudo_masks/{EVAL_SPLITS[0]}/metrics.json"
            for v in VARIANTS
        ),
        code=code_hash(*COMMON_CODE, "eps/summary.py"),
    log:
        f"{RESULTS}/logs/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/summary.tsv"
    conda:
        "../../envs/eps.yaml"
    shell:
        "eps summary {params.entries} --out {output} > {log} 2>&1"
