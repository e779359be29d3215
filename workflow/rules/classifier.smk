# Classifier training: one job per variant (cam baseline, eps, ablations).


rule train_classifier:
    input:
        index=f"{RESULTS}/index.csv",
        saliency=train_saliency,
    output:
        model=f"{RESULTS}/{{variant}}/classifier.pt",
        meta=f"{RESULTS}/{{variant}}/classifier.json",
        train_log=f"{RESULTS}/{{variant}}/train_log.csv",
    log:
        f"{RESULTS}/logs/train_classifier/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_classifier/{{variant}}.tsv"
    conda:
        "../../envs/eps.yaml"
    threads: config["threads"]["train"]
    resources:
        # the variant's `gpus`: DistributedDataParallel over that many GPUs in this one job
        gpu=lambda w: variant_params(w.variant).get("gpus", 1),
    params:
        classifier=lambda w: as_json(variant_params(w.variant)),
        split=config["train_split"],
        code=code_hash("eps/train.py", "eps/losses.py", "eps/models"),
    shell:
        "EPS_THREADS={threads} eps train-classifier --index {input.index} --split {params.split} "
        "--saliency {input.saliency} --params {params.classifier:q} --out {output.model} > {log} 2>&1"
