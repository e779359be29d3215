"""The paper's evaluation as tables and figures: summary tables (markdown + HTML), per-class IoU
bars, training curves and qualitative grids, for `snakemake --report` (rules report_tables,
report_figures).

Tables (`write_tables`, from summary.csv):

- mIoU per variant and stage: pseudo-masks without / with CRF (the paper's Tables 3-4, the
  variants of the map-selection ablation), the segmenter without / with CRF (Tables 5-7);
- boundary precision / recall / F1 per variant and stage (Table 1);
- co-occurrence confusion m = FP / TP with the target class's IoU, per pair (Table 2).

Figures (`make_figures`): PNGs of fixed pixel size (matplotlib, Agg, `dpi` 100):

- `per_class/{variant}_{stage}.png`: per-class IoU bars of one metrics.json;
- `training_curves.png` (classifiers) and `segmenter_curves.png`: losses of each train_log.csv;
- `qualitative.png`: a row per sampled image: image | ground truth | saliency | estimated
  saliency | CAM | EPS pseudo-mask | segmenter output, as in the paper's figures. The
  estimated saliency is the EPS classifier's sal_pred = lam * fg + (1 - lam) * bg of the
  saliency loss (with the variant's own tau, lam and map selection), computed here at
  the image's scale; the segmenter output is predicted here too (multi-scale + flip);
- `variants.png`: image | ground truth | the pseudo-mask of every variant (the ablation).

Sampled ids are a seeded choice (`sample`, `seed`) among the ids of the split.
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import numpy as np

from eps.data.io import VOC_PALETTE, atomic_path, read_image, read_index_png
from eps.errors import EpsError, file_error

REPORT_DEFAULTS = {
    "sample": 6,  # images in the qualitative grids
    "seed": 0,  # which images
    "baseline": None,  # variant shown as "CAM" (default: `cam` if present, else the first)
    "method": None,  # variant shown as "EPS" (default: `eps` if present, else the last)
    "device": "cpu",
}

DPI = 100
CELL = 1.4  # inches per grid cell (140 px at DPI)
HEADER = 0.3  # inches of column titles above a grid
BAR_SIZE = (6.4, 3.2)  # inches: 640 x 320 px


# ---------------------------------------------------------------------------------------
# Tables


def read_summary(path) -> list[dict]:
    """summary.csv as a list of dicts (numbers as float, empty cells as None)."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "file not found (run the summary stage first)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"variant", "stage", "miou"} <= set(reader.fieldnames):
            raise file_error(path, "not an eps summary.csv (needs columns variant, stage, miou)")
        rows = []
        for raw in reader:
            row = {}
            for key, value in raw.items():
                if key in ("variant", "stage"):
                    row[key] = value
                elif value in ("", None):
                    row[key] = None
                else:
                    try:
                        row[key] = float(value)
                    except ValueError:
                        raise file_error(path, f"column {key}: not a number: {value!r}") from None
            rows.append(row)
    return rows


