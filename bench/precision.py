"""bfloat16 against float32 on a CPU: CAM inference and a classifier training step, side by side.

For each backbone (``efficientnet_lite0`` with the installed ImageNet weights, ``resnet38``
seeded at random: speed does not depend on training; agreement does, since an untrained head
makes near-ties, so ``--classifier`` takes a trained ``classifier.pt`` for the maps), in one
process:

- CAM inference as the ``infer_cams`` stage runs it (``eps.infer.prepare_model`` and
  ``iter_cam_parts``, scales 0.5 / 0.75 with flips, one image at a time) under ``precision:
  float32`` and ``bf16``: images per second, and the share of pseudo-mask pixels (official
  rule, threshold 0.20) on which the two agree;
- a training step (forward, backward, SGD step; batch 8, EPS head) in both precisions, each
  in the memory format ``train_classifier`` gives it (``eps.models.classifier.training_layout``),
  and both in the other format too, to show what the layout is worth.

With ``--stage SPLIT --index INDEX --classifier CLASSIFIER`` it times the ``infer_cams``
stage itself instead: ``eps infer-cams`` over the split, float32, bf16, bf16, float32 (each a
fresh process, its start included, as a Snakemake job runs it), and the agreement of the two
precisions' pseudo-masks over every pixel of the split.

Photos: the first ``--images`` of ``../shared/data/voc12_photos`` train with their labels
(random pixels with ``--quick``). On a CPU without AVX-512 BF16 or AMX the stages refuse
``bf16``; so does this script (its summary says why), unless ``--force``, which measures
bfloat16 on the emulated kernels to show what the refusal saves.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


LAYOUT_NAMES = {torch.contiguous_format: "contiguous", torch.channels_last: "channels-last"}


def photos(count: int, quick: bool):
    """[(uint8 image, 20-dim multi-hot)] of real VOC photos, or random pixels."""
    from eps.data.io import read_image

    shared = _common.shared_dir()
    root = shared / "data" / "voc12_photos" if shared else None
    if quick or root is None or not root.is_dir():
        rng = np.random.default_rng(0)
        return [(rng.integers(0, 256, (48, 64, 3)).astype(np.uint8), np.eye(20)[[11, 14][k % 2]])
                for k in range(count)]
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:count]
    return [(read_image(root / "JPEGImages" / f"{i}.jpg"), np.asarray(labels[i])) for i in ids]


def masks(model, items, autocast, background: bool = True) -> list:
    from eps.infer import iter_cam_parts
    from eps.shards import mask_from_maps, maps_from_parts

    images = [image for image, _ in items]
    labels = np.stack([label for _, label in items])
    params = {"scales": [0.5, 0.75], "flip": True, "batch_size": 1}
    out = [None] * len(items)
    with torch.no_grad():
        for k, parts, present in iter_cam_parts(model, images, labels, params, background, torch.device("cpu"),
                                                autocast, keep_background=False):
            maps = maps_from_parts(parts, images[k].shape[:2], False)
            out[k] = mask_from_maps(maps, present, False, 0.20)
    return out


def stage(index: str, classifier: str, split: str, repeats: int, workdir: Path, threads: int) -> tuple[dict, float]:
    """`eps infer-cams` over `split` in both precisions, ABBA per repeat: (seconds per precision, agreement)."""
    import os
    import subprocess
    import time

    import h5py

    from eps.shards import mask_from_maps, read_cams

    times = {"float32": [], "bf16": []}
    for _ in range(repeats):
        for precision in ("float32", "bf16", "bf16", "float32"):
            out = workdir / f"{precision}.h5"
            out.unlink(missing_ok=True)
            params = {"scales": [0.5, 0.75], "flip": True, "batch_size": 4, "precision": precision}
            cmd = [sys.executable, "-m", "eps", "infer-cams", "--index", index, "--classifier", classifier,
                   "--split", split, "--out", str(out), "--params", json.dumps(params)]
            t0 = time.perf_counter()
            env = dict(os.environ, EPS_THREADS=str(threads)) if threads else None
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            times[precision].append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise SystemExit(f"eps infer-cams failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    same = total = 0
    with h5py.File(workdir / "float32.h5") as a, h5py.File(workdir / "bf16.h5") as b:
        for image_id in a:
            masks = [mask_from_maps(*read_cams(f, image_id), 0.20) for f in (a, b)]
            same += int((masks[0] == masks[1]).sum())
            total += masks[0].size
    return times, same / total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one repeat (the test suite)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = the cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet38"])
    parser.add_argument("--force", action="store_true", help="measure bf16 even on a CPU without it (emulated)")
    parser.add_argument("--classifier", help="a trained classifier.pt: its backbone only, and its maps for the "
                        "inference and agreement (a random head makes near-ties of the pseudo-masks)")
    parser.add_argument("--stage", metavar="SPLIT", help="time the infer_cams stage over this split instead "
                        "(needs --index and --classifier)")
    parser.add_argument("--index", help="index.csv of the run, for --stage")
    args = parser.parse_args(argv)
    if args.stage and not (args.index and args.classifier):
        parser.error("--stage needs --index and --classifier")
    _common.set_threads(args.threads)
    _common.header("precision", argv=argv)
    from eps.config import cpu_has_bf16
    from eps.infer import prepare_model
    from eps.models import build_classifier
    from eps.models.classifier import PACKAGED_WEIGHTS, training_layout
    from eps.models.efficientnet import load_lite0
    from eps.training import make_optimizer

    has = cpu_has_bf16()
    print(f"CPU bfloat16 instructions (AVX-512 BF16 or AMX): {'yes' if has else 'no'}")
    if not has and not args.force:
        _common.summary("precision: skipped (this CPU has no AVX-512 BF16 or AMX: eps refuses bf16 here; "
                        "--force measures the emulated kernels)")
        return
    quick = args.quick
    repeats = 1 if quick else args.repeats
    if args.stage:
        with tempfile.TemporaryDirectory() as tmp:
            times, agree = stage(args.index, args.classifier, args.stage, repeats, Path(tmp), args.threads)
        mean = {k: statistics.mean(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"eps infer-cams --split {args.stage}, {k}: " + ", ".join(f"{t:.1f} s" for t in v))
        print(f"pseudo-masks agree on {100 * agree:.2f}% of the split's pixels")
        _common.summary(f"precision: infer_cams stage over {args.stage} bf16 / float32 "
                        f"{mean['float32'] / mean['bf16']:.2f}x ({100 * agree:.2f}% agree)")
        return
    items = photos(2 if quick else args.images, quick)
    crop = 32 if quick else args.crop
    backbones = ["small"] if quick else args.backbones
    trained = None
    if args.classifier:
        from eps.models.classifier import load_classifier

        trained, meta = load_classifier(args.classifier)
        if meta["num_classes"] != 20:
            parser.error(f"{args.classifier}: trained for {meta['num_classes']} classes; the VOC photos have 20")
        backbones = [meta["backbone"]]
        print(f"CAM inference with {args.classifier} ({meta['backbone']}, BatchNorm folded as infer_cams runs it; "
              "--backbones is not used)")
    results = []
    cpu = torch.device("cpu")
    for name in backbones:
        runs = {"float32": None, "bf16": torch.bfloat16}

        def built(layout=torch.contiguous_format):
            torch.manual_seed(0)
            model = build_classifier(name, 20, background=True)
            if name in PACKAGED_WEIGHTS:  # ImageNet weights, as train_classifier starts from them
                load_lite0(model._backbone)
            return model.to(memory_format=layout)

        if trained is not None:
            maps_models = {k: prepare_model(copy.deepcopy(trained), cpu, d) for k, d in runs.items()}
            background = bool(trained.background)
        else:
            maps_models = {k: prepare_model(built(), cpu, d) for k, d in runs.items()}
            background = True
        got = {}
        # one precision after the other, not interleaved: every photo size makes new oneDNN
        # kernels, more than its cache keeps, so interleaving would time each precision with
        # the other's kernels in the cache; the stage runs one precision per process
        times = {}
        for k, d in runs.items():
            def infer(k=k, d=d):
                got[k] = masks(maps_models[k], items, d, background)
            times[k] = _common.interleaved({k: infer}, repeats)[k]
        agree = sum(int((a == b).sum()) for a, b in zip(got["float32"], got["bf16"]))
        agree /= sum(a.size for a in got["float32"])
        speed = {k: len(items) / _common.median(t) for k, t in times.items()}

        layouts = {k: training_layout(name, d, cpu) for k, d in runs.items()}
        cases = {k: (d, layouts[k]) for k, d in runs.items()}
        for k, d in runs.items():
            other = torch.channels_last if layouts[k] == torch.contiguous_format else torch.contiguous_format
            cases[f"{k}, other layout"] = (d, other)
        target = torch.zeros(8, 20)
        target[:, 11] = 1
        batch = torch.randn(8, 3, crop, crop)
        steppers = {}
        for k, (d, layout) in cases.items():
            model = built(layout).train()
            optimizer = make_optimizer(model, {"lr": 0.01, "weight_decay": 5e-4, "momentum": 0.9})
            steppers[k] = _common.classifier_step(model, optimizer, batch.to(memory_format=layout), target, d)
        steps = _common.interleaved(steppers, repeats)
        infer_x = speed["bf16"] / speed["float32"]
        step_x = _common.median(steps["float32"]) / _common.median(steps["bf16"])
        print(f"{name}: CAM inference float32 {speed['float32']:.2f} images/s, bf16 {speed['bf16']:.2f} "
              f"({infer_x:.2f}x), pseudo-masks agree on {100 * agree:.2f}% of pixels")
        for k, (d, layout) in cases.items():
            how = "as eps trains it" if k in runs else "not what eps trains"
            print(f"{name}: training step (batch 8, crop {crop}) {'bf16' if d else 'float32'} {LAYOUT_NAMES[layout]} "
                  f"({how}): {_common.fmt_times(steps[k])}")
        print(f"{name}: training step bf16 / float32 as eps trains them: {step_x:.2f}x")
        results.append(f"{name} inference {infer_x:.2f}x ({100 * agree:.2f}% agree), step {step_x:.2f}x")
    emulated = "" if has else " (emulated bfloat16: this CPU has no AVX-512 BF16 or AMX)"
    _common.summary("precision: bf16 / float32 " + "; ".join(results) + emulated)


if __name__ == "__main__":
    main()
