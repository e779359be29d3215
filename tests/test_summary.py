"""summary.csv: one row per (variant, stage), mIoU in percent, one column per confusion pair."""

from __future__ import annotations

import csv
import json

import pytest

from eps.errors import EpsError
from eps.summary import collect_summary


def metrics_file(path, miou, pairs=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "miou": miou,
        "num_images": 3,
        "per_class": [],
        "confusion": [{"pair": p, "m": m} for p, m in pairs],
    }
    path.write_text(json.dumps(data))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_columns_and_values(tmp_path):
    a = metrics_file(tmp_path / "cam/m.json", 0.5, [("rail->train", 0.8), ("water->boat", None)])
    b = metrics_file(tmp_path / "eps/m.json", 0.7125, [("rail->train", 0.25), ("tree->bird", 0.1)])
    out = tmp_path / "res" / "summary.csv"
    collect_summary([("cam", "pseudo_masks", a), ("eps", "pseudo_masks", b)], out)
    header, *rows = read_csv(out)
    assert header == [
        "variant",
        "stage",
        "miou",
        "confusion:rail->train",
        "confusion:water->boat",
        "confusion:tree->bird",
    ]
    assert rows[0][:2] == ["cam", "pseudo_masks"]
    assert float(rows[0][2]) == pytest.approx(50.0)
    assert float(rows[0][3]) == pytest.approx(0.8)
    assert rows[0][4] == "" and rows[0][5] == ""  # nan and missing pair are empty
    assert float(rows[1][2]) == pytest.approx(71.25)
    assert float(rows[1][3]) == pytest.approx(0.25)
    assert rows[1][4] == "" and float(rows[1][5]) == pytest.approx(0.1)


def test_no_pairs(tmp_path):
    a = metrics_file(tmp_path / "m.json", 0.1)
    out = tmp_path / "summary.csv"
    collect_summary([("cam", "seg", a)], out)
    assert read_csv(out)[0] == ["variant", "stage", "miou"]


def test_bad_metrics_leave_no_summary(tmp_path):
    good = metrics_file(tmp_path / "a.json", 0.3)
    broken = tmp_path / "b.json"
    broken.write_text("{not json")
    out = tmp_path / "summary.csv"
    with pytest.raises(EpsError, match=r"b\.json: not a readable metrics JSON"):
        collect_summary([("x", "s", good), ("y", "s", broken)], out)
    with pytest.raises(EpsError, match=r"c\.json: file not found"):
        collect_summary([("x", "s", tmp_path / "c.json")], out)
    assert not out.exists()


def test_numbers_people_read_are_rounded(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"miou": 0.123456789, "boundary": {"precision": 0.5, "recall": 1 / 3, "f1": 0.4},
                                "confusion": [{"pair": "rail->train", "m": 0.123456, "class_iou": 0.7777777}]}))
    collect_summary([("eps", "pseudo_masks", path)], tmp_path / "summary.csv")
    text = (tmp_path / "summary.csv").read_text().splitlines()
    assert text[1] == "eps,pseudo_masks,12.35,50.00,33.33,40.00,0.123,77.78"
