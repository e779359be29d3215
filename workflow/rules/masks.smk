# Multi-scale CAMs and pseudo-masks (HDF5 shards); their PNG export: export_pngs (segment.smk).


rule infer_cams:
    input:
        index=f"{RESULTS}/index.csv",
        classifier=f"{RESULTS}/{{variant}}/classifier.pt",
    output:
        f"{RESULTS}/{{variant}}/cams/{{split}}/shard-{{scatteritem}}.h5",
    log:
        f"{RESULTS}/logs/infer_cams/{{variant}}/{{split}}/shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/infer_cams/{{variant}}/{{split}}/shard-{{scatteritem}}.tsv"
    conda:
        "../../envs/eps.yaml"
    threads: config["threads"]["infer"]
    resources:
        gpu=1,
    params:
        infer=as_json(with_device(config["infer"])),
        code=code_hash("eps/infer.py", "eps/models"),
    shell:
        "EPS_THREADS={threads} eps infer-cams --index {input.index} --classifier {input.classifier} "
        "--split {wildcards.split} --shard {wildcards.scatteritem} --params {params.infer:q} "
        "--out {output} > {log} 2>&1"


rule pseudo_masks:
    input:
        f"{RESULTS}/{{variant}}/cams/{{split}}/shard-{{scatteritem}}.h5",
    output:
        f"{RESULTS}/{{variant}}/masks/{{split}}/shard-{{scatteritem}}.h5",
    log:
        f"{RESULTS}/logs/pseudo_masks/{{variant}}/{{split}}/shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pseudo_masks/{{variant}}/{{split}}/shard-{{scatteritem}}.tsv"
    conda:
        "../../envs/eps.yaml"
    params:
        masks=as_json(config["pseudo_masks"]),
        dataset=DS,
        code=code_hash("eps/shards.py"),
    shell:
        "eps pseudo-masks --cams {input} --dataset {params.dataset} --params {params.masks:q} --out {output} > {log} 2>&1"
