# Datasets: the synthetic world (generated) and the index every later stage reads.


rule synth:
    output:
        meta=f"{RESULTS}/data/meta.json",
    log:
        f"{RESULTS}/logs/synth.log",
    benchmark:
        f"{RESULTS}/benchmarks/synth.tsv"
    conda:
        "../../envs/eps.yaml"
    params:
        synth=as_json(config["synth"]),
        out=subpath(output.meta, parent=True),
        code=code_hash("eps/data/synthetic.py"),
    shell:
        "eps synth --out {params.out} --params {params.synth:q} > {log} 2>&1"


rule index:
    input:
        index_inputs,
    output:
        csv=f"{RESULTS}/index.csv",
        classes=f"{RESULTS}/classes.json",
        ids=expand(f"{RESULTS}/ids/{{split}}.txt", split=SPLITS),
    log:
        f"{RESULTS}/logs/index.log",
    benchmark:
        f"{RESULTS}/benchmarks/index.tsv"
    conda:
        "../../envs/eps.yaml"
    params:
        dataset=as_json(dataset_block()),
        code=code_hash("eps/data"),
    shell:
        "eps index --dataset {params.dataset:q} --out {output.csv} > {log} 2>&1"
