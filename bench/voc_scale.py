"""A VOC-scale rehearsal: the workflow's CPU stages over a dataset with the exact ids, image
sizes, masks and image-level labels of VOC 2012 train_aug + val.

The photos are not at hand, so the pixels are made from the official masks (each class a
colour, with seeded per-pixel texture; void grey): ``../shared/data/voc12_masks`` holds all
12,031 masks and the label file. ``--images N`` takes the first N ids in the proportion of
train_aug to val (10,582 : 1,449; default 1,000); ``--images 0``, all of them. The dataset is written once
under ``--out`` (JPEG, quality 90; the masks folder is a link to the shared one).

The run is the workflow itself (``snakemake --cores C``) with the ``configs/voc12_cpu.yaml``
settings for the per-image stages: ``classical`` saliency, CAM inference at scales 0.5 / 0.75
with flips and pseudo-masks for two EPS variants (the ``small`` backbone from scratch and
``efficientnet_lite0`` from ImageNet, each trained for ``--iterations``: a short-trained
classifier is enough), the CRF, evaluation of both on ``train``; no segmenter. Per stage,
from the rules' benchmark files: images per CPU-second and per wall-second (summed over
the stage's jobs), peak RSS of its largest job, bytes on disk per image of its outputs.
Also ``snakemake -n`` (the DAG) at that size. Run it at two sizes: the cost per image should
stay flat, and no job's memory should grow with the dataset (``shards`` sets the job count).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import numpy as np  # noqa: E402

FULL = (10582, 1449)  # train_aug, val
STAGES = {  # rule -> folder of its outputs under results/{ds} (for bytes per image)
    "saliency": "saliency/classical",
    "infer_cams": "{v}/cams",
    "pseudo_masks": "{v}/masks",
    "crf": "{v}/masks_crf",
    "export_pngs masks": "{v}/masks/train/png",
    "export_pngs masks_crf": "{v}/masks_crf/train/png",
    "evaluate_masks": "{v}/pseudo_masks",
}


def palette() -> np.ndarray:
    rng = np.random.default_rng(12031)
    colours = rng.integers(30, 226, (256, 3)).astype(np.int16)
    colours[255] = 128  # void
    return colours


def make_dataset(shared: Path, root: Path, count: int | None) -> tuple[int, int]:
    """VOC-layout folder: JPEGImages made from the masks, the masks (a link), labels, splits."""
    from PIL import Image

    meta = shared / "data" / "voc12_masks" / "metadata"
    masks = shared / "data" / "voc12_masks" / "SegmentationClassAug"
    train = (meta / "train_aug.txt").read_text().split()
    val = (meta / "val.txt").read_text().split()
    if count is not None:
        n_train = max(1, round(count * FULL[0] / sum(FULL)))
        train, val = train[:n_train], val[:max(1, count - n_train)]
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    if not (root / "SegmentationClassAug").exists():
        (root / "SegmentationClassAug").symlink_to(masks.resolve(), target_is_directory=True)
    labels = np.load(meta / "cls_labels.npy", allow_pickle=True).item()
    np.save(root / "cls_labels.npy", {i: labels[i] for i in train + val})
    colours = palette()
    t0 = time.perf_counter()
    for k, image_id in enumerate(train + val):
        path = root / "JPEGImages" / f"{image_id}.jpg"
        if path.is_file():
            continue
        mask = np.asarray(Image.open(masks / f"{image_id}.png"))
        rng = np.random.default_rng(zlib.crc32(image_id.encode()))
        pixels = colours[mask] + rng.integers(-25, 26, mask.shape + (3,), dtype=np.int16)
        tmp = path.with_suffix(".tmp.jpg")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(tmp, quality=90)
        tmp.replace(path)
        if (k + 1) % 1000 == 0:
            print(f"  {k + 1} images written ({time.perf_counter() - t0:.0f} s)", flush=True)
    for name, ids in (("train", train), ("val", val)):
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return len(train), len(val)


def write_overlay(path: Path, name: str, root: Path, args) -> Path:
    """Over configs/voc12_cpu.yaml: this dataset, `classical` saliency, two short-trained EPS
    variants (its cam / eps replaced), no segmenter."""
    import yaml

    variants = {"small": {"loss": "eps", "backbone": "small", "crop": 96, "resize_long": [88, 112]},
                "lite0": {"loss": "eps"}}
    overlay = {
        "dataset": {"name": name, "root": str(root), "saliency_dir": None},
        "shards": args.shards,
        "saliency": {"method": "classical"},
        "classifier": {"iterations": args.iterations, "checkpoint_every": args.iterations},
        "variants": {"cam": None, "eps": None, **{k: variants[k] for k in args.variants}},
        "segmenter": {"enabled": False, "variants": None},
    }
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return path


def snakemake(args, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = _common.snakemake_env()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(_common.ROOT / "Snakefile"), *args],
                          cwd=cwd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, proc


def bench_rows(results: Path, variants) -> dict:
    """(rule, variant or "") -> {jobs, wall, cpu, rss}: the run's benchmark files, summed."""
    out: dict[tuple, dict] = {}
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        parts = tsv.relative_to(results / "benchmarks").with_suffix("").parts
        variant = parts[1] if len(parts) > 1 and parts[1] in variants else ""
        # export_pngs/{variant}/{kind}/{split}: one row per mask kind (kind may hold a "/")
        rule = f"{parts[0]} {'/'.join(parts[2:-1])}" if parts[0] == "export_pngs" else parts[0]
        with open(tsv) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        acc = out.setdefault((rule, variant), {"jobs": 0, "wall": 0.0, "cpu": 0.0, "rss": 0.0})
        acc["jobs"] += 1
        acc["wall"] += float(row["s"])
        acc["cpu"] += float(row["cpu_time"])
        acc["rss"] = max(acc["rss"], float(row["max_rss"]))
    return out


