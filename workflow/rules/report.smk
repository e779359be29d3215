# The report: tables of summary.csv and figures (eps/report.py), marked for
# `snakemake --report results/{ds}/report.html` (captions in workflow/report/).

REPORT = config["report"]
REPORT_DIR = f"{RESULTS}/report"
REPORT_SPLIT = EVAL_SPLITS[0]
REPORT_BASELINE = REPORT.get("baseline") or ("cam" if "cam" in VARIANTS else VARIANTS[0])
REPORT_METHOD = REPORT.get("method") or ("eps" if "eps" in VARIANTS else VARIANTS[-1])
for _role, _name in (("baseline", REPORT_BASELINE), ("method", REPORT_METHOD)):
    if _name not in VARIANTS:
        raise ValueError(f"report.{_role}: unknown variant {_name!r} (variants: {', '.join(VARIANTS)})")

# every (variant, stage) of summary.csv gets a per-class bar chart: (variant, stage, metrics.json)
REPORT_BARS = [(v, stage, f"{RESULTS}/{v}/{stage}/{split}/metrics.json") for v, stage, split in SUMMARY_ENTRIES]
REPORT_FIGURES = {
    "curves": f"{REPORT_DIR}/training_curves.png",
    "qualitative": f"{REPORT_DIR}/qualitative.png",
    "variants": f"{REPORT_DIR}/variants.png",
}
if SEG_ENABLED:
    REPORT_FIGURES["seg_curves"] = f"{REPORT_DIR}/segmenter_curves.png"
# segmenter training logs by variant
REPORT_SEG_LOGS = {v: f"{RESULTS}/{v}/{SEG_NAME}/train_log.csv" for v in SEG_VARIANTS} if SEG_ENABLED else {}
if SEG_ENABLED and REPORT_METHOD not in SEG_VARIANTS:
    raise ValueError(f"segmenter.variants: must include the report's method {REPORT_METHOD!r}")
REPORT_TARGETS = [f"{RESULTS}/tables.md", f"{REPORT_DIR}/tables.html", *REPORT_FIGURES.values()] + [
    f"{REPORT_DIR}/per_class/{v}_{stage}.png" for v, stage, _ in REPORT_BARS
]


rule report_tables:
    input:
        f"{RESULTS}/summary.csv",
    output:
        md=report(f"{RESULTS}/tables.md", caption="../report/tables.rst", category="1. Tables"),
        html=report(f"{REPORT_DIR}/tables.html", caption="../report/tables.rst", category="1. Tables"),
    log:
        f"{RESULTS}/logs/report_tables.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_tables.tsv"
    conda:
        "../../envs/eps.yaml"
    params:
        code=code_hash("eps/report.py"),
    shell:
        "eps report-tables --summary {input} --out {output.md} --html {output.html} > {log} 2>&1"


rule report_figures:
    input:
        index=f"{RESULTS}/index.csv",
        metrics=[path for _, _, path in REPORT_BARS],
        train_logs=expand(f"{RESULTS}/{{variant}}/train_log.csv", variant=VARIANTS),
        seg_logs=list(REPORT_SEG_LOGS.values()),
        masks=expand(f"{RESULTS}/{{variant}}/masks/{REPORT_SPLIT}/png", variant=VARIANTS),
        classifier=f"{RESULTS}/{REPORT_METHOD}/classifier.pt",
        segmenter=[f"{RESULTS}/{REPORT_METHOD}/{SEG_NAME}/model.pt"] if SEG_ENABLED else [],
        saliency=saliency_shards(),
    output:
        bars=[
            report(
                f"{REPORT_DIR}/per_class/{v}_{stage}.png",
                caption="../report/per_class.rst",
                category="3. Per-class IoU",
                subcategory=stage,
                labels={"variant": v, "stage": stage},
            )
            for v, stage, _ in REPORT_BARS
        ],
        curves=report(REPORT_FIGURES["curves"], caption="../report/training_curves.rst", category="4. Training"),
        seg_curves=(
            [report(REPORT_FIGURES["seg_curves"], caption="../report/segmenter_curves.rst", category="4. Training")]
            if SEG_ENABLED
            else []
        ),
        qualitative=report(
            REPORT_FIGURES["qualitative"], caption="../report/qualitative.rst", category="2. Qualitative"
        ),
        variants=report(REPORT_FIGURES["variants"], caption="../report/variants.rst", category="2. Qualitative"),
    log:
        f"{RESULTS}/logs/report_figures.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_figures.tsv"
    conda:
        "../../envs/eps.yaml"
    threads: 1
    params:
        report=as_json(REPORT),
        predict=as_json(SEG_PRED),
        split=REPORT_SPLIT,
        out=subpath(output.qualitative, parent=True),
        metrics=" ".join(f"--metrics {v}:{stage}:{path}" for v, stage, path in REPORT_BARS),
        train_logs=" ".join(f"--train-log {v}:{RESULTS}/{v}/train_log.csv" for v in VARIANTS),
        seg_logs=" ".join(f"--seg-log {v}:{path}" for v, path in REPORT_SEG_LOGS.items()),
        masks=" ".join(f"--masks {v}:{RESULTS}/{v}/masks/{REPORT_SPLIT}/png" for v in VARIANTS),
        segmenter=f"--segmenter {RESULTS}/{REPORT_METHOD}/{SEG_NAME}/model.pt" if SEG_ENABLED else "",
        code=code_hash("eps/report.py", "eps/predict.py", "eps/models"),  # predict: its defaults
    shell:
        "EPS_THREADS={threads} eps report-figures --index {input.index} --split {params.split} "
        "{params.metrics} {params.train_logs} {params.seg_logs} {params.masks} "
        "--classifier {input.classifier} {params.segmenter} --saliency {input.saliency} "
        "--params {params.report:q} --predict-params {params.predict:q} --out {params.out} > {log} 2>&1"
