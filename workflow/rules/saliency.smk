# Saliency maps, sharded by image.


rule saliency:
    input:
        index=f"{RESULTS}/index.csv",
    output:
        f"{RESULTS}/saliency/{{method}}/shard-{{scatteritem}}.h5",
    params:
        strict="--strict" if config["saliency"]["strict"] else "",
        code=code_hash(*COMMON_CODE, "eps/saliency"),
    log:
        f"{RESULTS}/logs/saliency/{{method}}/shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/saliency/{{method}}/shard-{{scatteritem}}.tsv"
    conda:
        "../../envs/eps.yaml"
    shell:
        "eps saliency --index {input.index} --method {wildcards.method} --shard {wildcards.scatteritem} "
        "{params.strict} --out {output} > {log} 2>&1"
