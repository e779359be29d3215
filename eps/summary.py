"""Collecting the metrics.json of every (variant, stage) into one summary.csv table.

Columns: `variant`, `stage`, `miou` (%); `boundary_precision`, `boundary_recall`,
`boundary_f1` (%, when some metrics.json has a `boundary` entry); for each co-occurrence
pair `confusion:<context>-><class>` (m = FP / TP) followed by `iou:<class>` (%, the IoU of
the pair's class, once per class) when the metrics carry it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from eps.data.io import atomic_path
from eps.errors import file_error


def _read_metrics(path: Path) -> dict:
    if not path.is_file():
        raise file_error(path, "file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise file_error(path, f"not a readable metrics JSON ({exc})") from None
    if not isinstance(data, dict) or "miou" not in data:
        raise file_error(path, "not an eps metrics file (no 'miou')")
    numbers = [("miou", data["miou"])]
    if isinstance(data.get("boundary"), dict):
        numbers += [(f"boundary.{k}", data["boundary"].get(k)) for k in ("precision", "recall", "f1")]
    for key, value in numbers:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise file_error(path, f"{key} is {value!r}, not a number (0..1) or null")
    return data


def _cell(x, digits: int = 2) -> str:
    """A number for people: percentages to 2 decimals, ratios to 3; empty when missing or nan
    (full precision stays in each stage's metrics.json, 0..1)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{float(x):.{digits}f}"


def _percent(x):
    return None if x is None else 100.0 * float(x)


def collect_summary(entries, out_csv) -> list[dict]:
    """Write summary.csv: variant, stage, miou (percent), boundary P/R/F1 (percent), one
    `confusion:<pair>` column per pair (a ratio) and `iou:<class>` (percent) of the pair's class.
    Percentages are rounded to 2 decimals, ratios to 3 (metrics.json keeps 0..1 at full precision).

    `entries` is a list of (variant, stage, metrics.json path). Pair columns appear in
    the order first met, each followed by its class's IoU column; a row without a pair (or
    without boundary scores) leaves the cell empty. Returns the rows.
    """
    rows = []
    pair_columns: list[str] = []
    boundary = False
    for variant, stage, path in entries:
        data = _read_metrics(Path(path))
        miou = data["miou"]
        row = {"variant": str(variant), "stage": str(stage), "miou": _percent(miou)}
        if isinstance(data.get("boundary"), dict):
            boundary = True
            for key in ("precision", "recall", "f1"):
                row[f"boundary_{key}"] = _percent(data["boundary"].get(key))
        for item in data.get("confusion", []):
            column = f"confusion:{item['pair']}"
            if column not in pair_columns:
                pair_columns.append(column)
            row[column] = item.get("m")
            if "class_iou" in item:
                iou_column = f"iou:{str(item['pair']).split('->')[-1]}"
                if iou_column not in pair_columns:
                    pair_columns.append(iou_column)
                row[iou_column] = _percent(item["class_iou"])
        rows.append(row)

    boundary_columns = ["boundary_precision", "boundary_recall", "boundary_f1"] if boundary else []
    columns = ["variant", "stage", "miou", *boundary_columns, *pair_columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row["variant"], row["stage"]]
                        + [_cell(row.get(c), 3 if c.startswith("confusion:") else 2) for c in columns[2:]])
    with atomic_path(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
    return rows
