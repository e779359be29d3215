"""The benchmark scripts (bench/) still run: each with --quick on tiny inputs prints its summary line.

The figures themselves are not checked here (timings on a shared test machine mean
nothing); only that every script runs end to end and ends with ``SUMMARY <name>: ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run_script_raw(name: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_script(name: str, *args: str, timeout: int = 120) -> str:
    proc = run_script_raw(name, *args, timeout=timeout)
    assert proc.returncode == 0, f"bench/{name}.py failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"bench/{name}.py printed nothing"
    assert lines[-1].startswith(f"SUMMARY {name}:"), f"last line of bench/{name}.py: {lines[-1]!r}"
    return proc.stdout


def run_or_skip(name: str, *args: str) -> str:
    """run_script, and a skip (with the script's reason) where it had no data to measure."""
    out = run_script(name, *args)
    last = out.splitlines()[-1]
    if last.startswith(f"SUMMARY {name}: skipped"):
        pytest.skip(f"bench/{name}.py: {last.split(':', 1)[1].strip()}")
    return out


def test_the_benchmarks_of_docs_benchmarks_md_exist():
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")}
    assert {"infer_cams", "evaluate_masks", "crf", "train_step", "disk", "ceiling", "saliency_ecssd", "precision"} <= scripts


def test_infer_cams_quick():
    out = run_script("infer_cams")
    assert "mask agreement" in out and "official loop" in out


def test_evaluate_masks_quick(tmp_path):
    out = run_or_skip("evaluate_masks", "--limit", "24", "--repeats", "1", "--no-single", "--cache", str(tmp_path))
    assert "histograms identical: True" in out


def test_evaluate_masks_skips_without_data(tmp_path):
    out = run_script("evaluate_masks", "--gt-root", str(tmp_path / "absent"), "--cache", str(tmp_path))
    assert out.splitlines()[-1].startswith("SUMMARY evaluate_masks: skipped")


def test_crf_quick():
    out = run_or_skip("crf")
    assert "masks identical across paths: True" in out


def test_train_step_quick():
    out = run_script("train_step")
    assert "peak RSS" in out


def test_disk_quick():
    out = run_script("disk")
    assert "official .npy" in out


def test_ceiling_quick():
    out = run_script("ceiling")
    assert "GFLOP/s" in out


def test_saliency_ecssd_quick():
    out = run_or_skip("saliency_ecssd")
    assert "centre prior" in out and "classical" in out


def test_lite0_quick():
    out = run_script("lite0")
    assert "training step os8" in out and "CRF at scale 0.5" in out


def test_precision_quick():
    out = run_script("precision", "--force")
    assert "pseudo-masks agree on" in out and "training step" in out
    assert "bf16 / float32 small inference" in out.splitlines()[-1]


def test_voc_scale_builds_the_dataset_and_its_dag(tmp_path):
    out = run_or_skip("voc_scale", "--dry-run-only", "--out", str(tmp_path))
    root = tmp_path / "data" / "voc_scale_16"
    train = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert (len(train), len(val)) == (14, 2)  # the train_aug : val proportion of 16
    from PIL import Image

    for image_id in train + val:  # each photo has its official mask's geometry
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as img, \
                Image.open(root / "SegmentationClassAug" / f"{image_id}.png") as mask:
            assert img.size == mask.size
    assert "snakemake -n:" in out and "(shards 2)" in out


def test_photos_scaled_quick(tmp_path):
    out = run_or_skip("photos_scaled", "--out", str(tmp_path / "scaled"))
    assert "10 train and 4 val photos" in out
    root = tmp_path / "scaled" / "voc"
    train = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(train) == 10 and len(set(train)) == 10
    import numpy as np
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    assert set(train) <= set(labels)
    for i in train:
        assert (root / "JPEGImages" / f"{i}.jpg").exists() and (root / "SALImages" / f"{i}.png").exists()
    # a folder that holds anything is refused, nothing in it touched
    again = run_script_raw("photos_scaled", "--out", str(tmp_path / "scaled"))
    assert again.returncode != 0 and "not empty" in again.stderr


def test_photos_scaled_repeats_ids_under_new_names():
    import importlib.util
    spec = importlib.util.spec_from_file_location("photos_scaled", BENCH / "photos_scaled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.repeated_ids(["a", "b"], 5) == [("a", "a"), ("b", "b"), ("a_c1", "a"), ("b_c1", "b"), ("a_c2", "a")]