def disk_bytes(results: Path, folder: str, variant: str) -> int:
    base = results / folder.format(v=variant)
    return sum(p.stat().st_size for p in base.rglob("*") if p.is_file()) if base.is_dir() else 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="the first N ids; 0 = all 12,031 (hours on 2 cores)")
    parser.add_argument("--out", type=Path, default=_common.ROOT / "results" / "bench_voc_scale",
                        help="dataset and run folder")
    parser.add_argument("--shards", type=int, default=8, help="jobs per per-image stage")
    parser.add_argument("--cores", type=int, default=0, help="snakemake --cores (0 = the usable cores)")
    parser.add_argument("--iterations", type=int, default=20, help="classifier iterations (short: speed only)")
    parser.add_argument("--variants", nargs="+", default=["small", "lite0"], choices=["small", "lite0"])
    parser.add_argument("--dry-run-only", action="store_true", help="build the dataset, time snakemake -n, stop")
    parser.add_argument("--quick", action="store_true", help="16 images, small backbone, 2 iterations (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.shards, args.iterations, args.variants = 16, 2, 2, ["small"]
    _common.header("voc_scale", argv=argv)
    shared = _common.shared_dir()
    if shared is None or not (shared / "data" / "voc12_masks" / "metadata").is_dir():
        _common.summary("voc_scale: skipped (../shared/data/voc12_masks not found)")
        return
    args.images = args.images or None
    size = args.images or sum(FULL)
    name = f"voc_scale_{size}"
    work = args.out.resolve()
    root = work / "data" / name
    t0 = time.perf_counter()
    n_train, n_val = make_dataset(shared, root, args.images)
    print(f"dataset: {n_train} train + {n_val} val images in {root} ({time.perf_counter() - t0:.0f} s)")
    overlay = write_overlay(work / f"{name}.yaml", name, root, args)
    run = work / "run"
    run.mkdir(parents=True, exist_ok=True)
    cores = args.cores or _common.cores()
    preset = _common.ROOT / "configs" / "voc12_cpu.yaml"
    common = ["--configfile", str(preset), str(overlay), "--cores", str(cores), "--directory", str(run)]
    target = [f"results/{name}/summary.csv"]
    dry_s, proc = snakemake(["-n", *target, *common], run)
    if proc.returncode != 0:
        sys.exit(f"voc_scale: snakemake -n failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    jobs = next((line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("total")), "?")
    print(f"snakemake -n: {dry_s:.1f} s, {jobs} jobs (shards {args.shards})")
    if args.dry_run_only:
        _common.summary(f"voc_scale: {n_train + n_val} images, snakemake -n {dry_s:.1f} s for {jobs} jobs")
        return
    wall, proc = snakemake([*target, *common], run)
    if proc.returncode != 0:
        sys.exit(f"voc_scale: the run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    record = work / f"{name}.json"
    if "Nothing to be done" in proc.stdout + proc.stderr and record.is_file():
        old = json.loads(record.read_text())  # a finished run: its table again
        wall, jobs = old["wall"], old["jobs"]
    results = run / "results" / name
    rows = bench_rows(results, args.variants)
    print(f"whole run: {wall:.0f} s wall on {cores} cores")
    print("| stage | variant | jobs | images | CPU-s per image | images per wall-s (summed over jobs) "
          "| peak RSS (MB) | bytes on disk per image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    order = ["index", "saliency", "train_classifier", *[r for r in STAGES if r != "saliency"]]
    for (rule, variant), r in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order
                                                                   else len(order), kv[0][1])):
        if rule not in order:
            continue
        if rule == "train_classifier":  # a fixed cost: iterations, not images
            print(f"| {rule} | {variant} | {r['jobs']} | fixed | fixed | | {r['rss']:.0f} | |")
            continue
        count = n_train + n_val if rule in ("index", "saliency") else n_train
        if rule == "evaluate_masks":
            count *= 2  # pseudo-masks and CRF
        disk = disk_bytes(results, STAGES[rule], variant) / count if rule in STAGES else 0
        print(f"| {rule} | {variant} | {r['jobs']} | {count} | {r['cpu'] / count:.3f} "
              f"| {count / max(r['wall'], 1e-9):.1f} | {r['rss']:.0f} | {disk:,.0f} |")
    record.write_text(json.dumps({"images": [n_train, n_val], "wall": wall, "dry_run": dry_s, "jobs": jobs,
                                  "rules": {f"{k[0]} {k[1]}".strip(): v for k, v in rows.items()}}, indent=1))
    peak = max(r["rss"] for r in rows.values())
    _common.summary(f"voc_scale: {n_train + n_val} images, {wall:.0f} s wall, snakemake -n {dry_s:.1f} s, "
                    f"largest job {peak:.0f} MB RSS")


if __name__ == "__main__":
    main()