def _num(x, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ordered(values) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


STAGE_TITLES = {
    "pseudo_masks": "pseudo-masks",
    "crf": "pseudo-masks + CRF",
    "segmenter": "segmenter",
    "segmenter_crf": "segmenter + CRF",
}


def summary_tables(rows: list[dict]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) of every table built from summary rows."""
    variants = _ordered(r["variant"] for r in rows)
    stages = _ordered(r["stage"] for r in rows)
    cell = {(r["variant"], r["stage"]): r for r in rows}
    tables = []

    header = ["variant"] + [STAGE_TITLES.get(s, s) for s in stages]
    body = [[v] + [_num((cell.get((v, s)) or {}).get("miou")) for s in stages] for v in variants]
    tables.append(("mIoU (%)", "Pseudo-masks without / with CRF on the evaluation split (the paper's "
                   "Tables 3-4, with the map-selection variants of Table 3), the segmenter trained on "
                   "each variant's pseudo-masks on its prediction split (Tables 5-7).", header, body))

    keys = ("boundary_precision", "boundary_recall", "boundary_f1")
    if any(r.get(k) is not None for r in rows for k in keys):
        header = ["variant", "stage", "precision", "recall", "F1"]
        body = [[r["variant"], STAGE_TITLES.get(r["stage"], r["stage"])] + [_num(r.get(k)) for k in keys]
                for r in rows if any(r.get(k) is not None for k in keys)]
        tables.append(("Boundary accuracy (%)", "Class-agnostic edges (Laplacian of the label map) "
                       "matched to the ground-truth boundaries within the configured tolerance, "
                       "accumulated over all images (the paper's Table 1).", header, body))

    pairs = [c[len("confusion:"):] for c in rows[0] if c.startswith("confusion:")] if rows else []
    for stage in stages:
        srows = [r for r in rows if r["stage"] == stage]
        if not pairs or not any(r.get(f"confusion:{p}") is not None for r in srows for p in pairs):
            continue
        header = ["variant"]
        for p in pairs:
            target = p.split("->")[-1]
            header += [f"m {p}", f"IoU {target}"]
        body = []
        for r in srows:
            line = [r["variant"]]
            for p in pairs:
                target = p.split("->")[-1]
                line += [_num(r.get(f"confusion:{p}"), 2), _num(r.get(f"iou:{target}"))]
            body.append(line)
        tables.append((f"Co-occurrence confusion, {STAGE_TITLES.get(stage, stage)}",
                       "m = FP / TP: pixels of the context predicted as the class, per true-positive "
                       "pixel of the class (lower is better; the paper's Table 2), beside the class's "
                       "IoU (%).", header, body))
    return tables


def _markdown(title, note, header, body) -> str:
    lines = [f"## {title}", "", note, "", "| " + " | ".join(header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _html(title, note, header, body) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<h2>{esc(title)}</h2>\n<p>{esc(note)}</p>\n<table><tr>{head}</tr>{rows}</table>\n"


def write_tables(summary_csv, out_md, out_html=None, title: str = "eps results") -> str:
    """Write the tables of summary.csv as markdown (and HTML); returns the markdown."""
    tables = summary_tables(read_summary(summary_csv))
    text = f"# {title}\n\nFrom `{Path(summary_csv).name}`.\n\n" + "\n".join(_markdown(*t) for t in tables)
    with atomic_path(Path(out_md)) as tmp:
        tmp.write_text(text)
    if out_html is not None:
        style = ("body{font-family:sans-serif} table{border-collapse:collapse;margin-bottom:1em}"
                 "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}"
                 "td:first-child,th:first-child{text-align:left}")
        page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
                + "".join(_html(*t) for t in tables) + "</body></html>\n")
        with atomic_path(Path(out_html)) as tmp:
            tmp.write_text(page)
    return text


# ---------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Save at DPI without tight bounding box, so the PNG is exactly figsize * DPI pixels."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _read_metrics(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise file_error(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise file_error(path, f"not a readable metrics JSON ({exc})") from None
    if not isinstance(data, dict) or "per_class" not in data:
        raise file_error(path, "not an eps metrics file (no 'per_class')")
    return data


def per_class_bars(metrics_json, out_png, title: str = "") -> Path:
    """Bar chart of the per-class IoU (%) of one metrics.json (640 x 320 px)."""
    data = _read_metrics(metrics_json)
    names = [row["class"] for row in data["per_class"]]
    values = [0.0 if row["iou"] is None else 100.0 * row["iou"] for row in data["per_class"]]
    plt = _plt()
    fig, ax = plt.subplots(figsize=BAR_SIZE)
    colours = VOC_PALETTE[: len(names)] / 255.0
    ax.bar(range(len(names)), values, color=colours, edgecolor="black", linewidth=0.5)
    for i, row in enumerate(data["per_class"]):
        if row["iou"] is None:
            ax.text(i, 1, "n/a", ha="center", va="bottom", fontsize=7)
    many = len(names) > 8
    ax.set_xticks(range(len(names)), names, rotation=45 if many else 0, ha="right" if many else "center",
                  fontsize=7 if many else 8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    miou = data.get("miou")
    ax.set_title(f"{title}  mIoU {_num(None if miou is None else 100 * miou)}" if title else
                 f"mIoU {_num(None if miou is None else 100 * miou)}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.88, bottom=0.25 if many else 0.12)
    return _save(fig, out_png)


def _read_log(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "iteration" not in reader.fieldnames:
            raise file_error(path, "not a train_log.csv (no 'iteration' column)")
        cols: dict[str, list] = {k: [] for k in reader.fieldnames}
        for raw in reader:
            for k, v in raw.items():
                try:
                    cols[k].append(float(v))
                except (TypeError, ValueError):
                    cols[k].append(math.nan)
    return {k: np.asarray(v, np.float64) for k, v in cols.items()}


def _smooth(y: np.ndarray) -> np.ndarray:
    window = max(1, len(y) // 50)
    if window == 1:
        return y
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def training_curves(logs: dict, out_png, columns=("loss", "loss_cls", "loss_sal", "fg_share")) -> Path:
    """Loss curves (moving average over 2 % of the run) of named train_log.csv files.

    One panel per column with values in some log, two panels a row (6.4 x 3.2 inches each);
    a loss that is zero throughout a log (the CAM baseline's `loss_sal`) is not drawn for it.
    `fg_share` is the share of labelled classes that adaptive map selection puts on the
    foreground side.
    """
    data = {name: _read_log(path) for name, path in logs.items()}
    data = {name: {k: v for k, v in d.items()
                   if np.isfinite(v).any() and not (k.startswith("loss_") and not np.any(v[np.isfinite(v)]))}
            for name, d in data.items()}
    shown = [c for c in columns if any(c in d for d in data.values())] or ["loss"]
    plt = _plt()
    ncols = min(2, len(shown))
    nrows = -(-len(shown) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, shown):
        for name, d in data.items():
            if column in d and len(d[column]):
                ax.plot(d["iteration"], _smooth(d[column]), label=name, linewidth=1)
        ax.set_title(column, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if data:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_png)


def colour_mask(mask: np.ndarray) -> np.ndarray:
    """Index mask -> RGB with the VOC palette (255 = void, cream)."""
    return VOC_PALETTE[np.asarray(mask, np.uint8)]


def image_grid(rows: list[list], titles: list[str], out_png, row_labels=None) -> Path:
    """A grid of panels: `rows` of equal length, each panel an RGB uint8 (H, W, 3), a float
    (H, W) map in 0..1 (grey), or None (blank). Exactly len(titles) * 140 px wide and
    len(rows) * 140 + 30 px high.
    """
    if not rows:
        raise EpsError("report: no images to show")
    ncols = len(titles)
    if any(len(r) != ncols for r in rows):
        raise EpsError("report: every grid row needs one panel per title")
    plt = _plt()
    width, height = ncols * CELL, len(rows) * CELL + HEADER
    fig = plt.figure(figsize=(width, height))
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            ax = fig.add_axes([j * CELL / width, 1 - (HEADER + (i + 1) * CELL) / height + 0.02 / height,
                               CELL / width, (CELL - 0.04) / height])
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            elif np.asarray(panel).ndim == 2:
                ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(panel, interpolation="nearest")
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
            if j == 0 and row_labels is not None:
                ax.text(0.02, 0.98, str(row_labels[i]), transform=ax.transAxes, ha="left", va="top", fontsize=6,
                        color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    return _save(fig, out_png)


def sample_ids(ids, count: int, seed: int) -> list[str]:
    """A seeded choice of `count` ids (all of them if fewer), in their original order."""
    ids = list(ids)
    if count >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return [ids[k] for k in sorted(rng.choice(len(ids), size=count, replace=False))]


def estimated_saliency(model, meta: dict, image: np.ndarray, saliency: np.ndarray, labels: np.ndarray,
                       device="cpu") -> np.ndarray | None:
    """The EPS classifier's saliency estimate sal_pred = lam * fg + (1 - lam) * bg at image size (0..1).

    `image` uint8 RGB (H, W, 3), `saliency` uint8 (H, W), `labels` multi-hot (C,). The
    foreground / background maps come from the variant's own map selection (tau, lam,
    selection, background_classes of `meta["params"]`), as in training. None for a
    classifier without a background channel (the CAM baseline has no estimate).
    """
    import torch
    import torch.nn.functional as F

    from eps.losses import saliency_loss
    from eps.data.imagenet import normalize

    if not meta.get("background"):
        return None
    params = meta.get("params", {})
    classes = list(meta.get("classes", []))
    bg_idx = [classes.index(c) for c in params.get("background_classes", []) if c in classes]
    x = torch.from_numpy(normalize(image))[None].to(device)
    sal = torch.from_numpy(np.asarray(saliency, np.float32) / 255.0)[None, None].to(device)
    lab = torch.from_numpy(np.asarray(labels, np.float32))[None].to(device)
    with torch.no_grad():
        cam = model.forward_cam(x)
        _, _, _, sal_pred = saliency_loss(cam, sal, lab, params.get("tau", 0.4), params.get("lam", 0.5),
                                          selection=params.get("selection", "adaptive"),
                                          background_classes=bg_idx)
        sal_pred = F.interpolate(sal_pred, size=image.shape[:2], mode="bilinear", align_corners=False)
    return sal_pred[0, 0].clamp(0, 1).cpu().numpy()


def segmenter_output(model, image: np.ndarray, params: dict, device="cpu") -> np.ndarray:
    """The segmenter's multi-scale + flip prediction of one image, as `eps predict` makes it."""
    import torch

    from eps.predict import multiscale_probs
    from eps.data.imagenet import normalize

    x = torch.from_numpy(normalize(image))[None].to(device)
    probs = multiscale_probs(model, x, params.get("scales", [1.0]), bool(params.get("flip", True)))
    return probs[0].argmax(0).cpu().numpy().astype(np.uint8)


def _parse_named(items, what: str, parts: int = 2) -> list[tuple]:
    out = []
    for item in items or ():
        fields = str(item).split(":", parts - 1)
        if len(fields) != parts or not all(fields):
            raise EpsError(f"--{what} {item!r}: expected {':'.join(['NAME'] * (parts - 1) + ['PATH'])}")
        out.append(tuple(fields))
    return out


def make_figures(out_dir, *, index_csv, split: str, metrics=(), train_logs=(), seg_logs=(), masks=(),
                 classifier=None, segmenter=None, saliency_shards=(), params: dict | None = None,
                 predict_params: dict | None = None) -> list[Path]:
    """Every figure of the report into `out_dir`; returns the written paths.

    metrics: (variant, stage, metrics.json); train_logs / seg_logs: (name, train_log.csv);
    masks: (variant, folder of pseudo-mask PNGs of `split`); classifier / segmenter: the
    method variant's classifier.pt / model.pt (optional columns).
    """
    from eps.data.index import labels_of, read_classes, read_index, split_rows

    from eps.config import set_threads

    set_threads()
    params = {**REPORT_DEFAULTS, **(params or {})}
    out_dir = Path(out_dir)
    written = []
    for variant, stage, path in metrics:
        written.append(per_class_bars(path, out_dir / "per_class" / f"{variant}_{stage}.png", f"{variant} {stage}"))
    if train_logs:
        written.append(training_curves(dict(train_logs), out_dir / "training_curves.png"))
    if seg_logs:
        written.append(training_curves(dict(seg_logs), out_dir / "segmenter_curves.png", columns=("loss",)))
    if not masks:
        return written

    masks = dict(masks)
    variants = list(masks)
    baseline = params["baseline"] or ("cam" if "cam" in masks else variants[0])
    method = params["method"] or ("eps" if "eps" in masks else variants[-1])
    for name, role in ((baseline, "baseline"), (method, "method")):
        if name not in masks:
            raise EpsError(f"report.{role}: variant {name!r} has no pseudo-masks here (variants: {variants})")
    rows = split_rows(read_index(index_csv), split)
    info = read_classes(index_csv)
    chosen = sample_ids(list(rows["id"]), int(params["sample"]), int(params["seed"]))
    rows = rows.set_index("id").loc[chosen].reset_index()
    labels = labels_of(rows, len(info["classes"]))

    device = params["device"]
    cls_model = cls_meta = seg_model = store = None
    if classifier is not None:
        from eps.models.classifier import load_classifier

        cls_model, cls_meta = load_classifier(classifier, device)
    if segmenter is not None:
        from eps.models.deeplab import load_segmenter

        seg_model, _ = load_segmenter(segmenter, device)
    if saliency_shards:
        from eps.shards import SaliencyStore

        store = SaliencyStore(saliency_shards, info["dataset"])

    grid, ablation = [], []
    for k, image_id in enumerate(chosen):
        image = read_image(rows["image"][k])
        gt = read_index_png(rows["mask"][k]) if rows["mask"][k] else None
        sal = store.get(image_id) if store is not None and image_id in store else None
        pseudo = {v: read_index_png(Path(d) / f"{image_id}.png") for v, d in masks.items()}
        est = None
        if cls_model is not None and sal is not None:
            est = estimated_saliency(cls_model, cls_meta, image, sal, labels[k], device)
        seg = segmenter_output(seg_model, image, predict_params or {}, device) if seg_model is not None else None
        grid.append([image, None if gt is None else colour_mask(gt), None if sal is None else sal / 255.0, est,
                     colour_mask(pseudo[baseline]), colour_mask(pseudo[method]),
                     None if seg is None else colour_mask(seg)])
        ablation.append([image, None if gt is None else colour_mask(gt)] + [colour_mask(pseudo[v]) for v in variants])
    titles = ["image", "ground truth", "saliency", "est. saliency", f"CAM ({baseline})",
              f"EPS ({method})", "segmenter"]
    written.append(image_grid(grid, titles, out_dir / "qualitative.png", row_labels=chosen))
    written.append(image_grid(ablation, ["image", "ground truth"] + variants, out_dir / "variants.png",
                              row_labels=chosen))
    return written
