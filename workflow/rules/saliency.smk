# Saliency maps, sharded by image. `usps` first self-trains its network on the dataset's own
# training images (rule train_saliency); `pfan` / `dss` / `csnet` read the weights file of the config.


rule train_saliency:
    input:
        index=f"{RESULTS}/index.csv",
    output:
        f"{RESULTS}/saliency/usps/model.pt",
    log:
        f"{RESULTS}/logs/saliency/train_usps.log",
    benchmark:
        f"{RESULTS}/benchmarks/saliency/train_usps.tsv"
    conda:
        "../../envs/eps.yaml"
    threads: config["threads"]["train"]
    resources:
        gpu=1,
    params:
        train=as_json(config["saliency"]["train"]),
        split=config["train_split"],
        device=config["device"],
        code=code_hash("eps/saliency/training.py", "eps/saliency/usps.py"),
    shell:
        "EPS_THREADS={threads} eps train-saliency --method usps --index {input.index} --split {params.split} "
        "--params {params.train:q} --device {params.device} --out {output} > {log} 2>&1"


rule saliency:
    input:
        index=f"{RESULTS}/index.csv",
        weights=saliency_weights,
    output:
        f"{RESULTS}/saliency/{{method}}/shard-{{scatteritem}}.h5",
    log:
        f"{RESULTS}/logs/saliency/{{method}}/shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/saliency/{{method}}/shard-{{scatteritem}}.tsv"
    conda:
        "../../envs/eps.yaml"
    threads: config["threads"]["infer"]
    resources:
        gpu=lambda w: 1 if w.method in ("usps", "pfan", "dss", "csnet") else 0,
    params:
        strict="--strict" if config["saliency"]["strict"] else "",
        weights=lambda w, input: f"--weights {shlex.quote(str(input.weights[0]))}" if input.weights else "",
        device=config["device"],
        code=lambda w: saliency_code(w.method),
    shell:
        "EPS_THREADS={threads} eps saliency --index {input.index} --method {wildcards.method} "
        "--shard {wildcards.scatteritem} {params.weights} --device {params.device} "
        "{params.strict} --out {output} > {log} 2>&1"
