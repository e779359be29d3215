"""Collecting the metrics.json of every (variant, stage) into one summary.csv table."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from eps.data.io import atomic_path
from eps.errors import fail


def _read_metrics(path: Path) -> dict:
    if not path.is_file():
        raise fail(path, "file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(path, f"not a readable metrics JSON ({exc})") from None
    if not isinstance(data, dict) or "miou" not in data:
        raise fail(path, "not an eps metrics file (no 'miou')")
    return data


def _cell(x) -> str:
    """Full-precision float, empty for a missing or nan value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return repr(float(x))


def collect_summary(entries, out_csv) -> list[dict]:
    """Write summary.csv: variant, stage, miou (percent), one `confusion:<pair>` column per pair.

    `entries` is a list of (variant, stage, metrics.json path). Pair columns appear in
    the order first met; a row without a pair leaves the cell empty. Returns the rows.
    """
    rows = []
    pair_columns: list[str] = []
    for variant, stage, path in entries:
        data = _read_metrics(Path(path))
        miou = data["miou"]
        row = {"variant": str(variant), "stage": str(stage), "miou": None if miou is None else 100.0 * miou}
        for item in data.get("confusion", []):
            column = f"confusion:{item['pair']}"
            if column not in pair_columns:
                pair_columns.append(column)
            row[column] = item.get("m")
        rows.append(row)

    columns = ["variant", "stage", "miou", *pair_columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row["variant"], row["stage"]] + [_cell(row.get(c)) for c in columns[2:]])
    with atomic_path(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
    return rows
