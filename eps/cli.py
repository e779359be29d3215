"""The `eps` command: one subcommand per pipeline stage, each a thin call into one module.

User errors print one line `eps: error: <file>: <problem>` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from eps.errors import EpsError, file_error

CORES_HELP = "the cores this job has: EPS_THREADS, as Snakemake sets it, else the machine's"


def _workers(value) -> int:
    """--workers: as given, or the cores this job has (eps.config.usable_cores)."""
    from eps.config import usable_cores

    if value is None:
        return usable_cores()
    if value < 1:
        raise EpsError(f"--workers: expected a positive number of processes, got {value}")
    return value


SALIENCY_METHODS = ("classical", "usps", "pfan", "dss", "csnet", "precomputed")  # eps.saliency.METHODS, without importing it


def _params(p):
    p.add_argument("--params", default=None, help="stage parameters: a JSON string or a JSON/YAML file")


def cmd_synth(a):
    from dataclasses import asdict

    from eps.config import load_params
    from eps.data.synthetic import SynthConfig, generate

    generate(a.out, overwrite=True, **load_params(a.params, asdict(SynthConfig()), "synth"))


def cmd_index(a):
    from eps.data.build import build_index

    if Path(a.dataset).is_file():  # a YAML / JSON file: the dataset block, or a config holding one
        import yaml

        try:
            dataset = yaml.safe_load(Path(a.dataset).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise EpsError(f"{a.dataset}: cannot read the dataset block ({' '.join(str(exc).split())})") from None
        if isinstance(dataset, dict) and isinstance(dataset.get("dataset"), dict):
            dataset = dataset["dataset"]
    else:
        try:
            dataset = json.loads(a.dataset)
        except json.JSONDecodeError as exc:
            raise EpsError(f"--dataset: neither a file nor valid JSON ({exc})") from None
    if not isinstance(dataset, dict):
        raise EpsError("--dataset: expected a JSON object (the dataset config block)")
    build_index(dataset, a.out)


def cmd_saliency(a):
    from eps.saliency import extract_shard, predict_folder

    if (a.index is None) == (a.images is None):
        raise EpsError("saliency: give exactly one of --index (an HDF5 shard) or --images DIR (PNGs)")
    if a.images is not None:
        count = predict_folder(a.method, a.images, a.out, weights=a.weights, device=a.device)
        print(f"{count} saliency maps -> {a.out}")
    else:
        extract_shard(a.index, a.method, a.shard, a.out, strict=a.strict, weights=a.weights, device=a.device)


def cmd_train_saliency(a):
    from eps.config import load_params
    from eps.saliency.training import train

    if (a.index is None) == (a.images is None):
        raise EpsError("train-saliency: give exactly one of --index (with --split) or --images DIR")
    if a.method == "usps":
        from eps.saliency.usps import TRAIN_DEFAULTS
    else:
        from eps.saliency.supervised import TRAIN_DEFAULTS
    params = load_params(a.params, TRAIN_DEFAULTS, f"{a.method} training")
    train(a.method, a.out, images=a.images, masks_dir=a.masks, index_csv=a.index, split=a.split,
          params=params, device=a.device)


def cmd_eval_saliency(a):
    from eps.saliency.metrics import evaluate_dirs, evaluate_shards, write_json

    if (a.pred is None) == (a.shards is None):
        raise EpsError("eval-saliency: give exactly one of --pred DIR (PNGs) or --shards (HDF5 shards)")
    if (a.gt is None) == (a.index is None):
        raise EpsError("eval-saliency: give exactly one of --gt DIR or --index (the masks it records)")
    if a.index is not None and a.shards is None:
        raise EpsError("eval-saliency: --index goes with --shards (maps by image id)")
    gt = a.gt
    if a.index is not None:
        from eps.data.index import read_index

        rows = read_index(a.index)
        gt = {i: m for i, m in zip(rows["id"], rows["mask"]) if m}
    result = (evaluate_dirs(a.pred, gt, ids=a.ids) if a.pred is not None
              else evaluate_shards(a.shards, gt, ids=a.ids, index=a.index))
    write_json(result, a.out)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def cmd_train_classifier(a):
    from eps.config import TRAIN_DEFAULTS, load_params
    from eps.train import train_classifier

    params = load_params(a.params, TRAIN_DEFAULTS, "classifier")
    train_classifier(a.index, a.out, params, saliency_shards=a.saliency or (), split=a.split)


def cmd_infer_cams(a):
    from eps.config import INFER_DEFAULTS, load_params
    from eps.infer import infer_cams

    infer_cams(a.index, a.classifier, a.out, a.split, a.shard, load_params(a.params, INFER_DEFAULTS, "infer"))


def cmd_pseudo_masks(a):
    from eps.config import MASK_DEFAULTS, load_params
    from eps.shards import pseudo_masks

    pseudo_masks(a.cams, a.out, a.dataset, load_params(a.params, MASK_DEFAULTS, "pseudo_masks"))


def cmd_export_masks(a):
    from eps.shards import export_pngs

    export_pngs(a.masks, a.out, a.dataset)


def cmd_evaluate_masks(a):
    from eps.data.index import read_classes, split_ground_truth
    from eps.data.io import read_ids_file
    from eps.metrics import evaluate_masks, write_metrics

    if a.index:  # ground truth, contexts and class count as the index records them
        given = [flag for flag, value in (("--gt", a.gt), ("--ids", a.ids), ("--context", a.context)) if value]
        if given:
            raise EpsError(f"evaluate-masks: --index gives the ground truth; drop {', '.join(given)}")
        if not a.split:
            raise EpsError("evaluate-masks: --index needs --split (the ids to score)")
        ids, gt, context = split_ground_truth(a.index, a.split)
        num_classes = len(read_classes(a.index)["classes"]) + 1
        if a.num_classes is not None and a.num_classes != num_classes:
            raise EpsError(f"--num-classes {a.num_classes}: the index has {num_classes} classes with background")
        classes = a.classes or a.index
    else:
        if a.split:
            raise EpsError("evaluate-masks: --split goes with --index (with --gt, --ids names the images)")
        if a.gt and not a.ids:
            raise EpsError("evaluate-masks: --gt needs --ids FILE (the ids to score)")
        if not (a.gt and a.ids):
            raise EpsError("evaluate-masks: give --index and --split, or --gt DIR and --ids FILE")
        if a.num_classes is None:
            raise EpsError("evaluate-masks: --num-classes is required with --gt")
        ids, gt, context, num_classes, classes = read_ids_file(a.ids), a.gt, a.context, a.num_classes, a.classes
    if not 1 <= num_classes <= 255:
        raise EpsError(f"--num-classes: expected 1..255 (mask values; 255 is void), got {num_classes}")
    if a.boundary_tolerance is not None and not (math.isfinite(a.boundary_tolerance) and a.boundary_tolerance >= 0):
        raise EpsError(f"--boundary-tolerance: expected a non-negative number of pixels, got {a.boundary_tolerance}")
    class_names, context_names, pairs = None, None, []
    if classes:
        info = read_classes(classes)
        class_names = ["background"] + list(info["classes"])
        context_names = list(info.get("contexts", []))
        try:
            given_pairs = json.loads(a.pairs or "[]")
        except json.JSONDecodeError as exc:
            raise EpsError(f"--pairs: not valid JSON ({exc})") from None
        if not isinstance(given_pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in given_pairs):
            raise EpsError("--pairs: expected a JSON list of [context, class] pairs")
        for ctx, cls in given_pairs:
            if ctx not in context_names:
                raise EpsError(f"confusion_pairs: unknown context {ctx!r}; known: {context_names}")
            if cls not in info["classes"]:
                raise EpsError(f"confusion_pairs: unknown class {cls!r}; known: {info['classes']}")
            pairs.append((context_names.index(ctx) + 1, info["classes"].index(cls) + 1))
    if pairs and context is None:
        raise EpsError("--pairs: the co-occurrence confusion needs context masks; give --context DIR")
    if pairs and a.index and len(context) < len(ids):
        lacking = [i for i in ids if i not in context]
        raise file_error(a.index, f"--pairs: {len(lacking)} of the {len(ids)} ids of split {a.split!r} have no "
                                  f"context mask (e.g. {lacking[0]!r}); the co-occurrence confusion needs them all")
    result = evaluate_masks(
        a.pred, gt, ids, num_classes, context_dir=context, pairs=pairs,
        class_names=class_names, context_names=context_names, workers=_workers(a.workers),
        boundary_tolerance=a.boundary_tolerance, boundary_dir=a.boundary_gt,
    )
    write_metrics(result, a.out)
    miou = "undefined (no valid pixel)" if result["miou"] is None else f"{100 * result['miou']:.2f}"
    print(f"mIoU {miou} over {result['num_images']} images -> {a.out}")
    if "boundary" in result:
        b = result["boundary"]
        shown = " ".join(f"{k[0].upper()} {'n/a' if b[k] is None else f'{100 * b[k]:.2f}'}"
                         for k in ("precision", "recall", "f1"))
        print(f"boundary (tolerance {b['tolerance']:g} px): {shown}")


def cmd_summary(a):
    from eps.summary import collect_summary

    entries = []
    for item in a.entry:
        parts = item.split(":", 2)
        if len(parts) != 3:
            raise EpsError(f"--entry {item!r}: expected VARIANT:STAGE:METRICS_JSON")
        entries.append(tuple(parts))
    collect_summary(entries, a.out)


def cmd_convert_weights(a):
    from eps.models.convert import convert_weights

    weights = convert_weights(a.src, a.dst, allow_missing=a.allow_missing)
    print(f"{a.src}: {weights.description}")
    for line in weights.notes:
        print(f"  {line}")
    if weights.missing:
        print(f"  missing (allowed): {len(weights.missing)} tensors")
    print(f"wrote {a.dst}: {len(weights.state)} tensors")


# --- segmentation: dense CRF, DeepLab training, prediction (eps/crf.py, eps/segment.py) ---

def cmd_crf(a):
    from eps.config import load_params
    from eps.crf import CRF_DEFAULTS, refine_cam_shard

    refine_cam_shard(a.cams, a.index, a.out, a.dataset, load_params(a.params, CRF_DEFAULTS, "crf"),
                     workers=_workers(a.workers))


def cmd_train_segmenter(a):
    from eps.config import load_params
    from eps.segment import SEGMENT_DEFAULTS, train_segmenter

    train_segmenter(a.index, a.masks, a.out, load_params(a.params, SEGMENT_DEFAULTS, "segmenter"), split=a.split)


def cmd_predict(a):
    from eps.config import load_params
    from eps.crf import CRF_DEFAULTS
    from eps.predict import PREDICT_DEFAULTS, predict

    crf = load_params(a.crf, CRF_DEFAULTS, "crf") if a.crf else None
    predict(a.index, a.model, a.out, a.split, a.shard, load_params(a.params, PREDICT_DEFAULTS, "predict"),
            crf_params=crf, crf_out=a.crf_out, server_layout=a.server_layout, workers=_workers(a.workers))


def add_segmentation_commands(sub) -> None:
    p = sub.add_parser("crf", help="dense CRF pseudo-masks from one CAM shard (presets deeplab, psa)")
    p.add_argument("--cams", required=True, help="a CAM shard (infer-cams)")
    p.add_argument("--index", required=True, help="index.csv (image paths)")
    p.add_argument("--dataset", required=True, help="dataset name the shards belong to")
    p.add_argument("--workers", type=int, default=None, help="images refined in parallel (default: " + CORES_HELP + ")")
    p.add_argument("--out", required=True, help="mask shard (format eps.masks)")
    _params(p)
    p.set_defaults(func=cmd_crf)

    p = sub.add_parser("train-segmenter", help="train a DeepLab segmenter on pseudo-masks (index PNGs)")
    p.add_argument("--index", required=True, help="index.csv of the run (eps index): image, mask and label of every id")
    p.add_argument("--masks", required=True, help="folder of pseudo-mask PNGs {id}.png (255 = ignored)")
    p.add_argument("--split", default="train", help="the split whose images are used (a name of ids/{split}.txt)")
    p.add_argument("--out", required=True, help="model.pt; model.json, train_log.csv and checkpoints/ go beside it")
    _params(p)
    p.set_defaults(func=cmd_train_segmenter)

    p = sub.add_parser("predict", help="multi-scale + flip segmentation of one shard of a split")
    p.add_argument("--index", required=True, help="index.csv of the run (eps index): image, mask and label of every id")
    p.add_argument("--model", required=True, help="model.pt of train-segmenter")
    p.add_argument("--split", required=True, help="the split to process (a name of ids/{split}.txt)")
    p.add_argument("--shard", default="1-of-1", help="which part of the split, as I-of-N")
    p.add_argument("--out", required=True, help="mask shard (format eps.masks)")
    p.add_argument("--crf", default=None, help="crf parameters (JSON or file): also write CRF-refined masks")
    p.add_argument("--crf-out", default=None, help="mask shard of the CRF-refined predictions (with --crf)")
    p.add_argument("--server-layout", default=None, metavar="DIR",
                   help="also write index PNGs to DIR/results/VOC2012/Segmentation/comp6_test_cls/")
    p.add_argument("--workers", type=int, default=None, help="CRF processes (default: " + CORES_HELP + ")")
    _params(p)
    p.set_defaults(func=cmd_predict)


# --- report: tables and figures of the paper's evaluation (eps/report.py) ---

def cmd_report_tables(a):
    from eps.report import write_tables

    write_tables(a.summary, a.out, a.html)


def cmd_report_figures(a):
    from eps.config import load_params
    from eps.report import REPORT_DEFAULTS, _parse_named, make_figures

    predict = None
    if a.predict_params:
        from eps.predict import PREDICT_DEFAULTS

        predict = load_params(a.predict_params, PREDICT_DEFAULTS, "predict")
    written = make_figures(
        a.out, index_csv=a.index, split=a.split,
        metrics=_parse_named(a.metrics, "metrics", 3), train_logs=_parse_named(a.train_log, "train-log"),
        seg_logs=_parse_named(a.seg_log, "seg-log"), masks=_parse_named(a.masks, "masks"),
        classifier=a.classifier, segmenter=a.segmenter, saliency_shards=a.saliency or (),
        params=load_params(a.params, REPORT_DEFAULTS, "report"), predict_params=predict,
    )
    print(f"wrote {len(written)} figures to {a.out}")


def cmd_status(a):
    from eps.status import status

    rows = status(a.results)
    width = max(len(name) for name, _, _ in rows) if rows else 0
    for name, state, detail in rows:
        print(f"{name:<{width}}  {state:<8} {detail}".rstrip())
    counts = {}
    for _, state, _ in rows:
        counts[state] = counts.get(state, 0) + 1
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no stage has started")


def add_report_commands(sub) -> None:
    p = sub.add_parser("status", help="where each stage of a run is (done, running with its progress, failed)")
    p.add_argument("results", help="the run's results folder, e.g. results/voc12")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report-tables", help="markdown (and HTML) tables of summary.csv: mIoU, boundary, confusion")
    p.add_argument("--summary", required=True, help="summary.csv (eps summary)")
    p.add_argument("--out", required=True, help="tables.md")
    p.add_argument("--html", default=None, help="also the tables as an HTML page")
    p.set_defaults(func=cmd_report_tables)

    p = sub.add_parser("report-figures", help="per-class IoU bars, training curves, qualitative grids (PNG)")
    p.add_argument("--index", required=True, help="index.csv of the run (eps index): image, mask and label of every id")
    p.add_argument("--split", required=True, help="split of the pseudo-masks and sampled images")
    p.add_argument("--metrics", action="append", default=[], help="VARIANT:STAGE:METRICS_JSON (per-class bars)")
    p.add_argument("--train-log", action="append", default=[], help="NAME:train_log.csv of a classifier")
    p.add_argument("--seg-log", action="append", default=[], help="NAME:train_log.csv of a segmenter")
    p.add_argument("--masks", action="append", default=[], help="VARIANT:DIR of pseudo-mask PNGs of --split")
    p.add_argument("--classifier", default=None, help="classifier.pt of the EPS variant (estimated saliency)")
    p.add_argument("--segmenter", default=None, help="model.pt of the EPS variant's segmenter")
    p.add_argument("--saliency", nargs="*", help="saliency HDF5 shards")
    p.add_argument("--predict-params", default=None, help="segmenter prediction parameters (JSON or file)")
    p.add_argument("--out", required=True, help="folder of the PNGs")
    _params(p)
    p.set_defaults(func=cmd_report_figures)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eps")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (none for required options and flags)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def _show_defaults(sub) -> None:
    """Subcommands created by `sub.add_parser` use the _Help formatter."""
    add = sub.add_parser

    def add_parser(name, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        return add(name, **kwargs)

    sub.add_parser = add_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eps", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"eps {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _show_defaults(sub)

    p = sub.add_parser("synth", help="generate the synthetic co-occurrence world (VOC layout)")
    p.add_argument("--out", required=True, help="the world's folder (VOC layout); replaced only if an earlier eps synth wrote it")
    _params(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("index", help="write index.csv, classes.json and ids/{split}.txt for a dataset")
    p.add_argument("--dataset", required=True,
                   help="the dataset config block: JSON, or a YAML / JSON file (a config file's `dataset` block)")
    p.add_argument("--out", required=True, help="index.csv; classes.json and ids/{split}.txt go beside it")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("saliency", help="saliency maps: one HDF5 shard (--index) or PNGs of a folder (--images)")
    p.add_argument("--index", default=None, help="index.csv of a workflow run: write one HDF5 shard")
    p.add_argument("--images", default=None, help="a folder of images: write one uint8 PNG per image into --out")
    p.add_argument("--method", default="classical", choices=list(SALIENCY_METHODS), help="saliency method (docs/saliency.md)")
    p.add_argument("--weights", default=None, help="weights file (usps, pfan, dss; csnet: the .pth.tar, its .bin beside it)")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--shard", default="1-of-1", help="which shard, as I-of-N")
    p.add_argument("--strict", action="store_true", help="precomputed: a map of another size than its image is an error")
    p.add_argument("--out", required=True, help="the shard (.h5) or the output folder")
    p.set_defaults(func=cmd_saliency)

    p = sub.add_parser("train-saliency", help="train usps (images only) or pfan / dss (images + masks)")
    p.add_argument("--method", required=True, choices=["usps", "pfan", "dss"], help="the network to train")
    p.add_argument("--images", default=None, help="a folder of images (DUTS layout: *.jpg)")
    p.add_argument("--masks", default=None, help="pfan / dss: a folder of masks with the images' stems (*.png)")
    p.add_argument("--index", default=None, help="usps: the images of a workflow run's index.csv")
    p.add_argument("--split", default="train", help="with --index: the split whose images train usps")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="the trained weights file")
    _params(p)
    p.set_defaults(func=cmd_train_saliency)

    p = sub.add_parser("eval-saliency", help="MAE, adaptive and max F-measure, S-measure of saliency PNGs or shards")
    p.add_argument("--pred", default=None, help="folder of predicted maps (PNG)")
    p.add_argument("--shards", nargs="+", default=None, help="saliency HDF5 shards of a workflow run (maps per image id)")
    p.add_argument("--gt", default=None, help="folder of ground-truth masks (PNG, non-zero = salient; "
                   "with --shards the dataset's label masks {id}.png; VOC label PNGs: void 255 ignored)")
    p.add_argument("--index", default=None, help="with --shards, instead of --gt: index.csv of the run, "
                   "whose mask column gives each image's label mask")
    p.add_argument("--ids", default=None, help="a file of image ids, one a line: score only those "
                   "(the masks folder may hold more)")
    p.add_argument("--out", required=True, help="JSON file")
    p.set_defaults(func=cmd_eval_saliency)

    p = sub.add_parser("train-classifier", help="train the CAM baseline or the EPS classifier")
    p.add_argument("--index", required=True, help="index.csv of the run (eps index): image, mask and label of every id")
    p.add_argument("--saliency", nargs="*", help="saliency HDF5 shards (eps loss)")
    p.add_argument("--split", default="train", help="the split whose images are used (a name of ids/{split}.txt)")
    p.add_argument("--out", required=True, help="classifier.pt; train_log.csv and checkpoints/ go beside it")
    _params(p)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("infer-cams", help="multi-scale + flip CAMs for one shard of a split")
    p.add_argument("--index", required=True, help="index.csv of the run (eps index): image, mask and label of every id")
    p.add_argument("--classifier", required=True, help="classifier.pt of train-classifier")
    p.add_argument("--split", required=True, help="the split to process (a name of ids/{split}.txt)")
    p.add_argument("--shard", default="1-of-1", help="which part of the split, as I-of-N")
    p.add_argument("--out", required=True, help="the CAM shard (.h5)")
    _params(p)
    p.set_defaults(func=cmd_infer_cams)

    p = sub.add_parser("pseudo-masks", help="pseudo-masks from one CAM shard")
    p.add_argument("--cams", required=True, help="a CAM shard of infer-cams")
    p.add_argument("--dataset", required=True, help="dataset name the shards belong to")
    p.add_argument("--out", required=True, help="the mask shard (.h5)")
    _params(p)
    p.set_defaults(func=cmd_pseudo_masks)

    p = sub.add_parser("export-masks", help="write mask shards as VOC-palette PNGs")
    p.add_argument("--masks", nargs="+", required=True, help="mask shards (pseudo-masks, crf or predict)")
    p.add_argument("--dataset", required=True, help="dataset name the shards belong to")
    p.add_argument("--out", required=True, help="folder of the PNGs; replaced only if an earlier export wrote it")
    p.set_defaults(func=cmd_export_masks)

    p = sub.add_parser("evaluate-masks", help="mIoU, per-class IoU/precision/recall, co-occurrence confusion")
    p.add_argument("--pred", required=True, help="folder of predicted index PNGs {id}.png (0..C-1, 255 void)")
    p.add_argument("--index", default=None, help="index.csv of the run: ground truth, contexts and classes of "
                   "the --split as it records them (instead of --gt, --ids, --context, --num-classes)")
    p.add_argument("--split", default=None, help="with --index: the split to score")
    p.add_argument("--gt", default=None, help="folder of ground-truth index PNGs {id}.png (without --index)")
    p.add_argument("--ids", default=None, help="text file of the ids to score, one per line (with --gt)")
    p.add_argument("--num-classes", type=int, default=None, help="including background (21 for VOC); "
                   "with --index taken from it")
    p.add_argument("--out", required=True, help="folder of metrics.json and per_class.csv")
    p.add_argument("--context", default=None, help="folder of context index PNGs (co-occurrence confusion)")
    p.add_argument("--classes", default=None, help="index.csv or classes.json naming classes and contexts")
    p.add_argument("--pairs", default=None, help='JSON list of [context, class] names, e.g. [["rail", "train"]]')
    p.add_argument("--workers", type=int, default=None, help="processes reading the PNGs (default: " + CORES_HELP + ")")
    p.add_argument("--boundary-tolerance", type=float, default=None, metavar="PX",
                   help="also boundary precision / recall / F1 of the class-agnostic edges, matched within PX pixels")
    p.add_argument("--boundary-gt", default=None, metavar="DIR",
                   help="ground-truth boundaries: SBD cls/{id}.mat or {id}.png (default: edges of the --gt masks)")
    p.set_defaults(func=cmd_evaluate_masks)

    p = sub.add_parser("summary", help="collect metrics.json files into summary.csv")
    p.add_argument("--entry", action="append", required=True, help="VARIANT:STAGE:METRICS_JSON")
    p.add_argument("--out", required=True, help="summary.csv")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("convert-weights", help="convert released weights (MXNet .params, EPS/PSA, "
                       "torchvision, DeepLab) to a checked PyTorch state_dict (docs/weights.md)")
    p.add_argument("src", help="weights file; the format is detected from its content")
    p.add_argument("dst", help="output state_dict (.pth), written atomically")
    p.add_argument("--allow-missing", action="store_true",
                   help="accept a file lacking some of the architecture's tensors (a partial file)")
    p.set_defaults(func=cmd_convert_weights)

    add_segmentation_commands(sub)
    add_report_commands(sub)
    return parser


# arguments that name files or folders a command reads, and those it writes
INPUT_ARGS = ("images", "index", "cams", "classifier", "masks", "model", "pred", "gt", "ids", "saliency",
              "shards", "weights", "context", "classes", "boundary_gt", "src")
OUTPUT_ARGS = ("out", "crf_out", "dst")


def check_outputs_are_not_inputs(args) -> None:
    """An output that is one of the command's inputs is refused before any work (a folder that
    holds inputs is never replaced either: eps.data.io.check_replaceable)."""
    def paths(names):
        for name in names:
            value = getattr(args, name, None)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, (str, Path)) and str(item):
                    yield name, Path(item).resolve()

    inputs = list(paths(INPUT_ARGS))
    for out_name, out in paths(OUTPUT_ARGS):
        for in_name, path in inputs:
            if path == out:
                flag = "--" + out_name.replace("_", "-")
                raise EpsError(f"{out}: the output ({flag}) is also an input (--{in_name.replace('_', '-')} "
                               f"{path}); choose another output")


def _log_command(argv) -> None:
    """Under the workflow (EPS_LOG_COMMAND set by it) a rule's log starts with the command that
    reruns the stage by hand, from the folder it ran in."""
    if os.environ.get("EPS_LOG_COMMAND"):
        threads = os.environ.get("EPS_THREADS")
        env = f"EPS_THREADS={threads} " if threads else ""
        print(f"# rerun: cd {shlex.quote(os.getcwd())} && {env}{shlex.join(['eps', *map(str, argv)])}", flush=True)


# errno values that are the user's situation, not a bug: one line naming the path, no traceback
SYSTEM_ERRORS = {13: "permission denied", 17: "file exists", 20: "not a directory", 21: "is a directory",
                 28: "no space left on device", 30: "read-only file system", 36: "file name too long",
                 122: "disk quota exceeded"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _log_command(argv)
    started = time.perf_counter()
    try:
        check_outputs_are_not_inputs(args)
        args.func(args)
    except EpsError as exc:
        message = " ".join(str(exc).splitlines())  # one line, whatever the message holds
        print(f"eps: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eps: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, read-only, a file where a folder must be, ...: the path and why
        if exc.errno not in SYSTEM_ERRORS:
            raise
        where = exc.filename or "output"
        print(f"eps: error: {where}: {exc.strerror or SYSTEM_ERRORS[exc.errno]}", file=sys.stderr)
        return 2
    if os.environ.get("EPS_LOG_COMMAND"):
        print(f"# eps {args.command}: done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
